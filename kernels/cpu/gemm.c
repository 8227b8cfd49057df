/* Batch-invariant GEMM for the CPU: y[m, n] = sum_k x[m, k] * w[n, k].
 *
 * Why our own: the library GEMMs (MKL, oneDNN) pick their kernel and blocking from M, so a row's
 * bits depend on how many other rows share the call. Here every output element is reduced in one
 * fixed order, whatever M is and whichever tile computes it:
 *   - 8 fp32 lanes, lane j accumulates k = j, j+8, j+16, ... with fused multiply-add, in k order;
 *   - the K % 8 tail is added to lane 0.. in k order after the vector loop;
 *   - lanes are summed in one fixed tree: ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)).
 * Tiles (up to 4 rows of x by 4 rows of w) only decide which elements are computed together, never
 * the order inside one element, so edge tiles give the same bits as full ones. Threads split the
 * output columns; that never touches an element's order either.
 *
 * Inputs are fp32 or bf16 (bf16 widened exactly to fp32); accumulation is fp32; the output is fp32
 * and the caller rounds it once, as the library kernels do. Compiled without -ffast-math and with
 * -ffp-contract=off: the compiler may not reassociate or contract anything behind our back.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define MR 4
#define NR 4

static inline __m256 load8_f32(const void *p, int64_t i) { return _mm256_loadu_ps((const float *)p + i); }

static inline __m256 load8_bf16(const void *p, int64_t i) {
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float scalar_f32(const void *p, int64_t i) { return ((const float *)p)[i]; }

static inline float scalar_bf16(const void *p, int64_t i) {
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float hsum_fixed(__m256 v) {
    float l[8];
    _mm256_storeu_ps(l, v);
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

/* One tile of mr x nr elements; every element takes the same path as in any other tile. */
#define DEFINE_TILE(NAME, LOAD, SCALAR)                                                           \
static inline __attribute__((always_inline)) void NAME(const void *x, int64_t ldx, const void *w, int64_t ldw, float *y, int64_t ldy,   \
                 int64_t K, int mr, int nr) {                                                     \
    __m256 acc[MR][NR];                                                                           \
    for (int i = 0; i < MR; i++)                                                                  \
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();                             \
    const int64_t K8 = K - K % 8;                                                                 \
    for (int64_t k = 0; k < K8; k += 8) {                                                         \
        __m256 wv[NR], xv;                                                                        \
        for (int j = 0; j < nr; j++) wv[j] = LOAD(w, j * ldw + k);                                \
        for (int i = 0; i < mr; i++) {                                                            \
            xv = LOAD(x, i * ldx + k);                                                            \
            for (int j = 0; j < nr; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);      \
        }                                                                                         \
    }                                                                                             \
    for (int i = 0; i < mr; i++)                                                                  \
        for (int j = 0; j < nr; j++) {                                                            \
            float lanes[8];                                                                       \
            _mm256_storeu_ps(lanes, acc[i][j]);                                                   \
            for (int64_t k = K8; k < K; k++)                                                      \
                lanes[k - K8] = __builtin_fmaf(SCALAR(x, i * ldx + k), SCALAR(w, j * ldw + k),   \
                                               lanes[k - K8]);                                    \
            y[i * ldy + j] = hsum_fixed(_mm256_loadu_ps(lanes));                                  \
        }                                                                                         \
}

DEFINE_TILE(tile_f32, load8_f32, scalar_f32)
DEFINE_TILE(tile_bf16, load8_bf16, scalar_bf16)

/* Column block of weights kept hot in cache while all rows of x stream past it. */
#define NB 64

/* dtype: 0 = fp32, 1 = bf16 (x and w share it). x is M x K (row stride ldx), w is N x K
 * (row stride ldw), y is M x N fp32 (row stride ldy). Returns 0, or -1 on a bad argument. */
int invariant_gemm(int dtype, const void *x, int64_t ldx, const void *w, int64_t ldw, float *y,
                   int64_t ldy, int64_t M, int64_t N, int64_t K, int threads) {
    if (M < 0 || N < 0 || K < 0 || (dtype != 0 && dtype != 1)) return -1;
    const int64_t esz = dtype == 0 ? 4 : 2;
    const int64_t nblocks = (N + NB - 1) / NB;
    if (threads < 1) threads = 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && nblocks > 1)
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t n0 = b * NB, n1 = n0 + NB < N ? n0 + NB : N;
        for (int64_t m = 0; m < M; m += MR) {
            const int mr = (int)(M - m < MR ? M - m : MR);
            for (int64_t n = n0; n < n1; n += NR) {
                const int nr = (int)(n1 - n < NR ? n1 - n : NR);
                const char *xp = (const char *)x + m * ldx * esz;
                const char *wp = (const char *)w + n * ldw * esz;
                float *yp = y + m * ldy + n;
                /* The full tile is a separate call with constant sizes so that it is unrolled and
                 * kept in registers; its per-element operations are the edge tiles' exactly. */
                if (dtype == 0) {
                    if (mr == MR && nr == NR) tile_f32(xp, ldx, wp, ldw, yp, ldy, K, MR, NR);
                    else tile_f32(xp, ldx, wp, ldw, yp, ldy, K, mr, nr);
                } else {
                    if (mr == MR && nr == NR) tile_bf16(xp, ldx, wp, ldw, yp, ldy, K, MR, NR);
                    else tile_bf16(xp, ldx, wp, ldw, yp, ldy, K, mr, nr);
                }
            }
        }
    }
    return 0;
}
