/* SPDX-License-Identifier: MIT */
/*
 * bench_jobq — cost of cport's job queues and timers.
 *
 *   jobs:   N jobs pushed onto one queue from P threads, until all have run
 *           (push + schedule + run, end to end), and the same spread over Q
 *           queues;
 *   timers: N one-shot timers armed far in the future and then cancelled,
 *           including the workers' heap work (a post after the last message
 *           to each worker marks when it has all been done).
 *
 * Usage: bench_jobq [--jobs N] [--threads P] [--queues Q] [--timers N] [--workers W]
 * Prints one RESULT line per measurement. Exit 2 on bad arguments.
 */
#include <cport.h>

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static atomic_long ran;

static void job(void *arg)
{
    (void)arg;
    atomic_fetch_add_explicit(&ran, 1, memory_order_relaxed);
}

typedef struct pusher {
    cp_jobq **qs;
    int nq;
    long n;
} pusher;

static void *push_thread(void *arg)
{
    pusher *p = arg;
    for (long i = 0; i < p->n; i++) {
        while (cp_jobq_push(p->qs[i % p->nq], job, NULL) == -ENOMEM)
            ;
    }
    return NULL;
}

static void run_jobs(cp_port *port, long n, int threads, int nq)
{
    cp_jobq **qs = calloc((size_t)nq, sizeof *qs);
    for (int i = 0; i < nq; i++)
        cp_jobq_create(&qs[i], port);
    atomic_store(&ran, 0);
    pthread_t th[64];
    pusher p[64];
    uint64_t t0 = now_ns();
    for (int i = 0; i < threads; i++) {
        p[i] = (pusher){ qs, nq, n / threads };
        pthread_create(&th[i], NULL, push_thread, &p[i]);
    }
    for (int i = 0; i < threads; i++)
        pthread_join(th[i], NULL);
    long want = (n / threads) * threads;
    while (atomic_load(&ran) < want)
        ;
    uint64_t t = now_ns() - t0;
    printf("RESULT bench=jobs jobs=%ld threads=%d queues=%d secs=%.3f jobs_per_s=%.0f ns_per_job=%.1f\n",
           want, threads, nq, (double)t / 1e9, (double)want * 1e9 / (double)t, (double)t / (double)want);
    for (int i = 0; i < nq; i++) {
        cp_jobq_close(qs[i], NULL, NULL);
        cp_jobq_unref(qs[i]);
    }
    free(qs);
}

static atomic_int marks;
static void mark(void *arg)
{
    (void)arg;
    atomic_fetch_add(&marks, 1);
}

/* Waits until every worker has handled what was sent to it before: a post
 * per worker is delivered after the earlier messages of this thread. */
static void settle(cp_port *port)
{
    int w = cp_port_workers(port);
    atomic_store(&marks, 0);
    for (int i = 0; i < w * 4; i++) /* round-robin: every worker gets some */
        cp_port_post(port, mark, NULL);
    while (atomic_load(&marks) < w * 4)
        ;
}

static void never(void *arg) { (void)arg; }

static void run_timers(cp_port *port, long n)
{
    cp_timer **t = calloc((size_t)n, sizeof *t);
    uint64_t t0 = now_ns();
    for (long i = 0; i < n; i++)
        cp_timer_start(&t[i], port, 3600000 + (uint64_t)(i % 1000), 0, never, NULL, NULL);
    settle(port);
    uint64_t t1 = now_ns();
    for (long i = 0; i < n; i++)
        cp_timer_cancel(t[i]);
    settle(port);
    uint64_t t2 = now_ns();
    printf("RESULT bench=timers timers=%ld arm_ns=%.1f cancel_ns=%.1f\n", n, (double)(t1 - t0) / (double)n,
           (double)(t2 - t1) / (double)n);
    free(t);
}

static long arg_long(const char *s, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < lo || v > hi) {
        fprintf(stderr, "bench_jobq: bad number '%s'\n", s);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    long jobs = 1000000, timers = 100000;
    int threads = 4, queues = 64, workers = 0;
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc) {
            fprintf(stderr,
                    "usage: bench_jobq [--jobs N] [--threads P] [--queues Q] [--timers N] [--workers W]\n");
            return 2;
        }
        if (!strcmp(argv[i], "--jobs"))
            jobs = arg_long(argv[++i], 1, 1000000000);
        else if (!strcmp(argv[i], "--threads"))
            threads = (int)arg_long(argv[++i], 1, 64);
        else if (!strcmp(argv[i], "--queues"))
            queues = (int)arg_long(argv[++i], 1, 100000);
        else if (!strcmp(argv[i], "--timers"))
            timers = arg_long(argv[++i], 1, 100000000);
        else if (!strcmp(argv[i], "--workers"))
            workers = (int)arg_long(argv[++i], 0, 1024);
        else {
            fprintf(stderr,
                    "usage: bench_jobq [--jobs N] [--threads P] [--queues Q] [--timers N] [--workers W]\n");
            return 2;
        }
    }
    cp_port *port;
    int r = cp_port_create(&port, &(cp_port_opts){ .workers = workers });
    if (r < 0) {
        fprintf(stderr, "bench_jobq: %s\n", cp_strerror(r));
        return 1;
    }
    run_jobs(port, jobs, 1, 1);
    run_jobs(port, jobs, threads, 1);
    run_jobs(port, jobs, threads, queues);
    run_timers(port, timers);
    cp_port_destroy(port);
    return 0;
}
