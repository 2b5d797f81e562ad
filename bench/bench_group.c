/* SPDX-License-Identifier: MIT */
/*
 * bench_group — group broadcast from user threads: what a call costs, and
 * what a flood of them does to the rest of the server.
 *
 * A port (W workers) serves M loopback clients; every session joins one
 * group on connect; a reader thread drains every client (epoll), so the
 * server really writes what it queues. Then:
 *
 *   calls:      T threads (1, then 4) each broadcast K 9-byte packets as fast
 *               as they can: ns per call and per member on the calling
 *               threads, and the end-to-end rate (until the clients have read
 *               every byte);
 *   changes:    while 4 threads flood the group for D ms, another thread
 *               removes and re-adds a member up to 200 times, spread over
 *               the flood: the time each pair took (median, p99, max);
 *   disconnect: while F threads (1, then 4) flood the group for D ms,
 *               10 members are disconnected by id, 50 ms apart: the time from
 *               the call to their on_disconnected (median, max);
 *   stop:       cp_service_stop while 4 threads flood (after D ms of it).
 *
 * Usage: bench_group [--members M] [--broadcasts K] [--flood-ms D] [--workers W] [--calls-only 1]
 * Prints one RESULT line per measurement. Linux only (epoll reader).
 */
#include <cport.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXM 4096

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void sleep_ms(unsigned ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

/* ------------------------------------------------------------------ server */

static cp_group *room;
static cp_session *kept_member; /* member 0, kept for the membership changes */
static _Atomic uint64_t ids[MAXM];
static atomic_int nconnected;
static _Atomic uint64_t disc_at[MAXM]; /* when on_disconnected ran, by slot */

static void on_connected(cp_session *s)
{
    int i = atomic_fetch_add(&nconnected, 1);
    if (i < MAXM) {
        cp_session_set_data(s, (void *)(intptr_t)i);
        atomic_store(&ids[i], cp_session_id(s));
    }
    cp_group_add(room, s);
}

static void on_disconnected(cp_session *s, cp_reason reason, int err)
{
    (void)reason, (void)err;
    intptr_t i = (intptr_t)cp_session_data(s);
    if (i >= 0 && i < MAXM)
        atomic_store(&disc_at[i], now_ns());
}

/* ------------------------------------------------------------------ clients */

static atomic_llong bytes_read;
static atomic_int stop_reader;

static void *reader_main(void *arg)
{
    int ep = (int)(intptr_t)arg;
    static char buf[1 << 16];
    struct epoll_event ev[64];
    while (!atomic_load(&stop_reader)) {
        int n = epoll_wait(ep, ev, 64, 10);
        for (int i = 0; i < n; i++) {
            ssize_t r;
            while ((r = recv(ev[i].data.fd, buf, sizeof buf, MSG_DONTWAIT)) > 0)
                atomic_fetch_add(&bytes_read, r);
            if (r == 0)
                epoll_ctl(ep, EPOLL_CTL_DEL, ev[i].data.fd, NULL);
        }
    }
    return NULL;
}

static int connect_to(uint16_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        perror("bench_group: connect");
        exit(1);
    }
    return fd;
}

/* ------------------------------------------------------------------ flood */

typedef struct flooder {
    long k; /* broadcasts to make; 0: until stop_flood or until_ns */
    uint64_t until_ns;
    long made;
    uint64_t ns; /* time spent in the calls */
} flooder;

static atomic_int stop_flood;

static void *flood_main(void *arg)
{
    flooder *f = arg;
    cp_sendbuf *b = cp_packet_make(9, "flood", 5);
    uint64_t t0 = now_ns();
    while (f->k ? f->made < f->k : !atomic_load(&stop_flood) && now_ns() < f->until_ns) {
        cp_group_broadcast(room, b);
        f->made++;
    }
    f->ns = now_ns() - t0;
    cp_sendbuf_unref(b);
    return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void run_calls(int threads, long k, int members)
{
    long long before = atomic_load(&bytes_read);
    flooder f[8];
    pthread_t th[8];
    uint64_t t0 = now_ns();
    for (int i = 0; i < threads; i++) {
        f[i] = (flooder){ .k = k };
        pthread_create(&th[i], NULL, flood_main, &f[i]);
    }
    uint64_t call_ns = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], NULL);
        call_ns += f[i].ns;
    }
    long long want = before + (long long)threads * k * members * 9;
    while (atomic_load(&bytes_read) < want)
        sleep_ms(1);
    uint64_t t = now_ns() - t0;
    printf("RESULT bench=calls threads=%d members=%d broadcasts=%ld ns_per_call=%.0f ns_per_member=%.1f "
           "end_to_end_s=%.3f member_sends_per_s=%.0f\n",
           threads, members, (long)threads * k, (double)call_ns / (double)(threads * k),
           (double)call_ns / (double)(threads * k) / members, (double)t / 1e9,
           (double)threads * k * members * 1e9 / (double)t);
}

