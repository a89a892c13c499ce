/* Quantized matmul on int8 activations: y[M, N] = x[M, K] @ W[N, K]^T (+ bias).
 *
 * x is first quantized per 32 values (lt_quantize_rows: int8 quants, a scale, and scaled sums
 * per 16 and 32 for the offset terms), as llama.cpp does for its CPU dot products. Every weight
 * is d * u + m (common.h), so for one group of G weights and its activations
 *     sum_i w_i x_i  ~  d * dx * sum_i u_i q_i  +  m * (dx * sum_i q_i)
 * where the first sum is exact integer arithmetic (AVX-512 VNNI vpdpbusd: 64 u8 x s8 products
 * per instruction) and the second is the precomputed sx. Grid: rows of W in chunks on the thread
 * pool; each chunk runs its rows against the activations 8 rows at a time, so a weight row is
 * read from memory once per call and reused from L1 across M.
 */
#include "common.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LT_VNNI 1
#include <immintrin.h>
#endif

#define NR 2 /* weight rows per kernel iteration: independent accumulator chains keep the FMA pipes busy */
#define PF 4 /* rows ahead to prefetch (a prefetch past the matrix end is harmless: it never faults) */

/* ---- activations -------------------------------------------------------------------------- */

typedef struct { const float *x; int64_t ldx, K; int8_t *qx; float *dx, *sx32, *sx16; } quant_args;

static void quant_task(void *ctx, int64_t b0, int64_t b1) {
    const quant_args *a = ctx;
    const int64_t nb = a->K / 32;
    int8_t *qx = a->qx;
    float *dx = a->dx, *sx32 = a->sx32, *sx16 = a->sx16;
    for (int64_t r = b0; r < b1; r++) { /* block r: row r / nb, block r % nb */
        const float *v = a->x + (r / nb) * a->ldx + (r % nb) * 32;
        int8_t *q = qx + r * 32;
        float amax = 0.f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(v[i]));
        const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
        int s0 = 0, s1 = 0;
        for (int i = 0; i < 32; i++) {
            const int qi = (int)nearbyintf(v[i] * id); /* round half to even, as torch.round */
            q[i] = (int8_t)qi;
            if (i < 16) s0 += qi; else s1 += qi;
        }
        dx[r] = d;
        sx16[2 * r] = d * (float)s0;
        sx16[2 * r + 1] = d * (float)s1;
        sx32[r] = d * (float)(s0 + s1);
    }
}

/* x [M, K] (row stride ldx) -> qx int8 [M, K], dx [M, K/32], sx32 [M, K/32], sx16 [M, K/16]. */
void lt_quantize_rows(const float *x, int64_t M, int64_t K, int64_t ldx, int8_t *qx, float *dx, float *sx32,
                      float *sx16) {
    quant_args a = {x, ldx, K, qx, dx, sx32, sx16};
    lt_parallel_for(M * (K / 32), 2048, quant_task, &a);
}

/* ---- weights ------------------------------------------------------------------------------ */

typedef struct {
    const uint8_t *qs;
    const void *d, *m;
    int f16, bits, group;
    int64_t N, K;
    const int8_t *qx;
    const float *dx, *sx32, *sx16;
    int64_t M;
    const float *bias;
    float *y;
} gemm_args;

