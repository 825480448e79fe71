// The MLP activations: SwiGLU (Llama: silu(gate) * up) and GELU with the tanh approximation
// (GPT-2), forward and backward, elementwise over n values.

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

extern "C" __global__ void swiglu_fwd(const float* gate, const float* up, float* out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i] = g * sigmoidf_(g) * up[i];
    }
}

// d_gate = dy * up * silu'(g), silu'(g) = s + g*s*(1-s);  d_up = dy * silu(g)
extern "C" __global__ void swiglu_bwd(const float* gate, const float* up, const float* dy,
                                      float* d_gate, float* d_up, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float g = gate[i], s = sigmoidf_(g);
        d_gate[i] = dy[i] * up[i] * (s + g * s * (1.0f - s));
        d_up[i] = dy[i] * g * s;
    }
}

#define GELU_K 0.7978845608028654f  // sqrt(2/pi)
#define GELU_C 0.044715f

extern "C" __global__ void gelu_tanh_fwd(const float* x, float* out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = x[i];
        out[i] = 0.5f * v * (1.0f + tanhf(GELU_K * (v + GELU_C * v * v * v)));
    }
}

extern "C" __global__ void gelu_tanh_bwd(const float* x, const float* dy, float* dx, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = x[i];
        float u = GELU_K * (v + GELU_C * v * v * v);
        float t = tanhf(u);
        float du = GELU_K * (1.0f + 3.0f * GELU_C * v * v);
        dx[i] = dy[i] * (0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * du);
    }
}
