// Token (and GPT-2 position) embeddings: out[t] = table[ids[t]] (+ pos[positions[t]]).
// Backward scatters rows of the output gradient into the f32 table gradient.

extern "C" __global__ void embedding_fwd_bf16(const bf16_t* table, const bf16_t* pos,
                                              const int* ids, const int* positions,
                                              float* out, int n_tokens, int dim) {
    int t = blockIdx.x;
    if (t >= n_tokens) return;
    const bf16_t* row = table + (long long)ids[t] * dim;
    const bf16_t* prow = pos ? pos + (long long)positions[t] * dim : 0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = bf16_to_f32(row[i]);
        if (prow) v += bf16_to_f32(prow[i]);
        out[(long long)t * dim + i] = v;
    }
}

extern "C" __global__ void embedding_fwd_f32(const float* table, const float* pos,
                                             const int* ids, const int* positions, float* out,
                                             int n_tokens, int dim) {
    int t = blockIdx.x;
    if (t >= n_tokens) return;
    const float* row = table + (long long)ids[t] * dim;
    const float* prow = pos ? pos + (long long)positions[t] * dim : 0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = row[i];
        if (prow) v += prow[i];
        out[(long long)t * dim + i] = v;
    }
}

// d_table[ids[t]] += d_out[t]; d_pos likewise (null to skip). Atomics: a token may repeat.
extern "C" __global__ void embedding_bwd(const float* d_out, const int* ids, const int* positions,
                                         float* d_table, float* d_pos, int n_tokens, int dim) {
    int t = blockIdx.x;
    if (t >= n_tokens) return;
    float* row = d_table + (long long)ids[t] * dim;
    float* prow = d_pos ? d_pos + (long long)positions[t] * dim : 0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float g = d_out[(long long)t * dim + i];
        atomicAdd(row + i, g);
        if (prow) atomicAdd(prow + i, g);
    }
}