static inline float scale_at(const void *p, int f16, int64_t i) {
    return f16 ? lt_f16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Unsigned quant i (0 .. K-1) of row `row` in either layout (the scalar path and tails). */
static inline int quant_at(const gemm_args *a, const uint8_t *row, int64_t i) {
    if (a->bits == 8) return row[i];
    const int64_t full = a->K / 128 * 128;
    if (i < full) {
        const int64_t c = i / 128, j = i % 128;
        const uint8_t b = row[c * 64 + (j & 63)];
        return j < 64 ? (b & 15) : (b >> 4);
    }
    const int64_t j = i - full;
    const uint8_t b = row[full / 2 + (j & 31)];
    return j < 32 ? (b & 15) : (b >> 4);
}

#ifndef LT_VNNI
static void rows_scalar(const gemm_args *a, int64_t n, int nr, int64_t m0, int mt, float *out) {
    const int G = a->group;
    const int64_t ng = a->K / G, rowbytes = a->bits == 8 ? a->K : a->K / 2;
    const float *sx = G == 32 ? a->sx32 : a->sx16;
    for (int r = 0; r < nr; r++) {
        const uint8_t *row = a->qs + (n + r) * rowbytes;
        for (int j = 0; j < mt; j++) {
            const int8_t *q = a->qx + (m0 + j) * a->K;
            const float *dx = a->dx + (m0 + j) * (a->K / 32);
            float acc = 0.f;
            for (int64_t g = 0; g < ng; g++) {
                int isum = 0;
                for (int i = 0; i < G; i++) isum += quant_at(a, row, g * G + i) * q[g * G + i];
                acc += scale_at(a->d, a->f16, (n + r) * ng + g) * dx[g * G / 32] * (float)isum
                       + scale_at(a->m, a->f16, (n + r) * ng + g) * sx[(m0 + j) * ng + g];
            }
            out[r * 8 + j] = acc;
        }
    }
}
#endif

#ifdef LT_VNNI
static inline __m128 load4(const void *p, int f16, int64_t i) {
    return f16 ? _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)((const uint16_t *)p + i)))
               : _mm_loadu_ps((const float *)p + i);
}

static inline __m128 load2(const void *p, int f16, int64_t i) {
    if (f16) {
        uint32_t v;
        memcpy(&v, (const uint16_t *)p + i, 4);
        return _mm_cvtph_ps(_mm_cvtsi32_si128((int)v));
    }
    return _mm_castpd_ps(_mm_load_sd((const double *)((const float *)p + i)));
}

static inline float hsum128(__m128 v) {
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
}

/* NR weight rows at once, each against activation rows m0..m0+mt. Offset terms ride along in
 * 128-bit accumulators: m[g] * sx[g]. */

/* 4-bit rows: a 64-byte load holds 128 weights (low nibbles: the first 64, high: the next 64). */
static inline __attribute__((always_inline)) void q4_body(const gemm_args *a, int64_t n, const int nr, int64_t m0,
                                                          const int mt, const int f16, __m512 *out) {
    const int64_t K = a->K, nb = K / 32, chunks = K / 128;
    const __m512i mask = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
    const __m512i lo_idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i hi_idx = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
    __m512 acc[NR][8];
    __m128 macc[NR][8];
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < mt; j++) { acc[r][j] = _mm512_setzero_ps(); macc[r][j] = _mm_setzero_ps(); }
    for (int64_t c = 0; c < chunks; c++) {
        __m512i lo[NR], hi[NR];
        __m128 dw[NR], mw[NR];
        for (int r = 0; r < nr; r++) { /* the same chunk PF rows ahead: DRAM latency hides behind this row */
            _mm_prefetch((const char *)(a->qs + (n + r + PF) * (K / 2) + c * 64), _MM_HINT_T0);
            const __m512i v = _mm512_loadu_si512(a->qs + (n + r) * (K / 2) + c * 64);
            lo[r] = _mm512_and_si512(v, mask);
            hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
            dw[r] = load4(a->d, f16, (n + r) * nb + 4 * c);
            mw[r] = load4(a->m, f16, (n + r) * nb + 4 * c);
        }
        for (int j = 0; j < mt; j++) {
            const int8_t *q = a->qx + (m0 + j) * K + c * 128;
            const __m512i q0 = _mm512_loadu_si512(q), q1 = _mm512_loadu_si512(q + 64);
            const __m128 dx = _mm_loadu_ps(a->dx + (m0 + j) * nb + 4 * c);
            const __m128 sx = _mm_loadu_ps(a->sx32 + (m0 + j) * nb + 4 * c);
            for (int r = 0; r < nr; r++) {
                const __m512 s = _mm512_castps128_ps512(_mm_mul_ps(dw[r], dx));
                const __m512i i0 = _mm512_dpbusd_epi32(zero, lo[r], q0), i1 = _mm512_dpbusd_epi32(zero, hi[r], q1);
                acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_permutexvar_ps(lo_idx, s), acc[r][j]);
                acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_permutexvar_ps(hi_idx, s), acc[r][j]);
                macc[r][j] = _mm_fmadd_ps(mw[r], sx, macc[r][j]);
            }
        }
    }
    if (K % 128) { /* a 64-weight tail: 32 bytes, low nibbles the first 32 weights, high the next */
        const int64_t base = chunks * 128;
        const __m256i m4 = _mm256_set1_epi8(15);
        for (int r = 0; r < nr; r++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(a->qs + (n + r) * (K / 2) + base / 2));
            const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m4)),
                                                 _mm256_and_si256(_mm256_srli_epi16(v, 4), m4), 1);
            const __m128 dw = load2(a->d, f16, (n + r) * nb + base / 32);
            const __m128 mw = load2(a->m, f16, (n + r) * nb + base / 32);
            for (int j = 0; j < mt; j++) {
                const int8_t *q = a->qx + (m0 + j) * K + base;
                const __m512i i0 = _mm512_dpbusd_epi32(zero, w, _mm512_loadu_si512(q));
                const float *dxp = a->dx + (m0 + j) * nb + base / 32, *sxp = a->sx32 + (m0 + j) * nb + base / 32;
                const __m512 s = _mm512_castps128_ps512(_mm_mul_ps(dw, _mm_setr_ps(dxp[0], dxp[1], 0.f, 0.f)));
                acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_permutexvar_ps(lo_idx, s), acc[r][j]);
                macc[r][j] = _mm_fmadd_ps(mw, _mm_setr_ps(sxp[0], sxp[1], 0.f, 0.f), macc[r][j]);
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < mt; j++) out[r * 8 + j] = _mm512_add_ps(acc[r][j], _mm512_zextps128_ps512(macc[r][j]));
}

