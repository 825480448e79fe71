// Causal attention with grouped-query heads (Hq query heads share Hq/Hkv key/value heads).
//
// attention_decode_paged: query rows against a paged bf16 KV cache (blocks of `block_size`
//   positions; row b belongs to sequence row_seq[b], whose blocks are listed in that row of
//   `block_tables`). One block of 4 warps per (row, query head); each warp keeps an online
//   softmax over its positions, the warps merge at the end. head_dim ≤ 256.
//   attention_decode_paged_f32 / kv_cache_append_f32: the same over an f32 cache. The model
//   forward of the CUDA backend runs one row per token of a packed batch (prefill and decode
//   alike): a token reads positions 0..pos of its own sequence.
//
// attention_prefill_fwd / attention_prefill_bwd: FlashAttention-style tiles over packed
//   variable-length sequences (`cu_seqlens`): scores live in shared memory one tile at a time,
//   never as a [seq × seq] matrix in global memory; the forward keeps the log-sum-exp per row,
//   the backward recomputes the probabilities from it. head_dim ≤ 128. The host lists the
//   tiles (`tile_seq`, `tile_start`: the sequence and first row of each tile of TILE rows).
//   The backward adds dQ, dK, dV with atomics into zeroed f32 buffers (so its sums are not
//   in a fixed order; compare with tolerances).

#define DECODE_WARPS 4
#define DECODE_DMAX 256
#define TILE 16
#define TILE_DMAX 128

__device__ __forceinline__ float kv_load(const bf16_t* p, long long i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ float kv_load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ void kv_store(bf16_t* p, long long i, float x) { p[i] = f32_to_bf16(x); }
__device__ __forceinline__ void kv_store(float* p, long long i, float x) { p[i] = x; }

// The body of attention_decode_paged (bf16 cache) and attention_decode_paged_f32 (f32 cache).
// Row `b` of `q` attends to positions 0..context_lens[b]-1 of the blocks listed in row
// row_seq[b] of `block_tables` ([sequences, max_blocks]). Launch: grid (rows, hq), block
// exactly DECODE_WARPS × 32 = 128 threads.
template <typename T>
__device__ __forceinline__ void attention_decode(const float* q, const T* k_cache,
                                                 const T* v_cache, const int* block_tables,
                                                 const int* row_seq,
                                                 const int* context_lens, float* out, int hq,
                                                 int hkv, int head_dim, int block_size,
                                                 int max_blocks, float scale) {
    __shared__ float m_s[DECODE_WARPS], l_s[DECODE_WARPS];
    __shared__ float acc_s[DECODE_WARPS][DECODE_DMAX];
    int b = blockIdx.x, h = blockIdx.y;
    int kvh = h / (hq / hkv);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int per_lane = (head_dim + 31) / 32;
    const float* qv = q + ((long long)b * hq + h) * head_dim;
    float qr[DECODE_DMAX / 32], acc[DECODE_DMAX / 32];
    for (int i = 0; i < per_lane; ++i) {
        int d = lane + 32 * i;
        qr[i] = d < head_dim ? qv[d] : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    int len = context_lens[b];
    for (int p = warp; p < len; p += DECODE_WARPS) {
        int blk = block_tables[(long long)row_seq[b] * max_blocks + p / block_size];
        long long row = (((long long)blk * block_size + p % block_size) * hkv + kvh) * head_dim;
        float s = 0.0f;
        for (int i = 0; i < per_lane; ++i) {
            int d = lane + 32 * i;
            if (d < head_dim) s += qr[i] * kv_load(k_cache, row + d);
        }
        s = warp_sum(s) * scale;
        float m_new = fmaxf(m, s);
        float corr = expf(m - m_new), w = expf(s - m_new);
        l = l * corr + w;
        for (int i = 0; i < per_lane; ++i) {
            int d = lane + 32 * i;
            float v = d < head_dim ? kv_load(v_cache, row + d) : 0.0f;
            acc[i] = acc[i] * corr + w * v;
        }
        m = m_new;
    }
    if (lane == 0) {
        m_s[warp] = m;
        l_s[warp] = l;
    }
    for (int i = 0; i < per_lane; ++i) {
        int d = lane + 32 * i;
        if (d < head_dim) acc_s[warp][d] = acc[i];
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int w = 0; w < DECODE_WARPS; ++w) mx = fmaxf(mx, m_s[w]);
    float total = 0.0f;
    for (int w = 0; w < DECODE_WARPS; ++w)
        if (l_s[w] > 0.0f) total += l_s[w] * expf(m_s[w] - mx);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < DECODE_WARPS; ++w)
            if (l_s[w] > 0.0f) o += acc_s[w][d] * expf(m_s[w] - mx);
        out[((long long)b * hq + h) * head_dim + d] = total > 0.0f ? o / total : 0.0f;
    }
}

