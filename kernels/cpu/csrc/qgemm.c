/* Quantized matmul on int8 activations: y[M, N] = x[M, K] @ W[N, K]^T (+ bias).
 *
 * x is first quantized per 32 values (lt_quantize_rows: int8 quants, a scale, and scaled sums
 * per 16 and 32 for the offset terms), as llama.cpp does for its CPU dot products. Every weight
 * is d * u + m (common.h), so for one group of G weights and its activations
 *     sum_i w_i x_i  ~  d * dx * sum_i u_i q_i  +  m * (dx * sum_i q_i)
 * where the first sum is exact integer arithmetic (AVX-512 VNNI vpdpbusd: 64 u8 x s8 products
 * per instruction) and the second is the precomputed sx. Symmetric types store no m plane:
 * m = offset * d (Q8_0: -128 d), so the offset term is offset * sum_g d_g sx_g.
 * Grid: pairs of weight rows in chunks on the thread pool (rows are padded to an even count);
 * each pair runs against the activations 8 rows at a time, so a weight row is read from memory
 * once per call and reused from L1 across M. Row sums are reduced 16 rows at a time by one
 * transpose-and-add tree, the same additions whatever M: no output bit depends on the batch.
 */
#include "common.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LT_VNNI 1
#include <immintrin.h>
#endif

/* How far ahead of the rows being read to prefetch, in bytes: DRAM latency x bandwidth is ~2 KB,
 * and the hardware prefetchers' own distance falls short on these short rows (measured on Zen 4:
 * 4 KB ahead 21 GB/s, 8 KB 35 GB/s (the read bandwidth), 16-64 KB 30 GB/s on a 170 MB matrix).
 * A prefetch past the end never faults. */
#ifndef PF_BYTES
#define PF_BYTES 8192
#endif

enum { KIND_Q4 = 0, KIND_Q5 = 1, KIND_Q8 = 2 };

/* A packed weight as the Python side describes it once (kernels/cpu/pack.py). */
typedef struct {
    const uint8_t *qs, *hb; /* quants; Q5: the fifth bits [Np, K/8], natural order, 64 per word */
    const void *d, *m;      /* scales [Np, K/G] fp16 or fp32; m NULL when symmetric */
    float offset;           /* symmetric: m = offset * d */
    int32_t f16, kind, group;
    int64_t N, K; /* N logical; the planes hold Np = N rounded up to even rows */
} lt_weight;

typedef struct {
    const lt_weight *w;
    const int8_t *qx;
    const float *dx, *sx32, *sx16;
    int64_t M;
    const float *bias;
    float *y;
} gemm_args;

/* ---- activations -------------------------------------------------------------------------- */

typedef struct { const float *x; int64_t ldx, K; int8_t *qx; float *dx, *sx32, *sx16; } quant_args;

static void quant_task(void *ctx, int64_t b0, int64_t b1) {
    const quant_args *a = ctx;
    const int64_t nb = a->K / 32;
    for (int64_t r = b0; r < b1; r++) { /* block r: row r / nb, block r % nb */
        const float *v = a->x + (r / nb) * a->ldx + (r % nb) * 32;
        int8_t *q = a->qx + r * 32;
        float amax = 0.f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(v[i]));
        const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
        int s0 = 0, s1 = 0;
        for (int i = 0; i < 32; i++) {
            const int qi = (int)nearbyintf(v[i] * id); /* round half to even, as torch.round */
            q[i] = (int8_t)qi;
            if (i < 16) s0 += qi; else s1 += qi;
        }
        a->dx[r] = d;
        a->sx16[2 * r] = d * (float)s0;
        a->sx16[2 * r + 1] = d * (float)s1;
        a->sx32[r] = d * (float)(s0 + s1);
    }
}

/* x [M, K] (row stride ldx) -> qx int8 [M, K], dx [M, K/32], sx32 [M, K/32], sx16 [M, K/16]. */
void lt_quantize_rows(const float *x, int64_t M, int64_t K, int64_t ldx, int8_t *qx, float *dx, float *sx32,
                      float *sx16) {
    quant_args a = {x, ldx, K, qx, dx, sx32, sx16};
    lt_parallel_for(M * (K / 32), 2048, quant_task, &a);
}

/* ---- weights ------------------------------------------------------------------------------ */