/* 8-bit rows: a 64-byte load holds 64 weights in order: 2 groups of 32 or 4 of 16. */
static inline __attribute__((always_inline)) void q8_body(const gemm_args *a, int64_t n, const int nr, int64_t m0,
                                                          const int mt, const int f16, const int g16, __m512 *out) {
    const int64_t K = a->K, nb = K / 32, ng = K / (g16 ? 16 : 32), chunks = K / 64;
    const __m512i zero = _mm512_setzero_si512();
    const __m512i idx2 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i idx4 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m128i dup = _mm_set_epi32(1, 1, 0, 0);
    __m512 acc[NR][8];
    __m128 macc[NR][8];
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < mt; j++) { acc[r][j] = _mm512_setzero_ps(); macc[r][j] = _mm_setzero_ps(); }
    for (int64_t c = 0; c < chunks; c++) {
        __m512i v[NR];
        __m128 dw[NR], mw[NR];
        for (int r = 0; r < nr; r++) {
            _mm_prefetch((const char *)(a->qs + (n + r + PF) * K + c * 64), _MM_HINT_T0);
            v[r] = _mm512_loadu_si512(a->qs + (n + r) * K + c * 64);
            dw[r] = g16 ? load4(a->d, f16, (n + r) * ng + 4 * c) : load2(a->d, f16, (n + r) * ng + 2 * c);
            mw[r] = g16 ? load4(a->m, f16, (n + r) * ng + 4 * c) : load2(a->m, f16, (n + r) * ng + 2 * c);
        }
        for (int j = 0; j < mt; j++) {
            const __m512i q = _mm512_loadu_si512(a->qx + (m0 + j) * K + c * 64);
            __m128 dx = _mm_castpd_ps(_mm_load_sd((const double *)(a->dx + (m0 + j) * nb + 2 * c)));
            __m128 sx;
            if (g16) {
                dx = _mm_permutevar_ps(dx, dup); /* dx0 dx0 dx1 dx1: two groups of 16 per block */
                sx = _mm_loadu_ps(a->sx16 + (m0 + j) * ng + 4 * c);
            } else {
                sx = _mm_castpd_ps(_mm_load_sd((const double *)(a->sx32 + (m0 + j) * ng + 2 * c)));
            }
            for (int r = 0; r < nr; r++) {
                const __m512 s = _mm512_permutexvar_ps(g16 ? idx4 : idx2, _mm512_castps128_ps512(_mm_mul_ps(dw[r], dx)));
                acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, v[r], q)), s, acc[r][j]);
                macc[r][j] = _mm_fmadd_ps(mw[r], sx, macc[r][j]);
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < mt; j++) {
            float tail = 0.f;
            for (int64_t g = chunks * 64 / (g16 ? 16 : 32); g < ng; g++) { /* K % 64: one 32-weight group */
                const int8_t *q = a->qx + (m0 + j) * K + g * (g16 ? 16 : 32);
                const uint8_t *w = a->qs + (n + r) * K + g * (g16 ? 16 : 32);
                int isum = 0;
                for (int i = 0; i < (g16 ? 16 : 32); i++) isum += w[i] * q[i];
                tail += scale_at(a->d, f16, (n + r) * ng + g) * a->dx[(m0 + j) * nb + g * (g16 ? 16 : 32) / 32] * (float)isum
                        + scale_at(a->m, f16, (n + r) * ng + g) * (g16 ? a->sx16 : a->sx32)[(m0 + j) * ng + g];
            }
            out[r * 8 + j] = _mm512_add_ps(acc[r][j], _mm512_zextps128_ps512(_mm_add_ss(macc[r][j], _mm_set_ss(tail))));
        }
}
/* v[i] -> lane i of the result is the sum of v[i]'s 16 lanes (a transpose-and-add tree: ~3
 * instructions per row instead of ~8 for one reduction each). */