extern "C" __global__ void attention_decode_paged(const float* q, const bf16_t* k_cache,
                                                  const bf16_t* v_cache, const int* block_tables,
                                                  const int* row_seq, const int* context_lens,
                                                  float* out, int hq, int hkv, int head_dim,
                                                  int block_size, int max_blocks, float scale) {
    attention_decode<bf16_t>(q, k_cache, v_cache, block_tables, row_seq, context_lens, out, hq,
                             hkv, head_dim, block_size, max_blocks, scale);
}

// The same over an f32 cache.
extern "C" __global__ void attention_decode_paged_f32(const float* q, const float* k_cache,
                                                      const float* v_cache,
                                                      const int* block_tables,
                                                      const int* row_seq,
                                                      const int* context_lens, float* out,
                                                      int hq, int hkv, int head_dim,
                                                      int block_size, int max_blocks,
                                                      float scale) {
    attention_decode<float>(q, k_cache, v_cache, block_tables, row_seq, context_lens, out, hq,
                            hkv, head_dim, block_size, max_blocks, scale);
}

// Writes token t's K and V rows (f32, [n_tokens, hkv * head_dim]) into cache slot slots[t]
// (a cache is [slots, hkv * head_dim]). Launch: grid n_tokens, any block size.
template <typename T>
__device__ __forceinline__ void cache_append(const float* k, const float* v, T* k_cache,
                                             T* v_cache, const int* slots, int n_tokens, int hkv,
                                             int head_dim) {
    int t = blockIdx.x;
    if (t >= n_tokens) return;
    long long dst = (long long)slots[t] * hkv * head_dim;
    long long src = (long long)t * hkv * head_dim;
    for (int i = threadIdx.x; i < hkv * head_dim; i += blockDim.x) {
        kv_store(k_cache, dst + i, k[src + i]);
        kv_store(v_cache, dst + i, v[src + i]);
    }
}

// Into the paged bf16 cache.
extern "C" __global__ void kv_cache_append(const float* k, const float* v, bf16_t* k_cache,
                                           bf16_t* v_cache, const int* slots, int n_tokens,
                                           int hkv, int head_dim) {
    cache_append<bf16_t>(k, v, k_cache, v_cache, slots, n_tokens, hkv, head_dim);
}

// Into an f32 cache.
extern "C" __global__ void kv_cache_append_f32(const float* k, const float* v, float* k_cache,
                                               float* v_cache, const int* slots, int n_tokens,
                                               int hkv, int head_dim) {
    cache_append<float>(k, v, k_cache, v_cache, slots, n_tokens, hkv, head_dim);
}

