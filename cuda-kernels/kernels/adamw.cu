// AdamW on f32 master weights and moments (decoupled weight decay, as torch.optim.AdamW):
//   g' = g * grad_scale (gradient clipping folded in by the host)
//   m = b1 m + (1-b1) g';  v = b2 v + (1-b2) g'^2
//   p -= lr * (wd * p + (m / bc1) / (sqrt(v / bc2) + eps))
// bc1 = 1 - b1^t and bc2 = 1 - b2^t come from the host. With `p_bf16` non-null the updated
// weight is also written as bf16 (the copy the forward pass reads).

extern "C" __global__ void adamw_step(float* p, const float* g, float* m, float* v,
                                      bf16_t* p_bf16, long long n, float lr, float beta1,
                                      float beta2, float eps, float weight_decay, float bc1,
                                      float bc2, float grad_scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float gi = g[i] * grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float pi = p[i];
        pi -= lr * weight_decay * pi;
        pi -= lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
        p[i] = pi;
        if (p_bf16) p_bf16[i] = f32_to_bf16(pi);
    }
}