static inline float scale_at(const void *p, int f16, int64_t i) {
    return f16 ? lt_f16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline float offset_scale(const lt_weight *w, int64_t i) { /* m for group i */
    return w->m ? scale_at(w->m, w->f16, i) : w->offset * scale_at(w->d, w->f16, i);
}

/* Unsigned quant i (0 .. K-1) of row n, in any layout (the portable path). */
static inline int quant_at(const lt_weight *w, int64_t n, int64_t i) {
    const int64_t K = w->K;
    if (w->kind == KIND_Q8) return w->qs[n * K + i];
    const uint8_t *row = w->qs + n * (K / 2);
    const int64_t full = K / 128 * 128;
    int u;
    if (i < full) {
        const int64_t c = i / 128, j = i % 128;
        const uint8_t b = row[c * 64 + (j & 63)];
        u = j < 64 ? (b & 15) : (b >> 4);
    } else {
        const int64_t j = i - full;
        const uint8_t b = row[full / 2 + (j & 31)];
        u = j < 32 ? (b & 15) : (b >> 4);
    }
    if (w->kind == KIND_Q5) u |= ((w->hb[n * (K / 8) + i / 8] >> (i % 8)) & 1) << 4;
    return u;
}

#ifndef LT_VNNI
/* The portable path: plain C over the same planes, rows one at a time. */
static void gemm_task(void *ctx, int64_t n0, int64_t n1) {
    const gemm_args *a = ctx;
    const lt_weight *w = a->w;
    const int G = w->group;
    const int64_t K = w->K, ng = K / G;
    const float *sx = G == 32 ? a->sx32 : a->sx16;
    for (int64_t n = n0; n < n1 && n < w->N; n++)
        for (int64_t m = 0; m < a->M; m++) {
            const int8_t *q = a->qx + m * K;
            const float *dx = a->dx + m * (K / 32);
            float acc = 0.f;
            for (int64_t g = 0; g < ng; g++) {
                int isum = 0;
                for (int i = 0; i < G; i++) isum += quant_at(w, n, g * G + i) * q[g * G + i];
                acc += scale_at(w->d, w->f16, n * ng + g) * dx[g * G / 32] * (float)isum +
                       offset_scale(w, n * ng + g) * sx[m * ng + g];
            }
            a->y[m * w->N + n] = acc + (a->bias ? a->bias[n] : 0.f);
        }
}
#else
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

static inline __m128 load2f(const float *p) { return _mm_castpd_ps(_mm_load_sd((const double *)p)); }

static inline __mmask64 bits64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return _cvtu64_mask64(v);
}

/* Two weight rows n, n+1 against activation rows m0..m0+mt, 4/5-bit planes: a 64-byte load holds
 * 128 weights (low nibbles: the first 64, high nibbles: the next 64; Q5 ORs its fifth bits in from
 * two 64-bit masks). The offset terms ride along in 128-bit accumulators. */
static inline __attribute__((always_inline)) void nib_body(const gemm_args *a, int64_t n, int64_t m0, const int mt,
                                                           const int f16, const int sym, const int five,
                                                           __m512 *out) {
    const lt_weight *w = a->w;
    const int64_t K = w->K, nb = K / 32, chunks = K / 128, pf = PF_BYTES / (K / 2) * (K / 2);
    const __m512i mask = _mm512_set1_epi8(15), sixteen = _mm512_set1_epi8(16), zero = _mm512_setzero_si512();
    const __m512i lo_idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i hi_idx = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
    __m512 acc[2][8];
    __m128 macc[2][8];
    for (int r = 0; r < 2; r++)
        for (int j = 0; j < mt; j++) { acc[r][j] = _mm512_setzero_ps(); macc[r][j] = _mm_setzero_ps(); }
    for (int64_t c = 0; c < chunks; c++) {
        __m512i lo[2], hi[2];
        __m128 dw[2], mw[2];
        for (int r = 0; r < 2; r++) { /* the same chunk some rows ahead: DRAM latency hides behind this row */
            const uint8_t *p = w->qs + (n + r) * (K / 2) + c * 64;
            _mm_prefetch((const char *)(p + pf), _MM_HINT_T0);
            const __m512i v = _mm512_loadu_si512(p);
            lo[r] = _mm512_and_si512(v, mask);
            hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
            if (five) {
                const uint8_t *h = w->hb + (n + r) * (K / 8) + c * 16;
                lo[r] = _mm512_or_si512(lo[r], _mm512_maskz_mov_epi8(bits64(h), sixteen));
                hi[r] = _mm512_or_si512(hi[r], _mm512_maskz_mov_epi8(bits64(h + 8), sixteen));
            }
            dw[r] = load4(w->d, f16, (n + r) * nb + 4 * c);
            mw[r] = sym ? dw[r] : load4(w->m, f16, (n + r) * nb + 4 * c);
        }
        for (int j = 0; j < mt; j++) {
            const int8_t *q = a->qx + (m0 + j) * K + c * 128;
            const __m512i q0 = _mm512_loadu_si512(q), q1 = _mm512_loadu_si512(q + 64);
            const __m128 dx = _mm_loadu_ps(a->dx + (m0 + j) * nb + 4 * c);
            const __m128 sx = _mm_loadu_ps(a->sx32 + (m0 + j) * nb + 4 * c);
            for (int r = 0; r < 2; r++) {
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
        for (int r = 0; r < 2; r++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w->qs + (n + r) * (K / 2) + base / 2));
            __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m4)),
                                           _mm256_and_si256(_mm256_srli_epi16(v, 4), m4), 1);
            if (five) u = _mm512_or_si512(u, _mm512_maskz_mov_epi8(bits64(w->hb + (n + r) * (K / 8) + base / 8), sixteen));
            const __m128 dw = load2(w->d, f16, (n + r) * nb + base / 32);
            const __m128 mw = sym ? dw : load2(w->m, f16, (n + r) * nb + base / 32);
            for (int j = 0; j < mt; j++) {
                const __m512i i0 = _mm512_dpbusd_epi32(zero, u, _mm512_loadu_si512(a->qx + (m0 + j) * K + base));
                const __m512 s = _mm512_castps128_ps512(_mm_mul_ps(dw, load2f(a->dx + (m0 + j) * nb + base / 32)));
                acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_permutexvar_ps(lo_idx, s), acc[r][j]);
                macc[r][j] = _mm_fmadd_ps(mw, load2f(a->sx32 + (m0 + j) * nb + base / 32), macc[r][j]);
            }
        }
    }
    const __m128 off = _mm_set1_ps(sym ? w->offset : 1.f);
    for (int r = 0; r < 2; r++)
        for (int j = 0; j < mt; j++)
            out[r * 8 + j] = _mm512_add_ps(acc[r][j], _mm512_zextps128_ps512(_mm_mul_ps(macc[r][j], off)));
}