// Dynamic shared memory: Q, K, V, O tiles [TILE][head_dim], S [TILE][TILE], m, l, corr [TILE].
extern "C" __global__ void attention_prefill_fwd(const float* q, const float* k, const float* v,
                                                 const int* cu_seqlens, const int* tile_seq,
                                                 const int* tile_start, float* out, float* lse,
                                                 int hq, int hkv, int head_dim, float scale) {
    extern __shared__ float smem[];
    int D = head_dim;
    float* Qs = smem;
    float* Ks = Qs + TILE * D;
    float* Vs = Ks + TILE * D;
    float* Os = Vs + TILE * D;
    float* S = Os + TILE * D;
    float* m = S + TILE * TILE;
    float* l = m + TILE;
    float* corr = l + TILE;
    int tile = blockIdx.x, h = blockIdx.y, kvh = h / (hq / hkv);
    int seq = tile_seq[tile], base = cu_seqlens[seq], len = cu_seqlens[seq + 1] - base;
    int q0 = tile_start[tile], nq = min(TILE, len - q0);
    for (int i = threadIdx.x; i < TILE * D; i += blockDim.x) {
        int r = i / D, d = i % D;
        Qs[i] = r < nq ? q[((long long)(base + q0 + r) * hq + h) * D + d] : 0.0f;
        Os[i] = 0.0f;
    }
    if (threadIdx.x < TILE) {
        m[threadIdx.x] = -INFINITY;
        l[threadIdx.x] = 0.0f;
    }
    __syncthreads();
    int keys = q0 + nq;  // causal: the last query sees keys 0..q0+nq-1
    for (int k0 = 0; k0 < keys; k0 += TILE) {
        int nk = min(TILE, keys - k0);
        for (int i = threadIdx.x; i < TILE * D; i += blockDim.x) {
            int r = i / D, d = i % D;
            long long src = ((long long)(base + k0 + r) * hkv + kvh) * D + d;
            Ks[i] = r < nk ? k[src] : 0.0f;
            Vs[i] = r < nk ? v[src] : 0.0f;
        }
        __syncthreads();
        for (int e = threadIdx.x; e < TILE * TILE; e += blockDim.x) {
            int i = e / TILE, j = e % TILE;
            float s = -INFINITY;
            if (i < nq && j < nk && k0 + j <= q0 + i) {
                s = 0.0f;
                for (int d = 0; d < D; ++d) s += Qs[i * D + d] * Ks[j * D + d];
                s *= scale;
            }
            S[e] = s;
        }
        __syncthreads();
        if (threadIdx.x < TILE) {
            int i = threadIdx.x;
            float mx = m[i];
            for (int j = 0; j < TILE; ++j) mx = fmaxf(mx, S[i * TILE + j]);
            float c = (mx == -INFINITY) ? 1.0f : expf(m[i] - mx);
            float sum = 0.0f;
            for (int j = 0; j < TILE; ++j) {
                float p = (S[i * TILE + j] == -INFINITY) ? 0.0f : expf(S[i * TILE + j] - mx);
                S[i * TILE + j] = p;
                sum += p;
            }
            l[i] = l[i] * c + sum;
            m[i] = mx;
            corr[i] = c;
        }
        __syncthreads();
        for (int e = threadIdx.x; e < TILE * D; e += blockDim.x) {
            int i = e / D, d = e % D;
            float o = Os[e] * corr[i];
            for (int j = 0; j < TILE; ++j) o += S[i * TILE + j] * Vs[j * D + d];
            Os[e] = o;
        }
        __syncthreads();
    }
    for (int e = threadIdx.x; e < nq * D; e += blockDim.x) {
        int i = e / D, d = e % D;
        out[((long long)(base + q0 + i) * hq + h) * D + d] = l[i] > 0.0f ? Os[e] / l[i] : 0.0f;
    }
    if (threadIdx.x < nq) {
        int i = threadIdx.x;
        lse[(long long)(base + q0 + i) * hq + h] = m[i] + logf(l[i]);
    }
}

// delta[t, h] = Σ_d dO · O, the row term of the softmax backward.
extern "C" __global__ void attention_bwd_delta(const float* out, const float* d_out, float* delta,
                                               int rows, int head_dim) {
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;
    float s = 0.0f;
    for (int d = threadIdx.x & 31; d < head_dim; d += 32)
        s += out[(long long)r * head_dim + d] * d_out[(long long)r * head_dim + d];
    s = warp_sum(s);
    if ((threadIdx.x & 31) == 0) delta[r] = s;
}

