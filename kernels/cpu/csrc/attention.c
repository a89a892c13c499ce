/* Paged attention over the fp16 KV cache in place, fp32 math: prefill, decode and mixed batches.
 *
 * q [T, nh, hd] (row stride ldq floats), fp16 caches [num_blocks, block_size, nkv, hd], block tables
 * int32 [B, W], seq_lens int32 [B] (keys per sequence, new ones included), cu_seqlens_q int32
 * [B + 1]; out [T, nh, hd] contiguous. The query at position p of a sequence sees keys j <= p
 * (and p - j < window when window > 0). Grid: units of (sequence, KV head, up to 16 query rows)
 * on the thread pool; the query heads of one KV head share every key and value load. Scores of
 * 16 keys at a time (one transpose-and-add reduction) go to a per-thread buffer, then softmax (a
 * vectorized exp) and the weighted sum of values.
 */
#include "common.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#define LT_AVX512 1
#endif

#define ROWS 16   /* query rows per unit */

typedef struct {
    const float *q;
    const uint16_t *kc, *vc; /* fp16 */
    const int32_t *tables, *lens, *cu;
    float *out;
    int64_t ldq, nh, nkv, hd, bs, width, B;
    float scale, softcap;
    int64_t window;
    int64_t *unit_seq, *unit_row, *unit_head; /* unit -> sequence, its first query row, KV head */
} attn_args;

#ifdef LT_AVX512
/* exp(x) for x <= 0 to ~2 ulp: 2^(x log2 e) = 2^k * p(f), f in [-0.5, 0.5]. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    const __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, k);
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, k);
}
#endif

#ifdef LT_AVX512
static inline __m512 load_h(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
#endif

static float dot(const float *a, const uint16_t *b, int64_t n) {
    float s = 0.f;
    for (int64_t i = 0; i < n; i++) s += a[i] * lt_f16_to_f32(b[i]);
    return s;
}

static void axpy(float *y, float a, const uint16_t *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * lt_f16_to_f32(x[i]);
}

/* In place: s[0..n) -> exp(s - max), returns the sum. */
static float softmax_exp(float *s, int64_t n) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; j++) mx = s[j] > mx ? s[j] : mx;
    float sum = 0.f;
    int64_t j = 0;
#ifdef LT_AVX512
    const __m512 vmx = _mm512_set1_ps(mx);
    __m512 vs = _mm512_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), vmx));
        _mm512_storeu_ps(s + j, e);
        vs = _mm512_add_ps(vs, e);
    }
    sum = _mm512_reduce_add_ps(vs);
#endif
    for (; j < n; j++) {
        s[j] = expf(s[j] - mx);
        sum += s[j];
    }
    return sum;
}

/* scores[j] = q . k_j * scale for the n keys at kp[0..n) (n <= 16). */
static void score16(const float *q, const uint16_t *const *kp, int n, int64_t hd, float scale, float *scores) {
#ifdef LT_AVX512
    if (hd % 16 == 0) {
        __m512 acc[16];
        for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
        for (int64_t d = 0; d < hd; d += 16) {
            const __m512 qv = _mm512_loadu_ps(q + d);
            for (int i = 0; i < n; i++) acc[i] = _mm512_fmadd_ps(qv, load_h(kp[i] + d), acc[i]);
        }
        const __m512 s = _mm512_mul_ps(lt_reduce16(acc), _mm512_set1_ps(scale));
        _mm512_mask_storeu_ps(scores, (__mmask16)((1u << n) - 1), s);
        return;
    }
#endif
    for (int i = 0; i < n; i++) scores[i] = dot(q, kp[i], hd) * scale;
}

/* o = inv * sum_j p[j - j0] v_j over keys j0..p; 64 columns at a time stay in registers. */
static void weighted_values(const attn_args *a, const int32_t *table, int64_t h, int64_t j0, int64_t p,
                            const float *pw, float inv, float *o) {
    const int64_t hd = a->hd, tok_stride = a->nkv * hd;
#define VPTR(j) (a->vc + ((int64_t)table[(j) / a->bs] * a->bs + (j) % a->bs) * tok_stride + h * hd)
#ifdef LT_AVX512
    if (hd % 64 == 0) {
        for (int64_t d0 = 0; d0 < hd; d0 += 64) {
            __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
            for (int64_t j = j0; j <= p; j++) {
                const uint16_t *v = VPTR(j) + d0;
                const __m512 w = _mm512_set1_ps(pw[j - j0]);
                c0 = _mm512_fmadd_ps(w, load_h(v), c0);
                c1 = _mm512_fmadd_ps(w, load_h(v + 16), c1);
                c2 = _mm512_fmadd_ps(w, load_h(v + 32), c2);
                c3 = _mm512_fmadd_ps(w, load_h(v + 48), c3);
            }
            const __m512 vi = _mm512_set1_ps(inv);
            _mm512_storeu_ps(o + d0, _mm512_mul_ps(c0, vi));
            _mm512_storeu_ps(o + d0 + 16, _mm512_mul_ps(c1, vi));
            _mm512_storeu_ps(o + d0 + 32, _mm512_mul_ps(c2, vi));
            _mm512_storeu_ps(o + d0 + 48, _mm512_mul_ps(c3, vi));
        }
        return;
    }
#endif
    memset(o, 0, hd * sizeof(float));
    for (int64_t j = j0; j <= p; j++) axpy(o, pw[j - j0], VPTR(j), hd);
    for (int64_t i = 0; i < hd; i++) o[i] *= inv;
#undef VPTR
}

