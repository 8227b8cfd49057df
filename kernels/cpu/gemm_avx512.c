/* Batch-invariant GEMM, AVX-512 path: y[m, n] = sum_k x[m, k] * w[n, k].
 *
 * Same contract as gemm.c (the AVX2 path), other arithmetic, so other bits and another fingerprint
 * (native.py names the path). Every output element is reduced in one fixed order whatever M is and
 * whichever tile computes it:
 *   - bf16: 16 fp32 lanes; for each 32-wide block of k in order, lane j adds the pair
 *     (k0 + 2j, k0 + 2j + 1) with one VDPBF16PS (AVX512_BF16: bf16 products, fp32 accumulate,
 *     denormals flushed); the K % 32 tail is the same instruction on zero-padded loads;
 *   - fp32: 16 fp32 lanes, lane j takes k = j, j+16, ... with fused multiply-add, in k order; the
 *     K % 16 tail is the same FMA on zero-padded loads (adding 0 * 0 leaves a lane as it was);
 *   - lanes summed in one fixed tree (below).
 * Tiles (up to 4 rows of x by 4 rows of w) decide which elements are computed together, never the
 * order inside one. Threads split the output columns. Compiled without fast-math and with
 * -ffp-contract=off (native.py).
 */
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#include <immintrin.h>
#include <stdint.h>

#ifndef MR
#define MR 4
#endif
#ifndef NR
#define NR 4
#endif
#define NB 64

/* The 16 lanes summed in one fixed tree, ((l0+l8)+(l4+l12)) + ((l2+l10)+(l6+l14)) for the even lanes,
 * the same for the odd ones, then the two: done with shuffles (lane-wise adds, the same tree for
 * every element), not 15 scalar adds. IEEE addition commutes exactly, so only the tree matters. */
static inline float hsum16_fixed(__m512 v) {
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E));  /* lane i += lane i^8  (256-bit halves) */
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));  /* lane i += lane i^4  (128-bit quarters) */
    v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4E));        /* lane i += lane i^2 */
    v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1));        /* lane i += lane i^1 */
    return _mm512_cvtss_f32(v);
}

static inline __attribute__((always_inline)) void tile_bf16_512(const uint16_t *x, int64_t ldx, const uint16_t *w,
                                                               int64_t ldw, float *y, int64_t ldy, int64_t K,
                                                               int mr, int nr) {
    __m512 acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    const int64_t K32 = K - K % 32;
    for (int64_t k = 0; k < K32; k += 32) {
        __m512i wv[NR];
        for (int j = 0; j < nr; j++) wv[j] = _mm512_loadu_si512((const void *)(w + j * ldw + k));
        for (int i = 0; i < mr; i++) {
            __m512i xv = _mm512_loadu_si512((const void *)(x + i * ldx + k));
            for (int j = 0; j < nr; j++)
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv, (__m512bh)wv[j]);
        }
    }
    if (K32 < K) {
        const __mmask32 m = (__mmask32)((1ull << (K - K32)) - 1);
        __m512i wv[NR];
        for (int j = 0; j < nr; j++) wv[j] = _mm512_maskz_loadu_epi16(m, w + j * ldw + K32);
        for (int i = 0; i < mr; i++) {
            __m512i xv = _mm512_maskz_loadu_epi16(m, x + i * ldx + K32);
            for (int j = 0; j < nr; j++)
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv, (__m512bh)wv[j]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) y[i * ldy + j] = hsum16_fixed(acc[i][j]);
}

static inline __attribute__((always_inline)) void tile_f32_512(const float *x, int64_t ldx, const float *w,
                                                              int64_t ldw, float *y, int64_t ldy, int64_t K,
                                                              int mr, int nr) {
    __m512 acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    const int64_t K16 = K - K % 16;
    for (int64_t k = 0; k < K16; k += 16) {
        __m512 wv[NR];
        for (int j = 0; j < nr; j++) wv[j] = _mm512_loadu_ps(w + j * ldw + k);
        for (int i = 0; i < mr; i++) {
            __m512 xv = _mm512_loadu_ps(x + i * ldx + k);
            for (int j = 0; j < nr; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    if (K16 < K) {
        const __mmask16 m = (__mmask16)((1u << (K - K16)) - 1);
        __m512 wv[NR];
        for (int j = 0; j < nr; j++) wv[j] = _mm512_maskz_loadu_ps(m, w + j * ldw + K16);
        for (int i = 0; i < mr; i++) {
            __m512 xv = _mm512_maskz_loadu_ps(m, x + i * ldx + K16);
            for (int j = 0; j < nr; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) y[i * ldy + j] = hsum16_fixed(acc[i][j]);
}

/* Arguments as invariant_gemm (gemm.c). Needs AVX512F/BW/VL and, for bf16, AVX512_BF16: the
 * caller (native.py) chooses this path only on such a CPU. */
int invariant_gemm_avx512(int dtype, const void *x, int64_t ldx, const void *w, int64_t ldw, float *y,
                          int64_t ldy, int64_t M, int64_t N, int64_t K, int threads) {
    if (M < 0 || N < 0 || K < 0 || (dtype != 0 && dtype != 1)) return -1;
    const int64_t nblocks = (N + NB - 1) / NB;
    if (threads < 1) threads = 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && nblocks > 1)
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t n0 = b * NB, n1 = n0 + NB < N ? n0 + NB : N;
        for (int64_t m = 0; m < M; m += MR) {
            const int mr = (int)(M - m < MR ? M - m : MR);
            for (int64_t n = n0; n < n1; n += NR) {
                const int nr = (int)(n1 - n < NR ? n1 - n : NR);
                float *yp = y + m * ldy + n;
                if (dtype == 0) {
                    const float *xp = (const float *)x + m * ldx, *wp = (const float *)w + n * ldw;
                    if (mr == MR && nr == NR) tile_f32_512(xp, ldx, wp, ldw, yp, ldy, K, MR, NR);
                    else tile_f32_512(xp, ldx, wp, ldw, yp, ldy, K, mr, nr);
                } else {
                    const uint16_t *xp = (const uint16_t *)x + m * ldx, *wp = (const uint16_t *)w + n * ldw;
                    if (mr == MR && nr == NR) tile_bf16_512(xp, ldx, wp, ldw, yp, ldy, K, MR, NR);
                    else tile_bf16_512(xp, ldx, wp, ldw, yp, ldy, K, mr, nr);
                }
            }
        }
    }
    return 0;
}
#pragma GCC pop_options
