// Rotary position embedding as transformers applies it (rotate_half: dimension i pairs with
// i + head_dim/2), in place on [tokens, heads, head_dim] f32. `inv_freq` (head_dim/2 values)
// comes from the host, which applies rope_theta and any scaling (linear, llama3).

// Rotates each pair by `sign` × its angle: +1 is the forward, −1 (the transpose of the
// rotation) the backward of the gradient.
__device__ __forceinline__ void rope_rotate(float* x, const int* positions,
                                            const float* inv_freq, int n_tokens, int heads,
                                            int head_dim, float sign) {
    int t = blockIdx.x;
    if (t >= n_tokens) return;
    int half = head_dim / 2;
    float pos = (float)positions[t];
    for (int j = threadIdx.x; j < heads * half; j += blockDim.x) {
        int h = j / half, i = j % half;
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        s *= sign;
        float* row = x + ((long long)t * heads + h) * head_dim;
        float a = row[i], b = row[i + half];
        row[i] = a * c - b * s;
        row[i + half] = b * c + a * s;
    }
}

extern "C" __global__ void rope_fwd(float* x, const int* positions, const float* inv_freq,
                                    int n_tokens, int heads, int head_dim) {
    rope_rotate(x, positions, inv_freq, n_tokens, heads, head_dim, 1.0f);
}

extern "C" __global__ void rope_bwd(float* dx, const int* positions, const float* inv_freq,
                                    int n_tokens, int heads, int head_dim) {
    rope_rotate(dx, positions, inv_freq, n_tokens, heads, head_dim, -1.0f);
}