static void attn_unit(const attn_args *a, int64_t u, float *scores) {
    const int64_t b = a->unit_seq[u], r0 = a->unit_row[u];
    const int64_t h = a->unit_head[u], group = a->nh / a->nkv, hd = a->hd;
    const int64_t qs = a->cu[b], ql = a->cu[b + 1] - qs, L = a->lens[b];
    const int64_t r1 = r0 + ROWS < ql ? r0 + ROWS : ql, tok_stride = a->nkv * hd;
    const int32_t *table = a->tables + b * a->width;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t p = L - ql + r; /* this query's position */
        const int64_t j0 = a->window > 0 && p - a->window + 1 > 0 ? p - a->window + 1 : 0, n = p + 1 - j0;
        const float *qrow = a->q + (qs + r) * a->ldq + h * group * hd;
        for (int64_t jb = j0; jb <= p; jb += 16) {
            const int nk = p + 1 - jb < 16 ? (int)(p + 1 - jb) : 16;
            const uint16_t *kp[16];
            for (int i = 0; i < nk; i++) {
                const int64_t j = jb + i;
                kp[i] = a->kc + ((int64_t)table[j / a->bs] * a->bs + j % a->bs) * tok_stride + h * hd;
            }
            for (int64_t g = 0; g < group; g++) score16(qrow + g * hd, kp, nk, hd, a->scale, scores + g * n + (jb - j0));
        }
        if (a->softcap > 0.f)
            for (int64_t i = 0; i < group * n; i++) scores[i] = a->softcap * tanhf(scores[i] / a->softcap);
        for (int64_t g = 0; g < group; g++) {
            float *s = scores + g * n, *o = a->out + ((qs + r) * a->nh + h * group + g) * hd;
            const float inv = 1.f / softmax_exp(s, n);
            weighted_values(a, table, h, j0, p, s, inv, o);
        }
    }
}

static _Thread_local float *tls_scores;
static _Thread_local size_t tls_scores_n;

static void attn_task(void *ctx, int64_t u0, int64_t u1) {
    const attn_args *a = ctx;
    int64_t maxlen = 1;
    for (int64_t b = 0; b < a->B; b++) maxlen = a->lens[b] > maxlen ? a->lens[b] : maxlen;
    const size_t need = (size_t)(maxlen + 16) * (size_t)(a->nh / a->nkv);
    if (need > tls_scores_n) {
        float *p = realloc(tls_scores, need * sizeof(float));
        if (!p) return;
        tls_scores = p;
        tls_scores_n = need;
    }
    for (int64_t u = u0; u < u1; u++) attn_unit(a, u, tls_scores);
}

static _Thread_local int64_t *tls_units;
static _Thread_local int64_t tls_units_n;

int lt_paged_attention(const float *q, const uint16_t *kc, const uint16_t *vc, const int32_t *tables, const int32_t *lens,
                       const int32_t *cu, float *out, int64_t ldq, int64_t nh, int64_t nkv, int64_t hd, int64_t bs,
                       int64_t width, int64_t B, float scale, int64_t window, float softcap) {
    int64_t nu = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t ql = cu[b + 1] - cu[b];
        if (ql > 0 && lens[b] > 0) nu += nkv * ((ql + ROWS - 1) / ROWS);
    }
    if (3 * nu > tls_units_n) {
        int64_t *p = realloc(tls_units, sizeof(int64_t) * 3 * nu);
        if (!p) return -1;
        tls_units = p;
        tls_units_n = 3 * nu;
    }
    int64_t *units = tls_units;
    int64_t *seq = units, *row = units + nu, *head = units + 2 * nu, i = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t ql = cu[b + 1] - cu[b];
        if (ql <= 0 || lens[b] <= 0) continue;
        for (int64_t r = 0; r < ql; r += ROWS)
            for (int64_t h = 0; h < nkv; h++, i++) {
                seq[i] = b;
                row[i] = r;
                head[i] = h;
            }
    }
    attn_args a = {q, kc, vc, tables, lens, cu, out, ldq, nh, nkv, hd, bs, width, B, scale, softcap, window,
                   seq, row, head};
    lt_parallel_for(nu, 1, attn_task, &a);
    return 0;
}