/* 8-bit planes: a 64-byte load holds 64 weights in order, 2 groups of 32 or 4 of 16. */
static inline __attribute__((always_inline)) void q8_body(const gemm_args *a, int64_t n, int64_t m0, const int mt,
                                                          const int f16, const int sym, const int g16, __m512 *out) {
    const lt_weight *w = a->w;
    const int64_t K = w->K, nb = K / 32, ng = K / (g16 ? 16 : 32), chunks = K / 64, pf = PF_BYTES / K * K;
    const __m512i zero = _mm512_setzero_si512();
    const __m512i idx2 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i idx4 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m128i dup = _mm_set_epi32(1, 1, 0, 0);
    __m512 acc[2][8];
    __m128 macc[2][8];
    for (int r = 0; r < 2; r++)
        for (int j = 0; j < mt; j++) { acc[r][j] = _mm512_setzero_ps(); macc[r][j] = _mm_setzero_ps(); }
    for (int64_t c = 0; c < chunks; c++) {
        __m512i v[2];
        __m128 dw[2], mw[2];
        for (int r = 0; r < 2; r++) {
            const uint8_t *p = w->qs + (n + r) * K + c * 64;
            _mm_prefetch((const char *)(p + pf), _MM_HINT_T0);
            v[r] = _mm512_loadu_si512(p);
            dw[r] = g16 ? load4(w->d, f16, (n + r) * ng + 4 * c) : load2(w->d, f16, (n + r) * ng + 2 * c);
            mw[r] = sym ? dw[r] : g16 ? load4(w->m, f16, (n + r) * ng + 4 * c) : load2(w->m, f16, (n + r) * ng + 2 * c);
        }
        for (int j = 0; j < mt; j++) {
            const __m512i q = _mm512_loadu_si512(a->qx + (m0 + j) * K + c * 64);
            __m128 dx = load2f(a->dx + (m0 + j) * nb + 2 * c), sx;
            if (g16) {
                dx = _mm_permutevar_ps(dx, dup); /* dx0 dx0 dx1 dx1: two groups of 16 per block */
                sx = _mm_loadu_ps(a->sx16 + (m0 + j) * ng + 4 * c);
            } else {
                sx = load2f(a->sx32 + (m0 + j) * ng + 2 * c);
            }
            for (int r = 0; r < 2; r++) {
                const __m512 s = _mm512_permutexvar_ps(g16 ? idx4 : idx2, _mm512_castps128_ps512(_mm_mul_ps(dw[r], dx)));
                acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, v[r], q)), s, acc[r][j]);
                macc[r][j] = _mm_fmadd_ps(mw[r], sx, macc[r][j]);
            }
        }
    }
    const __m128 off = _mm_set1_ps(sym ? w->offset : 1.f);
    for (int r = 0; r < 2; r++)
        for (int j = 0; j < mt; j++) {
            float tail = 0.f; /* K % 64: one group of 32 at the end */
            for (int64_t g = chunks * 64 / w->group; g < ng; g++) {
                const int8_t *q = a->qx + (m0 + j) * K + g * w->group;
                const uint8_t *u = w->qs + (n + r) * K + g * w->group;
                int isum = 0;
                for (int i = 0; i < w->group; i++) isum += u[i] * q[i];
                tail += scale_at(w->d, f16, (n + r) * ng + g) * a->dx[(m0 + j) * nb + g * w->group / 32] * (float)isum +
                        offset_scale(w, (n + r) * ng + g) * (g16 ? a->sx16 : a->sx32)[(m0 + j) * ng + g];
            }
            const __m128 mt4 = _mm_add_ss(_mm_mul_ps(macc[r][j], off), _mm_set_ss(tail));
            out[r * 8 + j] = _mm512_add_ps(acc[r][j], _mm512_zextps128_ps512(mt4));
        }
}

