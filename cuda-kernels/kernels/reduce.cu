// Reductions the other kernels and the optimizer need: a sum of squares (gradient norm),
// accumulated into one f64 with atomics; scaled accumulation; scaling; conversions between
// f32 and bf16; and the bias add after a linear layer's cuBLAS product.

extern "C" __global__ void sum_squares(const float* x, long long n, double* out) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        acc += x[i] * x[i];
    acc = block_sum(acc, scratch);
    // Blocks meet in f64, so a norm over ~1e8 values keeps f32's relative precision.
    if (threadIdx.x == 0) atomicAdd(out, (double)acc);
}

extern "C" __global__ void scale_in_place(float* x, long long n, float a) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] *= a;
}

// x += a * y (gradient accumulation over micro-batches).
extern "C" __global__ void axpy_in_place(float* x, const float* y, long long n, float a) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] += a * y[i];
}

extern "C" __global__ void add_in_place(float* x, const float* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] += y[i];
}

extern "C" __global__ void f32_to_bf16_kernel(const float* x, bf16_t* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = f32_to_bf16(x[i]);
}

extern "C" __global__ void bf16_to_f32_kernel(const bf16_t* x, float* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = bf16_to_f32(x[i]);
}

// y[r, j] += b[j] for `rows` rows of `n` values (a linear layer's bias).
extern "C" __global__ void add_bias_rows(float* y, const float* b, long long rows, int n) {
    long long total = rows * (long long)n;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x)
        y[i] += b[i % n];
}
