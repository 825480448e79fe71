// Sampling on the device, so decode copies one token id per sequence to the host instead of
// a row of logits. One block (1024 threads) per sequence:
//   temperature 0 → argmax (the lowest id among equal maxima);
//   otherwise weights e_j = exp((x_j − max) / T), restricted to the top-k values (k = 0: all)
//   and then to the smallest set of largest values whose mass reaches top_p; thresholds are
//   found by bisection on the weight (ties at a threshold are all kept), and one uniform
//   number from (seed, stream, step) picks a token by a prefix sum in id order.
// Writes the token and its log-prob under the tempered, unfiltered distribution (what PPO
// needs as the behaviour log-prob).

#define SAMPLE_THREADS 1024

__device__ float masked_stats(const float* x, int vocab, float mx, float inv_t, float tau,
                              float* count_out, float* scratch) {
    float mass = 0.0f, count = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float e = expf((x[j] - mx) * inv_t);
        if (e >= tau) {
            mass += e;
            count += 1.0f;
        }
    }
    mass = block_sum(mass, scratch);
    *count_out = block_sum(count, scratch);
    return mass;
}

extern "C" __global__ void sample_rows(const float* logits, int rows, int vocab,
                                       const unsigned long long* streams,
                                       unsigned long long seed, unsigned long long step,
                                       float temp, int top_k, float top_p, int* tokens,
                                       float* logprobs) {
    __shared__ float scratch[32];
    __shared__ float chunk_mass[SAMPLE_THREADS];
    __shared__ int best_id[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* x = logits + (long long)r * vocab;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, x[j]);
    mx = block_max(mx, scratch);
    if (temp <= 0.0f) {
        // Greedy: the smallest index holding the maximum.
        int id = vocab;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x)
            if (x[j] == mx && j < id) id = j;
        for (int o = 16; o > 0; o >>= 1) id = min(id, __shfl_xor_sync(0xffffffffu, id, o));
        if ((threadIdx.x & 31) == 0) best_id[threadIdx.x >> 5] = id;
        __syncthreads();
        if (threadIdx.x == 0) {
            int b = vocab;
            for (int w = 0; w < (int)(blockDim.x >> 5); ++w) b = min(b, best_id[w]);
            tokens[r] = b;
            if (logprobs) logprobs[r] = 0.0f;  // filled by logsoftmax_gather_fwd if wanted
        }
        return;
    }
    float inv_t = 1.0f / temp;
    float count;
    float total = masked_stats(x, vocab, mx, inv_t, 0.0f, &count, scratch);
    // Threshold for top-k: the largest tau keeping at least k tokens.
    float tau = 0.0f;
    if (top_k > 0 && top_k < vocab) {
        float lo = 0.0f, hi = 1.0f;  // the maximum weight is exactly 1
        for (int it = 0; it < 40; ++it) {
            float mid = 0.5f * (lo + hi);
            masked_stats(x, vocab, mx, inv_t, mid, &count, scratch);
            if (count >= (float)top_k) lo = mid; else hi = mid;
        }
        tau = lo;
    }
    if (top_p < 1.0f) {
        float kept = masked_stats(x, vocab, mx, inv_t, tau, &count, scratch);
        float lo = tau, hi = 1.0f;
        for (int it = 0; it < 40; ++it) {
            float mid = 0.5f * (lo + hi);
            float mass = masked_stats(x, vocab, mx, inv_t, mid, &count, scratch);
            if (mass >= top_p * kept) lo = mid; else hi = mid;
        }
        tau = lo;
    }
    // Each thread owns a contiguous chunk of ids; prefix over chunk masses picks the chunk.
    int per = (vocab + blockDim.x - 1) / blockDim.x;
    int begin = threadIdx.x * per, end = min(begin + per, vocab);
    float m = 0.0f;
    for (int j = begin; j < end; ++j) {
        float e = expf((x[j] - mx) * inv_t);
        if (e >= tau) m += e;
    }
    chunk_mass[threadIdx.x] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        float kept = 0.0f;
        for (int i = 0; i < (int)blockDim.x; ++i) kept += chunk_mass[i];
        float target = uniform01(seed, streams[r], step) * kept;
        int chosen = -1;
        float acc = 0.0f;
        for (int i = 0; i < (int)blockDim.x && chosen < 0; ++i) {
            if (acc + chunk_mass[i] > target || i == (int)blockDim.x - 1) {
                int b = i * per, e_ = min(b + per, vocab);
                for (int j = b; j < e_; ++j) {
                    float e = expf((x[j] - mx) * inv_t);
                    if (e < tau) continue;
                    acc += e;
                    chosen = j;
                    if (acc > target) break;
                }
            } else {
                acc += chunk_mass[i];
            }
        }
        // Rounding can leave the target past the last kept weight: take the last kept token.
        for (int j = vocab - 1; chosen < 0 && j >= 0; --j)
            if (expf((x[j] - mx) * inv_t) >= tau) chosen = j;
        if (chosen < 0) chosen = 0;
        tokens[r] = chosen;
        if (logprobs) logprobs[r] = (x[chosen] - mx) * inv_t - logf(total);
    }
}
