/* SPDX-License-Identifier: MIT */
/*
 * bench_bus — how fast the bus publishes to a NATS server, beside
 * bench/peers/nats_pub.c (the minimal pipelined publisher) against the same
 * server.
 *
 * A port with one worker and a bus; N messages of S bytes to one subject,
 * published the way a game server does it: from the worker (a posted
 * function publishes a slice, then posts itself again, so every round
 * flushes what it queued), or with --from thread from the main thread. When
 * a publish meets the pending bound (-EAGAIN), the slice ends and the next
 * round goes on. The time ends when a marker published last comes back
 * through a second bus's subscription: the server has then read every
 * message before it (one connection's messages stay in order).
 *
 *   bench_bus --port P [--count N] [--size S] [--from worker|thread] [--backend B]
 *
 * Prints "RESULT msgs=N size=S seconds=T msgs_per_s=R cpu_ns_per_msg=C"
 * (CPU of the whole process, all threads, per message).
 */
#include <cport.h>

#include <errno.h>
#include <sched.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SLICE 4096 /* publishes per posted call at most */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

typedef struct run {
    cp_port *port;
    cp_bus *bus;
    long count, sent;
    cp_sendbuf *payload;
    atomic_bool done; /* the marker came back */
    atomic_bool failed;
    sem_t end; /* posted when done or failed: main blocks, it does not poll */
} run;

static int publish_one(run *r) { return cp_bus_publish_buf(r->bus, "bench.pub", r->payload); }

static void publish_slice(void *arg)
{
    run *r = arg;
    for (int i = 0; i < SLICE && r->sent < r->count; i++) {
        int rc = publish_one(r);
        if (rc == -EAGAIN)
            break;
        if (rc != 0) {
            fprintf(stderr, "bench_bus: publish: %s\n", cp_strerror(rc));
            atomic_store(&r->failed, true);
            sem_post(&r->end);
            return;
        }
        r->sent++;
    }
    if (r->sent < r->count)
        cp_port_post(r->port, publish_slice, r);
    else if (cp_bus_publish(r->bus, "bench.done", "x", 1) != 0) {
        atomic_store(&r->failed, true);
        sem_post(&r->end);
    }
}

static void on_done(void *arg, const cp_bus_msg *m)
{
    (void)m;
    run *r = arg;
    if (!atomic_exchange(&r->done, true))
        sem_post(&r->end);
}

static int bus_up(cp_bus *bus)
{
    cp_bus_stats st;
    cp_bus_stats_get(bus, &st);
    return st.connected;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: bench_bus --port P [--count N] [--size S] [--from worker|thread] [--backend B]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    int port_no = 4222;
    long count = 1000000, size = 64;
    int from_thread = 0;
    cp_backend backend = CP_BACKEND_AUTO;
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc)
            usage();
        const char *o = argv[i], *v = argv[++i];
        if (!strcmp(o, "--port"))
            port_no = atoi(v);
        else if (!strcmp(o, "--count"))
            count = atol(v);
        else if (!strcmp(o, "--size"))
            size = atol(v);
        else if (!strcmp(o, "--from") && (!strcmp(v, "worker") || !strcmp(v, "thread")))
            from_thread = !strcmp(v, "thread");
        else if (!strcmp(o, "--backend") && !strcmp(v, "epoll"))
            backend = CP_BACKEND_EPOLL;
        else if (!strcmp(o, "--backend") && !strcmp(v, "uring"))
            backend = CP_BACKEND_URING;
        else
            usage();
    }
    if (port_no <= 0 || port_no > 65535 || count <= 0 || size < 0 || size > 65536)
        usage();
    char url[64];
    snprintf(url, sizeof url, "nats://127.0.0.1:%d", port_no);
    static run r;
    sem_init(&r.end, 0, 0);
    cp_port_opts po = { .workers = 1, .backend = backend };
    cp_bus *watch = NULL;
    cp_bus_sub *sub = NULL;
    cp_bus_opts bo = { .url = url, .name = "bench" };
    if (cp_port_create(&r.port, &po) != 0 || cp_bus_create(&r.bus, r.port, &bo) != 0 ||
        cp_bus_create(&watch, r.port, &bo) != 0) {
        fprintf(stderr, "bench_bus: cannot start\n");
        return 1;
    }
    for (int i = 0; i < 5000 && !(bus_up(r.bus) && bus_up(watch)); i++)
        nanosleep(&(struct timespec){ 0, 1000000 }, NULL);
    if (!bus_up(r.bus) || !bus_up(watch) ||
        cp_bus_subscribe(&sub, watch, "bench.done", NULL, on_done, &r, NULL) != 0) {
        fprintf(stderr, "bench_bus: no NATS server at %s\n", url);
        return 1;
    }
    nanosleep(&(struct timespec){ 0, 100000000 }, NULL); /* the SUB reaches the server */
    char *payload = calloc(1, (size_t)size + 1);
    memset(payload, 'x', (size_t)size);
    r.payload = cp_sendbuf_copy(payload, (size_t)size);
    r.count = count;
    uint64_t t0 = now_ns(), c0 = cpu_ns();
    if (from_thread) {
        while (r.sent < r.count) {
            int rc = publish_one(&r);
            if (rc == -EAGAIN) {
                sched_yield();
                continue;
            }
            if (rc != 0) {
                fprintf(stderr, "bench_bus: publish: %s\n", cp_strerror(rc));
                return 1;
            }
            r.sent++;
        }
        cp_bus_publish(r.bus, "bench.done", "x", 1);
    } else {
        cp_port_post(r.port, publish_slice, &r);
    }
    while (sem_wait(&r.end) != 0)
        ;
    double secs = (double)(now_ns() - t0) / 1e9;
    uint64_t cpu = cpu_ns() - c0;
    if (atomic_load(&r.failed))
        return 1;
    printf("RESULT msgs=%ld size=%ld seconds=%.3f msgs_per_s=%.0f cpu_ns_per_msg=%.1f\n", count, size, secs,
           (double)count / secs, (double)cpu / (double)count);
    cp_bus_unsubscribe(sub);
    cp_sendbuf_unref(r.payload);
    cp_bus_destroy(watch);
    cp_bus_destroy(r.bus);
    cp_port_destroy(r.port);
    free(payload);
    return 0;
}
