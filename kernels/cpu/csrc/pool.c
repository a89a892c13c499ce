/* A persistent thread pool for the CPU kernels: one fork-join per kernel call.
 *
 * Workers spin briefly after each job (consecutive kernel calls of a decode step come a few
 * microseconds apart, and a sleeping worker costs a futex wake of 5-20 us), then sleep on a
 * condition variable. The caller runs chunk 0.. itself and takes chunks from the same atomic
 * counter as the workers, so a busy or descheduled worker never holds a call up for long.
 */
#include "common.h"
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#define MAX_THREADS 256
#define SPIN_ITERS 20000 /* ~50-100 us of pause instructions */

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static pthread_t workers[MAX_THREADS];
static int n_workers;          /* threads besides the caller */
static atomic_long generation; /* bumped once per job */
static atomic_long next_chunk, n_chunks, busy;
static lt_task job_fn;
static void *job_ctx;
static int64_t job_n, job_chunk;
static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER; /* one job at a time */

static void run_chunks(void) {
    for (;;) {
        long c = atomic_fetch_add(&next_chunk, 1);
        if (c >= atomic_load(&n_chunks)) return;
        int64_t b = c * job_chunk, e = b + job_chunk < job_n ? b + job_chunk : job_n;
        job_fn(job_ctx, b, e);
    }
}

static int active_threads = 1; /* the caller plus workers 0 .. active_threads - 2 take part */

static long start_generation[MAX_THREADS]; /* the generation a worker was created in */

static void *worker_main(void *arg) {
    int idx = (int)(intptr_t)arg;
    /* not atomic_load(&generation) here: a job posted before this thread first ran would look
     * already seen, and its caller would wait for this worker forever */
    long seen = start_generation[idx];
    for (;;) {
        int spins = 0;
        while (atomic_load(&generation) == seen) {
            if (++spins < SPIN_ITERS) {
                CPU_RELAX();
                continue;
            }
            pthread_mutex_lock(&mu);
            while (atomic_load(&generation) == seen) pthread_cond_wait(&wake, &mu);
            pthread_mutex_unlock(&mu);
        }
        seen = atomic_load(&generation);
        if (idx < active_threads - 1) run_chunks();
        atomic_fetch_sub(&busy, 1);
    }
    return NULL;
}

int lt_set_threads(int n) {
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    pthread_mutex_lock(&call_mu);
    while (n_workers < n - 1) { /* workers are only added; fewer threads leave the rest idle */
        start_generation[n_workers] = atomic_load(&generation); /* stable: jobs need call_mu too */
        if (pthread_create(&workers[n_workers], NULL, worker_main, (void *)(intptr_t)n_workers) != 0) break;
        pthread_detach(workers[n_workers]);
        n_workers++;
    }
    active_threads = n < n_workers + 1 ? n : n_workers + 1;
    pthread_mutex_unlock(&call_mu);
    return active_threads;
}

int lt_get_threads(void) { return active_threads; }

void lt_parallel_for(int64_t n, int64_t chunk, lt_task task, void *ctx) {
    if (n <= 0) return;
    if (chunk < 1) chunk = 1;
    int64_t chunks = (n + chunk - 1) / chunk;
    if (active_threads == 1 || chunks == 1) {
        task(ctx, 0, n);
        return;
    }
    pthread_mutex_lock(&call_mu);
    job_fn = task;
    job_ctx = ctx;
    job_n = n;
    job_chunk = chunk;
    atomic_store(&n_chunks, chunks);
    atomic_store(&next_chunk, 0);
    atomic_store(&busy, n_workers);
    pthread_mutex_lock(&mu);
    atomic_fetch_add(&generation, 1);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&mu);
    run_chunks();
    while (atomic_load(&busy) > 0) CPU_RELAX();
    pthread_mutex_unlock(&call_mu);
}

float lt_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    union { uint32_t u; float f; } v = {bits};
    return v.f;
}

uint16_t lt_f32_to_f16(float f) {
    union { float f; uint32_t u; } v = {f};
    const uint32_t x = v.u, sign = (x >> 16) & 0x8000;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0)); /* inf / nan */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);                                  /* overflow */
    if (ax < 0x38800000u) { /* subnormal or zero: value / 2^-24, rounded to nearest even */
        union { uint32_t u; float f; } a = {ax};
        const float s = a.f * 16777216.f;
        int32_t q = (int32_t)s;
        const float r = s - (float)q;
        if (r > 0.5f || (r == 0.5f && (q & 1))) q++;
        return (uint16_t)(sign | (uint32_t)q);
    }
    uint32_t m = ax + 0xc8000000u; /* rebias the exponent: (e - 127 + 15) << 23 */
    m += 0xfff + ((m >> 13) & 1);  /* round to nearest even on the 13 dropped bits */
    return (uint16_t)(sign | (m >> 13));
}
