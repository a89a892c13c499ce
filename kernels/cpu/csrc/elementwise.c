/* The small ops of a decoder layer, fp32, one pass each over rows of [T, ...] tensors:
 * RMSNorm with the residual add fused, RoPE in place (normal and neox pairing), the KV-cache
 * store by slot, and the gated activations (silu, gelu-tanh). Rows are independent;
 * each op splits them over the pool when there are enough to pay for it.
 */
#include "common.h"
#include <math.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define PAR_ROWS 16 /* rows per pool chunk (small ops: a decode step of a few rows runs inline) */

/* ---- RMSNorm: res_out = x (+ residual); out = res_out * rsqrt(mean(res_out^2) + eps) * w ---- */
typedef struct { const float *x, *res, *w; float *out, *res_out; int64_t H; float eps; } norm_args;

static void norm_task(void *ctx, int64_t t0, int64_t t1) {
    const norm_args *a = ctx;
    for (int64_t t = t0; t < t1; t++) {
        const float *x = a->x + t * a->H;
        float *r = a->res_out ? a->res_out + t * a->H : NULL, *o = a->out + t * a->H;
        float ss = 0.f;
        for (int64_t i = 0; i < a->H; i++) {
            const float v = a->res ? x[i] + a->res[t * a->H + i] : x[i];
            if (r) r[i] = v;
            ss += v * v;
        }
        const float inv = 1.f / sqrtf(ss / (float)a->H + a->eps);
        const float *src = r ? r : x;
        for (int64_t i = 0; i < a->H; i++) o[i] = src[i] * inv * a->w[i];
    }
}

void lt_rms_norm(const float *x, const float *residual, const float *w, float *out, float *res_out, int64_t T,
                 int64_t H, float eps) {
    norm_args a = {x, residual, w, out, res_out, H, eps};
    lt_parallel_for(T, PAR_ROWS, norm_task, &a);
}

/* ---- RoPE in place on q [T, nq, hd] and k [T, nk, hd] (row strides ldq, ldk floats) ------------ */
typedef struct {
    float *q, *k;
    const float *cs;
    const int64_t *pos;
    int64_t ldq, ldk, nq, nk, hd, rot;
    int neox;
} rope_args;

static void rotate(float *x, const float *cs, int64_t rot, int neox) {
    const int64_t half = rot / 2;
    const float *cos = cs, *sin = cs + half;
    for (int64_t i = 0; i < half; i++) {
        const int64_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
        const float x1 = x[a], x2 = x[b];
        x[a] = x1 * cos[i] - x2 * sin[i];
        x[b] = x2 * cos[i] + x1 * sin[i];
    }
}

static void rope_task(void *ctx, int64_t t0, int64_t t1) {
    const rope_args *a = ctx;
    for (int64_t t = t0; t < t1; t++) {
        const float *cs = a->cs + a->pos[t] * a->rot;
        for (int64_t h = 0; h < a->nq; h++) rotate(a->q + t * a->ldq + h * a->hd, cs, a->rot, a->neox);
        for (int64_t h = 0; h < a->nk; h++) rotate(a->k + t * a->ldk + h * a->hd, cs, a->rot, a->neox);
    }
}

void lt_rope(float *q, float *k, const float *cos_sin, const int64_t *positions, int64_t T, int64_t ldq,
             int64_t ldk, int64_t nq, int64_t nk, int64_t hd, int64_t rot, int neox) {
    rope_args a = {q, k, cos_sin, positions, ldq, ldk, nq, nk, hd, rot, neox};
    lt_parallel_for(T, PAR_ROWS, rope_task, &a);
}

/* ---- KV store: fp16 cache row slots[t] <- k[t], v[t] (rounded to nearest); slot -1 is padding -- */
static void to_f16(uint16_t *dst, const float *src, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(dst + i), _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) dst[i] = lt_f32_to_f16(src[i]);
}

void lt_store_kv(const float *k, const float *v, uint16_t *kc, uint16_t *vc, const int64_t *slots, int64_t T,
                 int64_t ldk, int64_t ldv, int64_t width) {
    for (int64_t t = 0; t < T; t++) {
        if (slots[t] < 0) continue;
        to_f16(kc + slots[t] * width, k + t * ldk, width);
        to_f16(vc + slots[t] * width, v + t * ldv, width);
    }
}

/* ---- gated activation: out [T, I] = act(gate) * up (row strides ldg, ldu: the two halves of a
 * fused gate|up projection are read in place) ------------------------------------------------- */
typedef struct { const float *g, *u; int64_t ldg, ldu; float *out; int64_t I; int kind; } act_args;

static void act_task(void *ctx, int64_t t0, int64_t t1) {
    const act_args *a = ctx;
    for (int64_t t = t0; t < t1; t++) {
        const float *g = a->g + t * a->ldg, *u = a->u + t * a->ldu;
        float *o = a->out + t * a->I;
        if (a->kind == 0) {
            for (int64_t i = 0; i < a->I; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
        } else { /* gelu, tanh approximation */
            for (int64_t i = 0; i < a->I; i++) {
                const float x = g[i];
                o[i] = 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x))) * u[i];
            }
        }
    }
}

void lt_gated_act(const float *gate, const float *up, int64_t ldg, int64_t ldu, int64_t T, int64_t I, float *out,
                  int kind) {
    act_args a = {gate, up, ldg, ldu, out, I, kind};
    lt_parallel_for(T, PAR_ROWS, act_task, &a);
}