// One block per (key tile, query head): K, V of the tile stay in shared memory while query
// tiles from the diagonal on stream through. Dynamic shared memory: K, V, dK, dV, Q, dO tiles
// [TILE][head_dim], P and dS [TILE][TILE], lse and delta [TILE].
extern "C" __global__ void attention_prefill_bwd(const float* q, const float* k, const float* v,
                                                 const float* d_out, const float* lse,
                                                 const float* delta, const int* cu_seqlens,
                                                 const int* tile_seq, const int* tile_start,
                                                 float* dq, float* dk, float* dv, int hq,
                                                 int hkv, int head_dim, float scale) {
    extern __shared__ float smem[];
    int D = head_dim;
    float* Ks = smem;
    float* Vs = Ks + TILE * D;
    float* dKs = Vs + TILE * D;
    float* dVs = dKs + TILE * D;
    float* Qs = dVs + TILE * D;
    float* dOs = Qs + TILE * D;
    float* P = dOs + TILE * D;
    float* dS = P + TILE * TILE;
    float* L = dS + TILE * TILE;
    float* Dl = L + TILE;
    int tile = blockIdx.x, h = blockIdx.y, kvh = h / (hq / hkv);
    int seq = tile_seq[tile], base = cu_seqlens[seq], len = cu_seqlens[seq + 1] - base;
    int k0 = tile_start[tile], nk = min(TILE, len - k0);
    for (int i = threadIdx.x; i < TILE * D; i += blockDim.x) {
        int r = i / D, d = i % D;
        long long src = ((long long)(base + k0 + r) * hkv + kvh) * D + d;
        Ks[i] = r < nk ? k[src] : 0.0f;
        Vs[i] = r < nk ? v[src] : 0.0f;
        dKs[i] = 0.0f;
        dVs[i] = 0.0f;
    }
    __syncthreads();
    for (int q0 = (k0 / TILE) * TILE; q0 < len; q0 += TILE) {
        int nq = min(TILE, len - q0);
        for (int i = threadIdx.x; i < TILE * D; i += blockDim.x) {
            int r = i / D, d = i % D;
            long long src = ((long long)(base + q0 + r) * hq + h) * D + d;
            Qs[i] = r < nq ? q[src] : 0.0f;
            dOs[i] = r < nq ? d_out[src] : 0.0f;
        }
        if (threadIdx.x < TILE) {
            int r = threadIdx.x;
            long long row = (long long)(base + q0 + r) * hq + h;
            L[r] = r < nq ? lse[row] : 0.0f;
            Dl[r] = r < nq ? delta[row] : 0.0f;
        }
        __syncthreads();
        // P = exp(S − lse) on the causal part; dP = dO · V; dS = P (dP − delta).
        for (int e = threadIdx.x; e < TILE * TILE; e += blockDim.x) {
            int i = e / TILE, j = e % TILE;  // i: query row, j: key row
            float p = 0.0f, ds = 0.0f;
            if (i < nq && j < nk && k0 + j <= q0 + i) {
                float s = 0.0f, dp = 0.0f;
                for (int d = 0; d < D; ++d) {
                    s += Qs[i * D + d] * Ks[j * D + d];
                    dp += dOs[i * D + d] * Vs[j * D + d];
                }
                p = expf(s * scale - L[i]);
                ds = p * (dp - Dl[i]);
            }
            P[e] = p;
            dS[e] = ds;
        }
        __syncthreads();
        // dV_j += Σ_i P_ij dO_i;  dK_j += scale Σ_i dS_ij Q_i
        for (int e = threadIdx.x; e < TILE * D; e += blockDim.x) {
            int j = e / D, d = e % D;
            float a = 0.0f, b = 0.0f;
            for (int i = 0; i < TILE; ++i) {
                a += P[i * TILE + j] * dOs[i * D + d];
                b += dS[i * TILE + j] * Qs[i * D + d];
            }
            dVs[e] += a;
            dKs[e] += scale * b;
        }
        // dQ_i += scale Σ_j dS_ij K_j
        for (int e = threadIdx.x; e < nq * D; e += blockDim.x) {
            int i = e / D, d = e % D;
            float a = 0.0f;
            for (int j = 0; j < TILE; ++j) a += dS[i * TILE + j] * Ks[j * D + d];
            atomicAdd(dq + ((long long)(base + q0 + i) * hq + h) * D + d, scale * a);
        }
        __syncthreads();
    }
    for (int e = threadIdx.x; e < nk * D; e += blockDim.x) {
        int j = e / D, d = e % D;
        long long dst = ((long long)(base + k0 + j) * hkv + kvh) * D + d;
        atomicAdd(dk + dst, dKs[e]);
        atomicAdd(dv + dst, dVs[e]);
    }
}
