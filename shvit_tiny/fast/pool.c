/* A captured model's kernel calls, run on several cores (parallel.py builds this with clang and
   loads it; replay.py gives it the calls).

   tinygrad's THREAD opt splits a kernel across cores: the kernel becomes one C function taking a
   core id, and the call with core id k computes slice k of the output (tinygrad's CPU device runs
   the slices one after another). Here `threads` threads walk the list of calls together: thread t
   runs the slices t, t + threads, ... of each call, then every thread waits at a barrier before
   the next call, which may read what this one wrote. A call that is not split runs on thread 0
   alone, and two such calls in a row need no barrier between them. Each slice is the same code on
   the same data as on one core, so the results are bit for bit those of one core.

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
  int32_t core_arg;    /* the argument the core id goes in; -1: a kernel not split across cores */
  int32_t barrier;     /* 1: every thread finishes the calls before this one first */
  int32_t nargs;
  uint64_t args[MAX_ARGS];  /* buffer addresses and integer values, as tinygrad passes them */
} call_t;

/* Every kernel is called with MAX_ARGS 64-bit arguments, as tinygrad's own CPU workers call them
   (with 63): a C function reads the ones it declares, in registers or 8-byte stack slots. */
typedef void (*kernel_t)(uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t,
                         uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t);

typedef struct pool pool_t;
typedef struct { pool_t *pool; int t; } worker_t;

struct pool {
  int threads;
  pthread_t *ids;
  worker_t *workers;
  pthread_mutex_t run_lock;              /* one replay at a time */
  pthread_mutex_t wake_lock;
  pthread_cond_t wake;                   /* workers sleep on it between replays */
  int generation, quit;                  /* under wake_lock: bumped to start a replay; 1 to end */
  const call_t *calls;
  int ncalls;
  atomic_int arrived, phase;             /* the barrier: threads arrived, and its flip-flopping phase */
  int main_phase;                        /* thread 0's view of the phase */
};

static void call(const call_t *c, int core) {
  uint64_t a[MAX_ARGS];
  memcpy(a, c->args, sizeof a);
  if (c->core_arg >= 0) a[c->core_arg] = (uint64_t)core;
  ((kernel_t)c->fxn)(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]);
}

/* All threads meet here. The last to arrive resets the count and flips the phase; the others
   spin until it flips (a few hundred nanoseconds between cores), yielding the core if it is slow
   to come (more threads than free cores). */
static void barrier(pool_t *p, int *phase) {
  int next = !*phase;
  *phase = next;
  if (atomic_fetch_add(&p->arrived, 1) == p->threads - 1) {
    atomic_store(&p->arrived, 0);
    atomic_store(&p->phase, next);
    return;
  }
  for (long spins = 0; atomic_load(&p->phase) != next; spins++)
    if (spins > 4000) sched_yield();
}

static void walk(pool_t *p, int t, int *phase) {
  for (int i = 0; i < p->ncalls; i++) {
    const call_t *c = &p->calls[i];
    if (c->barrier) barrier(p, phase);
    if (c->core_arg < 0) {
      if (t == 0) call(c, 0);
    } else {
      for (int k = t; k < c->slices; k += p->threads) call(c, k);
    }
  }
  barrier(p, phase);  /* the replay is over when every thread is */
}

static void *work(void *arg) {
  worker_t *w = arg;
  pool_t *p = w->pool;
  int seen = 0, phase = 0;
  for (;;) {
    pthread_mutex_lock(&p->wake_lock);
    while (p->generation == seen && !p->quit) pthread_cond_wait(&p->wake, &p->wake_lock);
    int quit = p->quit;
    seen = p->generation;
    pthread_mutex_unlock(&p->wake_lock);
    if (quit) return NULL;
    walk(p, w->t, &phase);
  }
}

pool_t *pool_new(int threads) {
  pool_t *p = calloc(1, sizeof *p);
  if (p == NULL) return NULL;
  p->threads = threads < 1 ? 1 : threads;
  p->ids = calloc(p->threads, sizeof *p->ids);
  p->workers = calloc(p->threads, sizeof *p->workers);
  pthread_mutex_init(&p->run_lock, NULL);
  pthread_mutex_init(&p->wake_lock, NULL);
  pthread_cond_init(&p->wake, NULL);
  for (int t = 1; t < p->threads; t++) {  /* thread 0 is the caller's */
    p->workers[t] = (worker_t){p, t};
    if (pthread_create(&p->ids[t], NULL, work, &p->workers[t]) != 0) {
      p->threads = t;  /* fewer threads than asked: still correct */
      break;
    }
  }
  return p;
}

int pool_threads(pool_t *p) { return p->threads; }

/* Runs the calls in order, split across the pool's threads; returns when all are done. */
void pool_run(pool_t *p, const call_t *calls, int ncalls) {
  pthread_mutex_lock(&p->run_lock);
  p->calls = calls;
  p->ncalls = ncalls;
  pthread_mutex_lock(&p->wake_lock);
  p->generation++;
  pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->wake_lock);
  walk(p, 0, &p->main_phase);
  pthread_mutex_unlock(&p->run_lock);
}

void pool_free(pool_t *p) {
  pthread_mutex_lock(&p->wake_lock);
  p->quit = 1;
  pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->wake_lock);
  for (int t = 1; t < p->threads; t++) pthread_join(p->ids[t], NULL);
  free(p->ids);
  free(p->workers);
  free(p);
}