static inline __m512 reduce16(const __m512 *v) {
    __m512 t[8], u[4], w[2];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        const __m512d x = _mm512_castps_pd(t[2 * i]), y = _mm512_castps_pd(t[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++)
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

/* Instances with row counts, scale type and group size known at compile time: accumulators
 * stay in registers and the hot loop has no branches. Index: ((kind * 2 + f16) * 2 + nr - 1) * 8 + mt - 1,
 * kind 0: 4-bit, 1: 8-bit groups of 32, 2: 8-bit groups of 16. */
typedef void (*rows_fn)(const gemm_args *, int64_t, int64_t, __m512 *);
#define ROWS(X, K, F) X(K, F, 1, 1) X(K, F, 1, 2) X(K, F, 1, 3) X(K, F, 1, 4) X(K, F, 1, 5) X(K, F, 1, 6) \
    X(K, F, 1, 7) X(K, F, 1, 8) X(K, F, 2, 1) X(K, F, 2, 2) X(K, F, 2, 3) X(K, F, 2, 4) X(K, F, 2, 5)     \
    X(K, F, 2, 6) X(K, F, 2, 7) X(K, F, 2, 8)
#define ALL(X) ROWS(X, 0, 0) ROWS(X, 0, 1) ROWS(X, 1, 0) ROWS(X, 1, 1) ROWS(X, 2, 0) ROWS(X, 2, 1)
#define DEFINE(K, F, R, M)                                                                  \
    static void rows_##K##_##F##_##R##_##M(const gemm_args *a, int64_t n, int64_t m0, __m512 *o) { \
        if (K == 0) q4_body(a, n, R, m0, M, F, o);                                           \
        else q8_body(a, n, R, m0, M, F, K == 2, o);                                           \
    }
ALL(DEFINE)
#define ENTRY(K, F, R, M) rows_##K##_##F##_##R##_##M,
static const rows_fn ROW_FNS[6 * 16] = {ALL(ENTRY)};

static void rows_vnni(const gemm_args *a, int64_t n, int nr, int64_t m0, int mt, __m512 *out) {
    const int kind = a->bits == 4 ? 0 : (a->group == 32 ? 1 : 2);
    ROW_FNS[((kind * 2 + a->f16) * 2 + nr - 1) * 8 + mt - 1](a, n, m0, out);
}
#endif

#ifdef LT_VNNI
/* Rows are reduced 16 at a time with reduce16, whatever M: a row's sum then goes through the same
 * additions in every call (batch size and thread count never change an output bit). */
static void gemm_task(void *ctx, int64_t n0, int64_t n1) {
    const gemm_args *a = ctx;
    __m512 part[NR * 8], pending[8][16];
    for (int64_t m0 = 0; m0 < a->M; m0 += 8) {
        const int mt = a->M - m0 < 8 ? (int)(a->M - m0) : 8;
        int64_t first = n0; /* rows first.. wait in pending */
        int k = 0;
        for (int64_t n = n0; n < n1; n += NR) {
            const int nr = n1 - n < NR ? (int)(n1 - n) : NR;
            rows_vnni(a, n, nr, m0, mt, part);
            for (int r = 0; r < nr; r++, k++)
                for (int j = 0; j < mt; j++) pending[j][k] = part[r * 8 + j];
            if (k + NR <= 16 && n + nr < n1) continue;
            for (int j = 0; j < mt; j++) {
                for (int i = k; i < 16; i++) pending[j][i] = _mm512_setzero_ps();
                float s[16];
                _mm512_storeu_ps(s, reduce16(pending[j]));
                float *y = a->y + (m0 + j) * a->N + first;
                for (int i = 0; i < k; i++) y[i] = s[i] + (a->bias ? a->bias[first + i] : 0.f);
            }
            first += k;
            k = 0;
        }
    }
}
#else
static void gemm_task(void *ctx, int64_t n0, int64_t n1) {
    const gemm_args *a = ctx;
    float dots[NR * 8];
    for (int64_t m0 = 0; m0 < a->M; m0 += 8) {
        const int mt = a->M - m0 < 8 ? (int)(a->M - m0) : 8;
        for (int64_t n = n0; n < n1; n += NR) {
            const int nr = n1 - n < NR ? (int)(n1 - n) : NR;
            rows_scalar(a, n, nr, m0, mt, dots);
            for (int r = 0; r < nr; r++) {
                const float b = a->bias ? a->bias[n + r] : 0.f;
                for (int j = 0; j < mt; j++) a->y[(m0 + j) * a->N + n + r] = dots[r * 8 + j] + b;
            }
        }
    }
}
#endif

/* y [M, N] = x @ W^T (+ bias); qx/dx/sx* from lt_quantize_rows of x. */
void lt_qgemm(const uint8_t *qs, const void *d, const void *m, int f16, int bits, int group, int64_t N, int64_t K,
              const int8_t *qx, const float *dx, const float *sx32, const float *sx16, int64_t M,
              const float *bias, float *y) {
    gemm_args a = {qs, d, m, f16, bits, group, N, K, qx, dx, sx32, sx16, M, bias, y};
    const int t = lt_get_threads();
    int64_t chunk = N / (t * 4);
    chunk = chunk < 16 ? 16 : chunk;
    lt_parallel_for(N, chunk, gemm_task, &a);
}

/* A packed weight as the Python side describes it once (kernels/cpu/pack.py). */
typedef struct {
    const uint8_t *qs;
    const void *d, *m;
    int32_t f16, bits, group, pad;
    int64_t N, K;
} lt_weight;

/* Activation scratch of the calling thread, grown as needed (one linear call at a time per thread). */
static _Thread_local void *scratch;
static _Thread_local size_t scratch_size;

/* y [M, N] = x [M, K] (row stride ldx) @ W^T (+ bias): quantize the activations, then the matmul. */
int lt_linear(const float *x, int64_t M, int64_t ldx, const lt_weight *w, const float *bias, float *y) {
    const int64_t K = w->K, nb = K / 32;
    const size_t need = (size_t)M * K + sizeof(float) * (size_t)M * (4 * nb) + 64;
    if (need > scratch_size) {
        void *p = realloc(scratch, need);
        if (!p) return -1;
        scratch = p;
        scratch_size = need;
    }
    float *dx = scratch, *sx32 = dx + M * nb, *sx16 = sx32 + M * nb;
    int8_t *qx = (int8_t *)(sx16 + M * 2 * nb);
    lt_quantize_rows(x, M, K, ldx, qx, dx, sx32, sx16);
    lt_qgemm(w->qs, w->d, w->m, w->f16, w->bits, w->group, w->N, K, qx, dx, sx32, sx16, M, bias, y);
    return 0;
}

int lt_has_vnni(void) {
#ifdef LT_VNNI
    return 1;
#else
    return 0;
#endif
}
