/* Shared declarations of llamatron's CPU kernels (see kernels/cpu/__init__.py for the overview).
 *
 * Layouts (all row-major, C-contiguous):
 *   activations x [M, K] fp32; quantized: qx int8 [M, K], dx fp32 [M, K/32] (block scale),
 *   sx fp32 [M, K/16] (dx * sum of the 16 quants: the min/offset terms need it per 16).
 *   weights "q4": qs uint8 [N, K/2]; each 128-weight chunk is 64 bytes, byte j = w[j] | w[j+64] << 4
 *     (a 64-weight tail: byte j = w[j] | w[j+32] << 4); scales d, m per 32 weights.
 *   weights "q8": qs uint8 [N, K] unsigned quants; scales d, m per G (16 or 32) weights.
 *   Every weight is d * u + m for its unsigned quant u (signed GGUF quants carry their offset in m).
 *   d and m are fp32 [N, K/G] or fp16 (`f16` set) where the GGUF values are fp16 already.
 *   KV cache: fp16 [num_blocks, block_size, nkv, hd]; attention math is fp32.
 */
#pragma once
#include <stdint.h>
#include <stddef.h>

typedef void (*lt_task)(void *ctx, int64_t begin, int64_t end);

/* pool.c: runs task(ctx, begin, end) over [0, n) split in `chunk`-sized pieces on the pool. */
void lt_parallel_for(int64_t n, int64_t chunk, lt_task task, void *ctx);
int lt_set_threads(int n);
int lt_get_threads(void);

float lt_f16_to_f32(uint16_t h);
uint16_t lt_f32_to_f16(float f); /* round to nearest even, as the F16C instructions */

#if defined(__AVX512F__)
#include <immintrin.h>
/* v[i] -> lane i of the result is the sum of v[i]'s 16 lanes (a transpose-and-add tree: ~3
 * instructions per row instead of ~8 for one reduction each; each lane's additions involve only
 * its own vector, so the result for v[i] never depends on its neighbours). */
static inline __m512 lt_reduce16(const __m512 *v) {
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
#endif
