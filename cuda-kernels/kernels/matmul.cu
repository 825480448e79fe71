// y[T, N] = x[T, K] · w[N, K]ᵀ with f32 activations and bf16 weights (LoadOptions::device_dtype
// bf16), accumulated in f32: the weights are widened in shared memory, so activations keep
// f32 precision (cuBLAS's bf16 GEMM would need them rounded to bf16 too).
//
// Tiles of MM_BT rows of x by MM_BN rows of w, MM_BK columns at a time; 256 threads, each
// owning 4×4 outputs. Every output sums its K products in ascending k with one FMA chain, the
// same for any T: a row's result does not depend on the rows batched with it.

#define MM_BT 64
#define MM_BN 64
#define MM_BK 16

extern "C" __global__ void matmul_bf16w(const float* x, const bf16_t* w, float* y, int T, int N,
                                        int K) {
    __shared__ float xs[MM_BK][MM_BT + 1];
    __shared__ float ws[MM_BK][MM_BN + 1];
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    int t0 = blockIdx.y * MM_BT, n0 = blockIdx.x * MM_BN;
    float acc[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += MM_BK) {
        for (int i = threadIdx.x; i < MM_BT * MM_BK; i += blockDim.x) {
            int r = i / MM_BK, c = i % MM_BK;
            int tr = t0 + r, kc = k0 + c;
            xs[c][r] = (tr < T && kc < K) ? x[(long long)tr * K + kc] : 0.0f;
        }
        for (int i = threadIdx.x; i < MM_BN * MM_BK; i += blockDim.x) {
            int r = i / MM_BK, c = i % MM_BK;
            int nr = n0 + r, kc = k0 + c;
            ws[c][r] = (nr < N && kc < K) ? bf16_to_f32(w[(long long)nr * K + kc]) : 0.0f;
        }
        __syncthreads();
        for (int kk = 0; kk < MM_BK; ++kk) {
            float a[4], b[4];
            for (int i = 0; i < 4; ++i) a[i] = xs[kk][ty + 16 * i];
            for (int j = 0; j < 4; ++j) b[j] = ws[kk][tx + 16 * j];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i) {
        int t = t0 + ty + 16 * i;
        if (t >= T) continue;
        for (int j = 0; j < 4; ++j) {
            int n = n0 + tx + 16 * j;
            if (n < N) y[(long long)t * N + n] = acc[i][j];
        }
    }
}
