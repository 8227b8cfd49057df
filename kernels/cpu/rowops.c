/* Batch-invariant row reductions for the CPU: RMSNorm (and fused add + RMSNorm), softmax,
 * log_softmax and mean over the last dimension.
 *
 * Each row is reduced by one thread in one fixed order (8 fp32 lanes over the row, lane j taking
 * elements j, j+8, ...; the tail in order into lanes 0..; lanes summed in a fixed tree), so a row's
 * bits never depend on how many rows there are or which thread takes it. Threads split rows only.
 * max is exact in any order; exp and log come from the C library, elementwise.
 * Compiled with -ffp-contract=off and no fast-math (see native.py).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as torch converts fp32 to bf16 (NaN stays a quiet NaN). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float load(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store(void *p, int bf16, int64_t i, float v) {
    if (bf16) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

static inline float lanes_sum(const float l[8]) {
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

/* sum of squares of a row (fp32 values in buf), fixed order */
static float sumsq(const float *v, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t n8 = n - n % 8;
    for (int64_t i = 0; i < n8; i += 8) {
        __m256 x = _mm256_loadu_ps(v + i);
        acc = _mm256_fmadd_ps(x, x, acc);
    }
    float l[8];
    _mm256_storeu_ps(l, acc);
    for (int64_t i = n8; i < n; i++) l[i - n8] = fmaf(v[i], v[i], l[i - n8]);
    return lanes_sum(l);
}

static float sum(const float *v, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t n8 = n - n % 8;
    for (int64_t i = 0; i < n8; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(v + i));
    float l[8];
    _mm256_storeu_ps(l, acc);
    for (int64_t i = n8; i < n; i++) l[i - n8] += v[i];
    return lanes_sum(l);
}

/* out = rmsnorm(x (+ residual)) * weight, computed like vLLM's native path: the sum in fp32,
 * normalised in fp32, rounded to the input dtype, then multiplied by the weight in that dtype.
 * With residual != NULL, residual is overwritten with x + residual (rounded to the dtype), as
 * vLLM's fused op does. weight may be NULL. Rows have stride ld (elements); H <= 65536. */
int invariant_rms_norm(int bf16, const void *x, void *residual, const void *weight, void *out,
                       int64_t rows, int64_t H, int64_t ld_x, int64_t ld_res, int64_t ld_out,
                       float eps, int threads) {
    if (rows < 0 || H <= 0 || H > 65536) return -1;
    if (threads < 1) threads = 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        float buf[65536];
        for (int64_t i = 0; i < H; i++) {
            float v = load(x, bf16, r * ld_x + i);
            if (residual) {
                v = v + load(residual, bf16, r * ld_res + i);
                store(residual, bf16, r * ld_res + i, v);
                v = load(residual, bf16, r * ld_res + i); /* the rounded sum, as vLLM normalises */
            }
            buf[i] = v;
        }
        const float inv = 1.0f / sqrtf(sumsq(buf, H) / (float)H + eps);
        for (int64_t i = 0; i < H; i++) {
            float v = buf[i] * inv;
            if (weight) {
                if (bf16) v = bf16_to_f32(f32_to_bf16(v)) * load(weight, bf16, i);
                else v = v * load(weight, bf16, i);
            }
            store(out, bf16, r * ld_out + i, v);
        }
    }
    return 0;
}

/* Row softmax (log = 0) or log_softmax (log = 1) of x (fp32 or bf16) into fp32 out. */
int invariant_softmax(int bf16, const void *x, float *out, int64_t rows, int64_t V, int64_t ld_x,
                      int64_t ld_out, int log, int threads) {
    if (rows < 0 || V <= 0) return -1;
    if (threads < 1) threads = 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        float *o = out + r * ld_out;
        float mx = -INFINITY;
        for (int64_t i = 0; i < V; i++) {
            o[i] = load(x, bf16, r * ld_x + i);
            if (o[i] > mx) mx = o[i];
        }
        if (mx == -INFINITY) mx = 0.0f; /* all masked: keep -inf / nan semantics of torch */
        for (int64_t i = 0; i < V; i++) o[i] = o[i] - mx;
        float *e = o; /* exp values are summed from a second pass to keep o for log_softmax */
        if (log) {
            /* sum of exp without overwriting the shifted logits */
            __m256 acc = _mm256_setzero_ps();
            float l[8];
            int64_t v8 = V - V % 8;
            for (int64_t i = 0; i < v8; i += 8) {
                float t[8];
                for (int j = 0; j < 8; j++) t[j] = expf(o[i + j]);
                acc = _mm256_add_ps(acc, _mm256_loadu_ps(t));
            }
            _mm256_storeu_ps(l, acc);
            for (int64_t i = v8; i < V; i++) l[i - v8] += expf(o[i]);
            const float lse = logf(lanes_sum(l));
            for (int64_t i = 0; i < V; i++) o[i] = o[i] - lse;
        } else {
            for (int64_t i = 0; i < V; i++) e[i] = expf(o[i]);
            const float s = sum(e, V);
            for (int64_t i = 0; i < V; i++) e[i] = e[i] / s;
        }
    }
    return 0;
}

/* Row mean of x (fp32 or bf16) into fp32 out. */
int invariant_mean(int bf16, const void *x, float *out, int64_t rows, int64_t n, int64_t ld_x,
                   int threads) {
    if (rows < 0 || n <= 0) return -1;
    if (threads < 1) threads = 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        __m256 acc = _mm256_setzero_ps();
        float l[8];
        int64_t n8 = n - n % 8;
        for (int64_t i = 0; i < n8; i += 8) {
            float t[8];
            for (int j = 0; j < 8; j++) t[j] = load(x, bf16, r * ld_x + i + j);
            acc = _mm256_add_ps(acc, _mm256_loadu_ps(t));
        }
        _mm256_storeu_ps(l, acc);
        for (int64_t i = n8; i < n; i++) l[i - n8] += load(x, bf16, r * ld_x + i);
        out[r] = lanes_sum(l) / (float)n;
    }
    return 0;
}
