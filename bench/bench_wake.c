/* SPDX-License-Identifier: MIT */
/*
 * bench_wake — the cost of one worker waking another.
 *
 * C chains of cp_port_post hops on a 2-worker port: each hop posts the next
 * one, and the port picks workers round-robin, so with one chain every hop
 * lands on the other worker, which is asleep: one cross-worker wake-up per
 * hop. With more chains, wake-ups batch (an inbox that already holds work
 * is not woken again). Reports hops per second and the process's CPU time
 * per hop (both workers; the main thread sleeps).
 *
 *   bench_wake [--hops N] [--chains C] [--workers W]
 * Run it per wake-up path: CP_BACKEND=uring CP_URING_WAKE=eventfd|msgring.
 */
#include <cport.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

static cp_port *port;
static atomic_int chains_left;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;

static void hop(void *arg)
{
    long *left = arg;
    if (--*left > 0) {
        cp_port_post(port, hop, arg);
        return;
    }
    if (atomic_fetch_sub(&chains_left, 1) == 1) {
        pthread_mutex_lock(&lock);
        pthread_cond_signal(&cond);
        pthread_mutex_unlock(&lock);
    }
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_s(struct rusage *ru)
{
    getrusage(RUSAGE_SELF, ru);
    return (double)ru->ru_utime.tv_sec + (double)ru->ru_utime.tv_usec / 1e6 + (double)ru->ru_stime.tv_sec +
           (double)ru->ru_stime.tv_usec / 1e6;
}

int main(int argc, char **argv)
{
    long hops = 200000;
    int chains = 1, workers = 2;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--hops") && i + 1 < argc)
            hops = atol(argv[++i]);
        else if (!strcmp(argv[i], "--chains") && i + 1 < argc)
            chains = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--workers") && i + 1 < argc)
            workers = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: bench_wake [--hops N] [--chains C] [--workers W]\n");
            return 2;
        }
    }
    if (hops < 1 || chains < 1 || workers < 1) {
        fprintf(stderr, "usage: bench_wake [--hops N] [--chains C] [--workers W]\n");
        return 2;
    }
    cp_port_opts po = { .workers = workers };
    int rc = cp_port_create(&port, &po);
    if (rc) {
        fprintf(stderr, "bench_wake: %s\n", cp_strerror(rc));
        return 1;
    }
    long *left = calloc((size_t)chains, sizeof *left);
    long per = hops / chains;
    atomic_store(&chains_left, chains);
    struct rusage r0, r1;
    double c0 = cpu_s(&r0), t0 = now_s();
    for (int i = 0; i < chains; i++) {
        left[i] = per;
        cp_port_post(port, hop, &left[i]);
    }
    pthread_mutex_lock(&lock);
    while (atomic_load(&chains_left) > 0)
        pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    double t1 = now_s(), c1 = cpu_s(&r1);
    long done = per * chains;
    printf("RESULT backend=%s wake=%s chains=%d hops=%ld secs=%.3f hops_per_s=%.0f cpu_ns_per_hop=%.0f "
           "wall_ns_per_hop=%.0f vcsw=%ld ivcsw=%ld\n",
           cp_port_backend_name(port), getenv("CP_URING_WAKE") ? getenv("CP_URING_WAKE") : "default", chains,
           done, t1 - t0, done / (t1 - t0), (c1 - c0) * 1e9 / done, (t1 - t0) * 1e9 / done,
           r1.ru_nvcsw - r0.ru_nvcsw, r1.ru_nivcsw - r0.ru_nivcsw);
    cp_port_destroy(port);
    free(left);
    return 0;
}