/* Instances with the activation rows, scale type, symmetry and layout known at compile time:
 * accumulators stay in registers and the hot loop has no branches. */
typedef void (*rows_fn)(const gemm_args *, int64_t, int64_t, __m512 *);
#define FOR_MT(X, L, F, S) X(L, F, S, 1) X(L, F, S, 2) X(L, F, S, 3) X(L, F, S, 4) X(L, F, S, 5) X(L, F, S, 6) \
    X(L, F, S, 7) X(L, F, S, 8)
#define FOR_FS(X, L) FOR_MT(X, L, 0, 0) FOR_MT(X, L, 0, 1) FOR_MT(X, L, 1, 0) FOR_MT(X, L, 1, 1)
#define ALL(X) FOR_FS(X, 0) FOR_FS(X, 1) FOR_FS(X, 2) FOR_FS(X, 3) /* layouts: q4, q5, q8/32, q8/16 */
#define DEFINE(L, F, S, M)                                                                   \
    static void rows_##L##_##F##_##S##_##M(const gemm_args *a, int64_t n, int64_t m0, __m512 *o) { \
        if (L < 2) nib_body(a, n, m0, M, F, S, L == 1, o);                                  \
        else q8_body(a, n, m0, M, F, S, L == 3, o);                                          \
    }
ALL(DEFINE)
#define ENTRY(L, F, S, M) rows_##L##_##F##_##S##_##M,
static const rows_fn ROW_FNS[4 * 4 * 8] = {ALL(ENTRY)};


static void gemm_task(void *ctx, int64_t n0, int64_t n1) {
    const gemm_args *a = ctx;
    const lt_weight *w = a->w;
    const int layout = w->kind == KIND_Q8 ? (w->group == 16 ? 3 : 2) : w->kind;
    const rows_fn *fns = ROW_FNS + (layout * 4 + w->f16 * 2 + (w->m == NULL)) * 8;
    __m512 part[16], pending[8][16];
    for (int64_t m0 = 0; m0 < a->M; m0 += 8) {
        const int mt = a->M - m0 < 8 ? (int)(a->M - m0) : 8;
        int64_t first = n0; /* rows first.. wait in pending */
        int k = 0;
        for (int64_t n = n0; n < n1; n += 2) { /* n1 - n0 is even but at the end (the pad row is there) */
            fns[mt - 1](a, n, m0, part);
            for (int r = 0; r < 2; r++, k++)
                for (int j = 0; j < mt; j++) pending[j][k] = part[r * 8 + j];
            if (k < 16 && n + 2 < n1) continue;
            for (int j = 0; j < mt; j++) {
                float s[16];
                _mm512_storeu_ps(s, lt_reduce16(pending[j]));
                float *y = a->y + (m0 + j) * w->N;
                for (int i = 0; i < k && first + i < w->N; i++)
                    y[first + i] = s[i] + (a->bias ? a->bias[first + i] : 0.f);
            }
            first += k;
            k = 0;
        }
    }
}
#endif

/* y [M, N] = x @ W^T (+ bias); qx/dx/sx* from lt_quantize_rows of x. */
void lt_qgemm(const lt_weight *w, const int8_t *qx, const float *dx, const float *sx32, const float *sx16, int64_t M,
              const float *bias, float *y) {
    gemm_args a = {w, qx, dx, sx32, sx16, M, bias, y};
    const int t = lt_get_threads();
    int64_t chunk = w->N / (t * 4);
    chunk = chunk < 16 ? 16 : (chunk + 1) / 2 * 2; /* even: a chunk starts on a row pair */
    lt_parallel_for(w->N, chunk, gemm_task, &a);
}

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
    lt_qgemm(w, qx, dx, sx32, sx16, M, bias, y);
    return 0;
}

int lt_has_vnni(void) {
#ifdef LT_VNNI
    return 1;
#else
    return 0;
#endif
}
