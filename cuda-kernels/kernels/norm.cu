// RMSNorm (Llama) and LayerNorm (GPT-2) over rows of `dim`, one block per row, f32
// activations, weights in f32 (master copy). Forward keeps 1/rms (and the mean) per row for
// the backward. Weight gradients are accumulated with atomics into zeroed f32 buffers.

extern "C" __global__ void rmsnorm_fwd(const float* x, const float* w, float* y, float* rstd,
                                       int rows, int dim, float eps) {
    __shared__ float scratch[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (long long)r * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    float s = rsqrtf(ss / dim + eps);
    if (threadIdx.x == 0 && rstd) rstd[r] = s;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) y[(long long)r * dim + i] = xr[i] * s * w[i];
}

// dx = s * (w*dy - xhat * mean(w*dy*xhat)),  dw += dy * xhat
extern "C" __global__ void rmsnorm_bwd(const float* x, const float* w, const float* rstd,
                                       const float* dy, float* dx, float* dw, int rows, int dim) {
    __shared__ float scratch[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (long long)r * dim;
    const float* dyr = dy + (long long)r * dim;
    float s = rstd[r];
    float dot = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) dot += w[i] * dyr[i] * xr[i] * s;
    dot = block_sum(dot, scratch) / dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float xhat = xr[i] * s;
        dx[(long long)r * dim + i] = s * (w[i] * dyr[i] - xhat * dot);
        if (dw) atomicAdd(dw + i, dyr[i] * xhat);
    }
}

extern "C" __global__ void layernorm_fwd(const float* x, const float* w, const float* b, float* y,
                                         float* mean_out, float* rstd_out, int rows, int dim,
                                         float eps) {
    __shared__ float scratch[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (long long)r * dim;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) sum += xr[i];
    float mean = block_sum(sum, scratch) / dim;
    float var = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float d = xr[i] - mean;
        var += d * d;
    }
    float s = rsqrtf(block_sum(var, scratch) / dim + eps);
    if (threadIdx.x == 0) {
        if (mean_out) mean_out[r] = mean;
        if (rstd_out) rstd_out[r] = s;
    }
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        y[(long long)r * dim + i] = (xr[i] - mean) * s * w[i] + b[i];
}

// dx = s * (g - mean(g) - xhat * mean(g*xhat)) with g = w*dy; dw += dy*xhat; db += dy
extern "C" __global__ void layernorm_bwd(const float* x, const float* w, const float* mean_in,
                                         const float* rstd_in, const float* dy, float* dx,
                                         float* dw, float* db, int rows, int dim) {
    __shared__ float scratch[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (long long)r * dim;
    const float* dyr = dy + (long long)r * dim;
    float mean = mean_in[r], s = rstd_in[r];
    float g_sum = 0.0f, gx_sum = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float g = w[i] * dyr[i];
        g_sum += g;
        gx_sum += g * (xr[i] - mean) * s;
    }
    g_sum = block_sum(g_sum, scratch) / dim;
    gx_sum = block_sum(gx_sum, scratch) / dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float xhat = (xr[i] - mean) * s;
        dx[(long long)r * dim + i] = s * (w[i] * dyr[i] - g_sum - xhat * gx_sum);
        if (dw) atomicAdd(dw + i, dyr[i] * xhat);
        if (db) atomicAdd(db + i, dyr[i]);
    }
}