/* A flood ends at end_flood, or by itself after ms (a thread of the bench may
 * be blocked by it, before the fix). */
static void start_flood(int threads, flooder *f, pthread_t *th, unsigned ms)
{
    atomic_store(&stop_flood, 0);
    for (int i = 0; i < threads; i++) {
        f[i] = (flooder){ .until_ns = now_ns() + (uint64_t)ms * 1000000u };
        pthread_create(&th[i], NULL, flood_main, &f[i]);
    }
}

static long end_flood(int threads, flooder *f, pthread_t *th)
{
    atomic_store(&stop_flood, 1);
    long made = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], NULL);
        made += f[i].made;
    }
    return made;
}

static void run_changes(int members, unsigned flood_ms)
{
    enum { PAIRS = 200 };
    flooder f[4];
    pthread_t th[4];
    start_flood(4, f, th, flood_ms);
    sleep_ms(20);
    uint64_t t_pair[PAIRS];
    uint64_t end = now_ns() + (uint64_t)flood_ms * 1000000u;
    int done = 0;
    for (; done < PAIRS && now_ns() < end; done++) {
        uint64_t t0 = now_ns();
        cp_group_remove(room, kept_member);
        cp_group_add(room, kept_member);
        t_pair[done] = now_ns() - t0;
        sleep_ms(flood_ms / (2 * PAIRS) + 1); /* spread over the flood */
    }
    long made = end_flood(4, f, th);
    qsort(t_pair, (size_t)done, sizeof *t_pair, cmp_u64);
    printf("RESULT bench=changes flood_threads=4 members=%d pairs=%d median_us=%.1f p99_us=%.1f max_us=%.1f "
           "broadcasts=%ld\n",
           members, done, done ? (double)t_pair[done / 2] / 1e3 : 0,
           done ? (double)t_pair[done * 99 / 100] / 1e3 : 0, done ? (double)t_pair[done - 1] / 1e3 : 0, made);
}

static void run_disconnects(cp_service *svc, int threads, int first, unsigned flood_ms)
{
    enum { D = 10 };
    flooder f[8];
    pthread_t th[8];
    start_flood(threads, f, th, flood_ms);
    sleep_ms(20);
    uint64_t asked[D];
    for (int i = 0; i < D; i++) {
        asked[i] = now_ns();
        cp_service_disconnect_id(svc, atomic_load(&ids[first + i]));
        sleep_ms(flood_ms / (D + 1));
    }
    long made = end_flood(threads, f, th);
    uint64_t flood_end = now_ns();
    uint64_t lat[D];
    int late = 0;
    for (int i = 0; i < D; i++) {
        while (!atomic_load(&disc_at[first + i]))
            sleep_ms(1);
        lat[i] = atomic_load(&disc_at[first + i]) - asked[i];
        late += atomic_load(&disc_at[first + i]) > flood_end;
    }
    qsort(lat, D, sizeof *lat, cmp_u64);
    printf("RESULT bench=disconnect flood_threads=%d median_ms=%.2f max_ms=%.2f after_flood_ended=%d "
           "broadcasts=%ld\n",
           threads, (double)lat[D / 2] / 1e6, (double)lat[D - 1] / 1e6, late, made);
}

static long arg_long(const char *s, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < lo || v > hi) {
        fprintf(stderr, "bench_group: bad number '%s'\n", s);
        exit(2);
    }
    return v;
}

typedef struct stop_arg {
    cp_service *svc;
    uint64_t ns;
    atomic_int done;
} stop_arg;

static void *stop_main(void *arg)
{
    stop_arg *a = arg;
    uint64_t t0 = now_ns();
    cp_service_stop(a->svc);
    a->ns = now_ns() - t0;
    atomic_store(&a->done, 1);
    return NULL;
}

