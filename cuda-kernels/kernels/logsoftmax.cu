// After the LM head's GEMM (cuBLAS): per row of `vocab` logits, at temperature `temp`,
// logsumexp, the target token's log-prob and the entropy, one block per row — the logits
// are read twice and no probability matrix is written. `targets[r] < 0` marks a row with no
// target (its log-prob is 0). The backward of Σ_r (w_r · logp_r + e_r · H_r) writes
//   d_logits[r, j] = (w_r · (1[j = target] − p_j) − e_r · p_j · (log p_j + H_r)) / temp
// (the entropy part only when `entropy` and `d_entropy` are both given).

extern "C" __global__ void logsoftmax_gather_fwd(const float* logits, const int* targets,
                                                 float* logp, float* lse_out, float* entropy,
                                                 int rows, int vocab, float temp) {
    __shared__ float scratch[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* x = logits + (long long)r * vocab;
    float inv_t = 1.0f / temp;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, x[j] * inv_t);
    mx = block_max(mx, scratch);
    float sum = 0.0f, wsum = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float z = x[j] * inv_t - mx;
        float e = expf(z);
        sum += e;
        wsum += e * z;
    }
    sum = block_sum(sum, scratch);
    wsum = block_sum(wsum, scratch);
    if (threadIdx.x == 0) {
        float lse = mx + logf(sum);
        if (lse_out) lse_out[r] = lse;
        int t = targets ? targets[r] : -1;
        if (logp) logp[r] = (t >= 0 && t < vocab) ? x[t] * inv_t - lse : 0.0f;
        // H = log Z − E[z] with z = x/T − max and Z = Σ e^z.
        if (entropy) entropy[r] = logf(sum) - wsum / sum;
    }
}

extern "C" __global__ void logsoftmax_gather_bwd(const float* logits, const int* targets,
                                                 const float* lse, const float* d_logp,
                                                 const float* entropy, const float* d_entropy,
                                                 float* d_logits, int rows, int vocab,
                                                 float temp) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* x = logits + (long long)r * vocab;
    float* dx = d_logits + (long long)r * vocab;
    int t = targets[r];
    float inv_t = 1.0f / temp, l = lse[r];
    float w = (t >= 0 && t < vocab) ? d_logp[r] : 0.0f;
    // With an entropy term (both pointers set): dH/dz_j = -p_j (log p_j + H), z = x / temp.
    float de = (entropy && d_entropy) ? d_entropy[r] : 0.0f;
    float h = (entropy && d_entropy) ? entropy[r] : 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float lp = x[j] * inv_t - l;
        float p = expf(lp);
        dx[j] = inv_t * (w * ((j == t ? 1.0f : 0.0f) - p) - de * p * (lp + h));
    }
}
