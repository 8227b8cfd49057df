/* Batch-invariant GEMM, AMX-BF16 path: y[m, n] = sum_k x[m, k] * w[n, k], bf16 in, fp32 out.
 *
 * Same contract as gemm.c and gemm_avx512.c, other arithmetic (other bits, another fingerprint):
 * every output element is reduced in one fixed order whatever M is and whichever tile computes it.
 *   - K is cut into 32-wide chunks, taken in k order; each chunk is one TDPBF16PS into the element's
 *     fp32 accumulator (the instruction's own order over the chunk's 16 bf16 pairs is fixed by the
 *     hardware and does not depend on the tile's row count or position);
 *   - K % 32 is zero-padded by the caller (x) and by the packing (w): 0 * 0 added leaves an
 *     accumulator as it was.
 * Tiles (16 rows of x by 16 columns of w) only decide which elements are computed together. Rows of
 * a tile beyond M are not configured (fewer tile rows), columns beyond N are packed as zeros and
 * never stored. Threads split the output columns.
 *
 * w is packed once per layer (gemm.py, pack_amx): block j of 16 output columns and chunk c of 32 k
 * is one 1 KiB B tile, row r holding (w[n0+n][k0+2r], w[n0+n][k0+2r+1]) for n = 0..15.
 * The caller must have asked Linux for the AMX tile state first (amx.py).
 */
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f")
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* tmm0, tmm1: C for two column blocks; tmm2: A; tmm3, tmm4: B for the two blocks. */
static void configure(int mr) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 5; t++) cfg.colsb[t] = 64;
    cfg.rows[0] = cfg.rows[1] = cfg.rows[2] = (uint8_t)mr;
    cfg.rows[3] = cfg.rows[4] = 16;
    _tile_loadconfig(&cfg);
}

static void store_block(const float *c, int mr, int ncols, float *y, int64_t ldy) {
    for (int i = 0; i < mr; i++) memcpy(y + i * ldy, c + i * 16, (size_t)ncols * sizeof(float));
}

/* x: M x Kp bf16 (row stride ldx, Kp = K rounded up to 32, zero-padded); wp: packed weights of
 * NB16 = ceil(N / 16) blocks x KC = Kp / 32 chunks; y: M x N fp32 (row stride ldy). */
int invariant_gemm_amx(const uint16_t *x, int64_t ldx, const uint16_t *wp, float *y, int64_t ldy, int64_t M,
                       int64_t N, int64_t Kp, int threads) {
    if (M < 0 || N < 0 || Kp < 0 || Kp % 32 != 0) return -1;
    const int64_t KC = Kp / 32, NB16 = (N + 15) / 16, pairs = (NB16 + 1) / 2;
    const int64_t tile_elems = 16 * 32; /* bf16 per B tile */
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) if (threads > 1 && pairs > 1)
    {
        float c0[16 * 16], c1[16 * 16];
        int configured = -1;
#pragma omp for schedule(static)
        for (int64_t p = 0; p < pairs; p++) {
            const int64_t j0 = 2 * p, j1 = j0 + 1;
            const int two = j1 < NB16;
            const uint16_t *b0 = wp + j0 * KC * tile_elems, *b1 = wp + j1 * KC * tile_elems;
            for (int64_t m = 0; m < M; m += 16) {
                const int mr = (int)(M - m < 16 ? M - m : 16);
                if (mr != configured) {
                    configure(mr);
                    configured = mr;
                }
                _tile_zero(0);
                _tile_zero(1);
                const uint16_t *a = x + m * ldx;
                for (int64_t c = 0; c < KC; c++) {
                    _tile_loadd(2, a + c * 32, ldx * 2);
                    _tile_loadd(3, b0 + c * tile_elems, 64);
                    _tile_dpbf16ps(0, 2, 3);
                    if (two) {
                        _tile_loadd(4, b1 + c * tile_elems, 64);
                        _tile_dpbf16ps(1, 2, 4);
                    }
                }
                _tile_stored(0, c0, 64);
                const int64_t n0 = j0 * 16;
                store_block(c0, mr, (int)(N - n0 < 16 ? N - n0 : 16), y + m * ldy + n0, ldy);
                if (two) {
                    _tile_stored(1, c1, 64);
                    const int64_t n1 = j1 * 16;
                    store_block(c1, mr, (int)(N - n1 < 16 ? N - n1 : 16), y + m * ldy + n1, ldy);
                }
            }
        }
        if (configured != -1) _tile_release();
    }
    return 0;
}
#pragma GCC pop_options