/* Member 0 is kept: the membership changes use it from the bench's thread. */
static void keep_on_connected(cp_session *s)
{
    on_connected(s);
    if ((intptr_t)cp_session_data(s) == 0) {
        cp_session_ref(s);
        kept_member = s;
    }
}

int main(int argc, char **argv)
{
    int members = 200, workers = 2;
    long k = 2000;
    unsigned flood_ms = 1000;
    bool calls_only = false;
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc)
            goto usage;
        if (!strcmp(argv[i], "--members"))
            members = (int)arg_long(argv[++i], 12, MAXM);
        else if (!strcmp(argv[i], "--broadcasts"))
            k = arg_long(argv[++i], 1, 100000000);
        else if (!strcmp(argv[i], "--flood-ms"))
            flood_ms = (unsigned)arg_long(argv[++i], 100, 600000);
        else if (!strcmp(argv[i], "--workers"))
            workers = (int)arg_long(argv[++i], 1, 1024);
        else if (!strcmp(argv[i], "--calls-only"))
            calls_only = arg_long(argv[++i], 0, 1) != 0;
        else
            goto usage;
    }
    cp_port *port;
    int r = cp_port_create(&port, &(cp_port_opts){ .workers = workers });
    if (r < 0) {
        fprintf(stderr, "bench_group: %s\n", cp_strerror(r));
        return 1;
    }
    cp_group_create(&room);
    for (int i = 0; i < MAXM; i++)
        atomic_store(&disc_at[i], 0);
    cp_handlers h = { .on_connected = keep_on_connected, .on_disconnected = on_disconnected };
    cp_server_opts so = { .host = "127.0.0.1", .max_sessions = MAXM, .session.send_queue_limit = 256u << 20 };
    cp_service *svc;
    if ((r = cp_server_start(&svc, port, &so, &h, NULL)) < 0) {
        fprintf(stderr, "bench_group: cp_server_start: %s\n", cp_strerror(r));
        return 1;
    }
    int ep = epoll_create1(0);
    int *fds = malloc(sizeof *fds * (size_t)members);
    for (int i = 0; i < members; i++) {
        fds[i] = connect_to(cp_service_listen_port(svc));
        struct epoll_event ev = { .events = EPOLLIN, .data.fd = fds[i] };
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
    }
    while (atomic_load(&nconnected) < members || cp_group_size(room) < (size_t)members)
        sleep_ms(1);
    pthread_t rd;
    pthread_create(&rd, NULL, reader_main, (void *)(intptr_t)ep);
    printf("bench_group: backend %s, %d workers, %d members\n", cp_port_backend_name(port), workers, members);

    run_calls(1, k, members);
    run_calls(4, k, members);
    if (calls_only) {
        fflush(stdout);
        _exit(0);
    }
    run_changes(members, flood_ms);
    run_disconnects(svc, 1, 1, flood_ms);
    run_disconnects(svc, 4, 1 + 10, flood_ms);

    /* The stop while 4 threads flood: it waits for what the flood queued
     * before it. On a thread of its own, so that a hang is reported. */
    flooder f[4];
    pthread_t th[4];
    start_flood(4, f, th, 600000);
    sleep_ms(flood_ms);
    cp_session_unref(kept_member);
    stop_arg sa = { .svc = svc };
    pthread_t st;
    pthread_create(&st, NULL, stop_main, &sa);
    uint64_t t0 = now_ns();
    while (!atomic_load(&sa.done) && now_ns() - t0 < 20000000000u)
        sleep_ms(1);
    if (!atomic_load(&sa.done)) {
        printf("RESULT bench=stop flood_threads=4 flood_ms=%u stop_ms=hung(>20000)\n", flood_ms);
        fflush(stdout);
        _exit(0);
    }
    pthread_join(st, NULL);
    long made = end_flood(4, f, th);
    printf("RESULT bench=stop flood_threads=4 flood_ms=%u stop_ms=%.1f broadcasts=%ld\n", flood_ms,
           (double)sa.ns / 1e6, made);
    atomic_store(&stop_reader, 1);
    pthread_join(rd, NULL);
    for (int i = 0; i < members; i++)
        close(fds[i]);
    free(fds);
    close(ep);
    cp_group_destroy(room);
    cp_port_destroy(port);
    return 0;
usage:
    fprintf(stderr, "usage: bench_group [--members M] [--broadcasts K] [--flood-ms D] [--workers W] "
                    "[--calls-only 1]\n");
    return 2;
}
