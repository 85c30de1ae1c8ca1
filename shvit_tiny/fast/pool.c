/* A captured model's kernel calls, run on several cores (parallel.py builds this with clang and
   loads it; replay.py gives it the calls).

   tinygrad's THREAD opt splits a kernel across cores: the kernel becomes one C function taking a
   core id, and the call with core id k computes slice k of the output (tinygrad's CPU device runs
   the slices one after another). Here `threads` threads walk the list of calls together. Each
   kernel waits until every slice of the kernel before it is done (it may read what that one
   wrote), then every thread takes the next slice not yet taken (an atomic counter) until none is
   left. A kernel that is not split is one slice. No thread waits for another thread, only for
   work to be done: a thread that has lost its core (another program's threads spinning on it,
   as OpenBLAS's do after each call) holds no one up unless it holds a slice, and the others take
   the rest. (A barrier after each kernel, waiting for every thread, cost a third of two cores'
   speed beside such threads.) Each slice is the same code on the same data as on one core, so the
   results are bit for bit those of one core.

   One thread (threads = 1) walks the list alone: still worth it, one C loop instead of one
   Python-to-C call per kernel (~2 us each, 170 kernels for S1). */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ARGS 16

typedef struct {
  void (*fxn)(void);   /* the kernel */
  int32_t slices;      /* core ids 0 .. slices-1 */
  int32_t core_arg;    /* the argument the core id goes in; -1: a kernel not split (one slice) */
  uint64_t args[MAX_ARGS];  /* buffer addresses and integer values, as tinygrad passes them */
  atomic_int next, done;    /* slices taken, slices finished (pool_run sets both to 0) */
} call_t;

/* Every kernel is called with MAX_ARGS 64-bit arguments, as tinygrad's own CPU workers call them
   (with 63): a C function reads the ones it declares, in registers or 8-byte stack slots. */
typedef void (*kernel_t)(uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t,
                         uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t);

typedef struct pool {
  int threads;
  pthread_t *ids;                        /* the workers: threads 1 .. threads-1 (thread 0 is the caller) */
  pthread_mutex_t run_lock;              /* one replay at a time */
  pthread_mutex_t wake_lock;
  pthread_cond_t wake;                   /* workers sleep on it between replays */
  int generation, quit;                  /* under wake_lock: bumped to start a replay; 1 to end */
  call_t *calls;
  int ncalls;
  atomic_int walking;                    /* workers still walking the current replay's calls */
} pool_t;

static void call(const call_t *c, int core) {
  uint64_t a[MAX_ARGS];
  memcpy(a, c->args, sizeof a);
  if (c->core_arg >= 0) a[c->core_arg] = (uint64_t)core;
  ((kernel_t)c->fxn)(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]);
}

/* Until every slice of c is done: spin (a few hundred nanoseconds between cores), yielding the
   core if that takes long (more threads than free cores). */
static void wait_done(call_t *c) {
  for (long spins = 0; atomic_load(&c->done) < c->slices; spins++)
    if (spins > 4000) sched_yield();
}

static void walk(pool_t *p) {
  for (int i = 0; i < p->ncalls; i++) {
    call_t *c = &p->calls[i];
    if (i > 0) wait_done(&p->calls[i - 1]);
    for (int k; (k = atomic_fetch_add(&c->next, 1)) < c->slices; atomic_fetch_add(&c->done, 1)) call(c, k);
  }
}

static void *work(void *arg) {
  pool_t *p = arg;
  int seen = 0;
  for (;;) {
    pthread_mutex_lock(&p->wake_lock);
    while (p->generation == seen && !p->quit) pthread_cond_wait(&p->wake, &p->wake_lock);
    int quit = p->quit;
    seen = p->generation;
    pthread_mutex_unlock(&p->wake_lock);
    if (quit) return NULL;
    walk(p);
    atomic_fetch_sub(&p->walking, 1);
  }
}

/* A batch's finiteness, as a kernel replay.py puts first in the list of calls, cut into slices
   like the others: slice `core` of `slices` looks at its part of the n floats at x and sets *flag
   where one is a NaN or an infinity (its exponent bits all ones). One pass over the batch, on
   every core, instead of numpy's isfinite before the call (~1.5 ms of an S1 batch of 16). */
void shvit_nonfinite(uint64_t x, uint64_t n, uint64_t flag, uint64_t slices, uint64_t core) {
  const uint32_t *v = (const uint32_t *)(uintptr_t)x;
  uint32_t bad = 0;
  for (uint64_t i = n * core / slices, hi = n * (core + 1) / slices; i < hi; i++)
    bad |= (v[i] & 0x7f800000u) == 0x7f800000u;
  if (bad) *(volatile int32_t *)(uintptr_t)flag = 1;
}

pool_t *pool_new(int threads) {
  pool_t *p = calloc(1, sizeof *p);
  if (p == NULL) return NULL;
  p->threads = threads < 1 ? 1 : threads;
  p->ids = calloc(p->threads, sizeof *p->ids);
  pthread_mutex_init(&p->run_lock, NULL);
  pthread_mutex_init(&p->wake_lock, NULL);
  pthread_cond_init(&p->wake, NULL);
  for (int t = 1; t < p->threads; t++) {  /* thread 0 is the caller's */
    if (pthread_create(&p->ids[t], NULL, work, p) != 0) {
      p->threads = t;  /* fewer threads than asked: still correct */
      break;
    }
  }
  return p;
}

int pool_threads(pool_t *p) { return p->threads; }

/* Runs the calls in order, split across the pool's threads; returns when all are done. */
void pool_run(pool_t *p, call_t *calls, int ncalls) {
  pthread_mutex_lock(&p->run_lock);
  for (long spins = 0; atomic_load(&p->walking) > 0; spins++)  /* a late worker still passing the last replay */
    if (spins > 4000) sched_yield();
  for (int i = 0; i < ncalls; i++) {
    atomic_store(&calls[i].next, 0);
    atomic_store(&calls[i].done, 0);
  }
  p->calls = calls;
  p->ncalls = ncalls;
  atomic_store(&p->walking, p->threads - 1);
  pthread_mutex_lock(&p->wake_lock);
  p->generation++;
  pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->wake_lock);
  walk(p);
  if (ncalls > 0) wait_done(&calls[ncalls - 1]);
  pthread_mutex_unlock(&p->run_lock);
}

void pool_free(pool_t *p) {
  pthread_mutex_lock(&p->wake_lock);
  p->quit = 1;
  pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->wake_lock);
  for (int t = 1; t < p->threads; t++) pthread_join(p->ids[t], NULL);
  free(p->ids);
  free(p);
}
