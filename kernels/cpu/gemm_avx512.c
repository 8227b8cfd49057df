/* Batch-invariant GEMM, AVX-512 path: y[m, n] = sum_k x[m, k] * w[n, k].
 *
 * Same contract as gemm.c (the AVX2 path), other arithmetic, so other bits and another fingerprint
 * (native.py names the path). Vectorised over output columns, not over k: each of the 16 lanes of
 * an accumulator is one output element, and it adds its products one after another in k order -
 *   - bf16: one VDPBF16PS per k pair (AVX512_BF16: the pair (k, k+1) of bf16 products added to the
 *     fp32 accumulator, denormals flushed), pairs in k order; an odd K's last pair is (x, 0);
 *   - fp32: one fused multiply-add per k, in k order;
 * so there is no horizontal sum at all, and an element's sequence of operations is the same whatever
 * M is, whichever tile row it sits in, whichever thread computes it.
 * The weights are packed once per tensor (gemm.py): 64-column blocks, k (or k pairs) outermost inside
 * a block, zero-padded to 64 columns; columns past N are never stored.
 * Compiled without fast-math and with -ffp-contract=off (native.py).
 */
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#ifndef MR
#define MR 4 /* rows of x per tile: 4 x 4 accumulators + 4 weight vectors + 1 broadcast (measured best of 2x8..12x2) */
#endif
#ifndef NV
#define NV 4 /* 16-lane vectors per block: 64 columns */
#endif
#define NBLK (16 * NV)

/* fp32 -> bf16, round to nearest even, NaN -> 0x7FC0: torch's conversion, so the output rounding is
 * the one the other paths get from torch. */
static inline __m256i to_bf16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
}

/* One row of a tile: + bias (fp32), then fp32 out, or rounded once to bf16 out. */
typedef struct {
    void *y;
    int64_t ldy;
    const float *bias; /* NULL: none; else N fp32 values */
    int bf16;          /* output dtype: 0 fp32, 1 bf16 */
} out_t;

static inline void store_row(const out_t *o, int64_t row, int64_t n0, const __m512 *acc, int64_t ncols) {
    for (int v = 0; v < NV; v++) {
        const int64_t left = ncols - 16 * v;
        if (left <= 0) return;
        const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        const int64_t n = n0 + 16 * v;
        __m512 val = acc[v];
        if (o->bias) val = _mm512_add_ps(val, _mm512_maskz_loadu_ps(m, o->bias + n));
        if (o->bf16)
            _mm256_mask_storeu_epi16((uint16_t *)o->y + row * o->ldy + n, m, to_bf16(val));
        else
            _mm512_mask_storeu_ps((float *)o->y + row * o->ldy + n, m, val);
    }
}

/* x rows (bf16, row stride ldx), one packed block wb = [Kp/2][64][2] bf16. */
static inline __attribute__((always_inline)) void tile_bf16(const uint16_t *x, int64_t ldx, const uint16_t *wb,
                                                           int64_t K, const out_t *o, int64_t m0, int64_t n0,
                                                           int64_t ncols, int mr) {
    __m512 acc[MR][NV];
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = _mm512_setzero_ps();
    const int64_t KP = K / 2;
    for (int64_t p = 0; p < KP; p++) {
        const uint16_t *wp = wb + p * NBLK * 2;
        __m512i wv[NV];
        for (int v = 0; v < NV; v++) wv[v] = _mm512_loadu_si512((const void *)(wp + 32 * v));
        for (int i = 0; i < mr; i++) {
            int32_t pair;
            memcpy(&pair, x + i * ldx + 2 * p, sizeof pair);
            const __m512i xv = _mm512_set1_epi32(pair);
            for (int v = 0; v < NV; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)xv, (__m512bh)wv[v]);
        }
    }
    if (K % 2) {
        const uint16_t *wp = wb + KP * NBLK * 2;
        __m512i wv[NV];
        for (int v = 0; v < NV; v++) wv[v] = _mm512_loadu_si512((const void *)(wp + 32 * v));
        for (int i = 0; i < mr; i++) {
            const __m512i xv = _mm512_set1_epi32((int32_t)x[i * ldx + K - 1]); /* (x[K-1], 0) */
            for (int v = 0; v < NV; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)xv, (__m512bh)wv[v]);
        }
    }
    for (int i = 0; i < mr; i++) store_row(o, m0 + i, n0, acc[i], ncols);
}

/* x rows (fp32), one packed block wb = [K][64] fp32. */
static inline __attribute__((always_inline)) void tile_f32(const float *x, int64_t ldx, const float *wb, int64_t K,
                                                          const out_t *o, int64_t m0, int64_t n0, int64_t ncols,
                                                          int mr) {
    __m512 acc[MR][NV];
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const float *wp = wb + k * NBLK;
        __m512 wv[NV];
        for (int v = 0; v < NV; v++) wv[v] = _mm512_loadu_ps(wp + 16 * v);
        for (int i = 0; i < mr; i++) {
            const __m512 xv = _mm512_set1_ps(x[i * ldx + k]);
            for (int v = 0; v < NV; v++) acc[i][v] = _mm512_fmadd_ps(xv, wv[v], acc[i][v]);
        }
    }
    for (int i = 0; i < mr; i++) store_row(o, m0 + i, n0, acc[i], ncols);
}

/* dtype 0 = fp32, 1 = bf16. x: M x K (row stride ldx); wp: packed weights (gemm.py pack_avx512) of
 * ceil(N / 64) blocks; bias: NULL or N fp32; y: M x N (row stride ldy), fp32 or (out_bf16) bf16, the
 * sum plus bias rounded once. Needs AVX512F/BW/VL and, for bf16, AVX512_BF16: the caller (native.py)
 * chooses this path only on such a CPU. Returns 0, or -1 on a bad argument. */
int invariant_gemm_avx512(int dtype, const void *x, int64_t ldx, const void *wp, const float *bias, void *y,
                          int64_t ldy, int out_bf16, int64_t M, int64_t N, int64_t K, int threads) {
    if (M < 0 || N < 0 || K < 0 || (dtype != 0 && dtype != 1)) return -1;
    const int64_t nblocks = (N + NBLK - 1) / NBLK;
    const int64_t block_elems = (dtype == 1 ? (K + 1) / 2 * 2 : K) * NBLK;
    const out_t o = {y, ldy, bias, out_bf16 != 0};
    if (threads < 1) threads = 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && nblocks > 1)
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t n0 = b * NBLK, ncols = N - n0 < NBLK ? N - n0 : NBLK;
        for (int64_t m = 0; m < M; m += MR) {
            const int mr = (int)(M - m < MR ? M - m : MR);
            if (dtype == 1) {
                const uint16_t *xp = (const uint16_t *)x + m * ldx, *wb = (const uint16_t *)wp + b * block_elems;
                if (mr == MR) tile_bf16(xp, ldx, wb, K, &o, m, n0, ncols, MR);
                else tile_bf16(xp, ldx, wb, K, &o, m, n0, ncols, mr);
            } else {
                const float *xp = (const float *)x + m * ldx, *wb = (const float *)wp + b * block_elems;
                if (mr == MR) tile_f32(xp, ldx, wb, K, &o, m, n0, ncols, MR);
                else tile_f32(xp, ldx, wb, K, &o, m, n0, ncols, mr);
            }
        }
    }
    return 0;
}
#pragma GCC pop_options
