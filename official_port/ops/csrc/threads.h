/* A kernel's rows split over threads, inside the C call: `#pragma omp parallel` runs on torch's own
 * OpenMP pool when torch loaded libgomp (its `libgomp.so.1` is then the one this library binds to),
 * so the C work and torch's ops share the same threads. Split over Python threads instead, torch's
 * idle OpenMP workers keep spinning on the cores the kernel needs (measured: the scan took as long
 * on two threads as on one). Built without OpenMP, `built_with_openmp` says so and the caller splits
 * the rows over its own threads. */
#ifndef TTT_THREADS_H
#define TTT_THREADS_H
#include <stdint.h>

typedef int (*range_fn)(const void *ctx, int64_t lo, int64_t hi);

/* fn on nt contiguous ranges of [0, n), one per thread; the OR of their results (0: all fine). */
static inline int run_ranges(range_fn fn, const void *ctx, int64_t n, int64_t nt) {
  int fail = 0;
#pragma omp parallel for num_threads(nt) schedule(static, 1) reduction(| : fail)
  for (int64_t i = 0; i < nt; i++) fail |= fn(ctx, n * i / nt, n * (i + 1) / nt);
  return fail;
}

int built_with_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}
#endif
