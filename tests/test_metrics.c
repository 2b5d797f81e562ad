/* SPDX-License-Identifier: MIT */
/*
 * Metrics (cp_service_metrics_get, cp_port_metrics_get): the counters match
 * a known load exactly, the send-queue histogram follows a queue that grows
 * and empties, and the workers' loop metrics see a round that blocks, the
 * messages waiting behind it, jobs that waited and timers armed.
 */
#include "helpers.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

Test(metrics, bucket_bounds)
{
    cr_assert_eq(cp_metrics_bucket_le(0), 0u);
    cr_assert_eq(cp_metrics_bucket_le(1), 1u);
    cr_assert_eq(cp_metrics_bucket_le(2), 2u);
    cr_assert_eq(cp_metrics_bucket_le(3), 4u);
    cr_assert_eq(cp_metrics_bucket_le(CP_METRICS_BUCKETS - 2), UINT64_C(1) << (CP_METRICS_BUCKETS - 3));
    cr_assert_eq(cp_metrics_bucket_le(CP_METRICS_BUCKETS - 1), UINT64_MAX);
}

static cp_service_metrics metrics(const cp_service *svc, uint64_t *routes, size_t n)
{
    cp_service_metrics m;
    cp_service_metrics_get(svc, &m, routes, n);
    return m;
}

/* Three sessions send packets with routed and unrouted ids; one ends with
 * its FIN, one with a header too small, one with a packet too big. Every
 * counter comes out exact. */
Test(metrics, counts_match_a_known_load, .timeout = 30)
{
    enum { BODY = 10 };
    /* Ids 1 and 2 routed; 0 is below the top route without one (on_packet's),
     * 7 above it. */
    static const cp_route routes[] = { { 1, cpt_on_packet }, { 2, cpt_on_packet } };
    cp_server_opts o = { .host = CPT_HOST4,
                         .max_sessions = 8,
                         .session = { .routes = routes, .nroutes = 2 } };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 8, 0);
    static const char body[BODY] = "0123456789";
    int a = cpt_xconnect(e.sport), b = cpt_xconnect(e.sport), c = cpt_xconnect(e.sport);
    const struct {
        int fd;
        uint16_t id;
        int n;
    } load[] = { { a, 1, 5 }, { a, 2, 3 }, { b, 7, 4 }, { b, 0, 2 }, { c, 1, 1 } };
    int total = 0;
    for (size_t i = 0; i < sizeof load / sizeof load[0]; i++) {
        for (int k = 0; k < load[i].n; k++) {
            cpt_xsend_packet(load[i].fd, load[i].id, body, BODY);
            cpt_xrecv_packet_eq(load[i].fd, load[i].id, body, BODY);
        }
        total += load[i].n;
    }
    uint64_t routed[4] = { 99, 99, 99, 99 };
    cp_service_metrics m = metrics(e.svc, routed, 4);
    cr_assert_eq(m.nroutes, 3u);
    cr_assert_eq(routed[0], 2u);
    cr_assert_eq(routed[1], 6u);
    cr_assert_eq(routed[2], 3u);
    cr_assert_eq(routed[3], 0u, "beyond nroutes: zeroed, not read");
    cr_assert_eq(m.unrouted_packets, 4u);
    cr_assert_eq(m.stats.packets_in, (uint64_t)total);
    cr_assert_eq(m.stats.packets_out, (uint64_t)total, "every packet echoed: one buffer queued each");
    cr_assert_eq(m.stats.bytes_in, (uint64_t)total * (4 + BODY));
    CPT_AWAIT(cpt_stats(e.svc).bytes_out == (uint64_t)total * (4 + BODY), 2000, "bytes_out");
    cr_assert_eq(m.stats.accepted, 3u);
    cr_assert_eq(m.stats.sessions, 3u);

    uint8_t small[4], big[4];
    cpt_put_header(small, 2, 0);   /* size 2 < the header */
    cpt_put_header(big, 60000, 1); /* above max_packet (4096) */
    cpt_xsend(b, small, sizeof small);
    cpt_xsend(c, big, sizeof big);
    cpt_close(a);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 3, 5000, "not all disconnected");
    m = metrics(e.svc, NULL, 0);
    cr_assert_eq(m.stats.by_reason[CP_REASON_PEER_CLOSED], 1u);
    cr_assert_eq(m.stats.by_reason[CP_REASON_BAD_HEADER], 1u);
    cr_assert_eq(m.stats.by_reason[CP_REASON_TOO_BIG], 1u);
    cr_assert_eq(m.stats.disconnected, 3u);
    cr_assert_eq(m.stats.packets_in, (uint64_t)total, "the bad headers are no packets");
    cpt_close(b);
    cpt_close(c);
    cpt_env_stop(&e);
}

/* A session whose peer does not read: its queue grows to megabytes and sits
 * in the histogram's bucket for its size, beside an idle session in bucket
 * 0; once the peer has gone, nothing is left in the histogram. */
Test(metrics, send_queue_histogram_follows_a_queue, .timeout = 30)
{
    enum { CHUNK = 60000, CHUNKS = 400 }; /* 24 MB: well past what the sockets buffer */
    cp_server_opts o = { .host = CPT_HOST4,
                         .max_sessions = 4,
                         .session = { .send_queue_limit = 64u << 20, .send_queue_high = 64u << 20 } };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 4, CPT_KEEP_REFS);
    int fd = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    int idle = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == 2, 5000, "not connected");
    cp_session *s = e.t->recs[0].s;
    uint8_t *chunk = calloc(1, CHUNK);
    for (int i = 0; i < CHUNKS; i++)
        cr_assert_eq(cp_session_send_copy(s, chunk, CHUNK), 0);
    free(chunk);
    /* Settles once the kernel's buffers are full: the queue stops shrinking. */
    uint64_t last = 0;
    for (int i = 0; i < 50; i++) {
        cpt_sleep_ms(20);
        uint64_t now = metrics(e.svc, NULL, 0).send_queue.sum;
        if (now == last && now)
            break;
        last = now;
    }
    cp_service_metrics m = metrics(e.svc, NULL, 0);
    uint64_t mem = m.send_queue.sum;
    cr_assert_geq(mem, (uint64_t)8 << 20, "queued %llu", (unsigned long long)mem);
    cr_assert_eq(m.send_queue.count, 2u);
    cr_assert_eq(m.send_queue.buckets[0], 1u, "the idle session");
    int k = 1;
    while (cp_metrics_bucket_le(k) < mem)
        k++;
    for (int i = 1; i < CP_METRICS_BUCKETS; i++)
        cr_assert_eq(m.send_queue.buckets[i], i == k ? 1u : 0u, "bucket %d (le %llu) holds %llu; %llu queued",
                     i, (unsigned long long)cp_metrics_bucket_le(i),
                     (unsigned long long)m.send_queue.buckets[i], (unsigned long long)mem);
    /* The peer reads it all: the completed writes empty the queue. */
    uint8_t *sink = malloc((size_t)CHUNK * CHUNKS);
    cpt_xrecv(fd, sink, (size_t)CHUNK * CHUNKS);
    free(sink);
    CPT_AWAIT(metrics(e.svc, NULL, 0).send_queue.sum == 0, 5000, "still queued: %llu",
              (unsigned long long)metrics(e.svc, NULL, 0).send_queue.sum);
    m = metrics(e.svc, NULL, 0);
    cr_assert_eq(m.send_queue.buckets[0], 2u);
    cr_assert_eq(m.send_queue.buckets[k], 0u);
    cpt_close(fd);
    cpt_close(idle);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 2, 5000, "not disconnected");
    CPT_AWAIT(cpt_stats(e.svc).sessions == 0, 5000, "sessions left");
    m = metrics(e.svc, NULL, 0);
    cr_assert_eq(m.send_queue.sum, 0u);
    cr_assert_eq(m.send_queue.count, 0u);
    for (int i = 0; i < CP_METRICS_BUCKETS; i++)
        cr_assert_eq(m.send_queue.buckets[i], 0u, "bucket %d", i);
    cpt_env_stop(&e);
}

static atomic_int released, ran;

static void blocker(void *arg)
{
    (void)arg;
    uint64_t until = cpt_now_ms() + 5000;
    while (!atomic_load(&released) && cpt_now_ms() < until)
        cpt_sleep_ms(1);
    cpt_sleep_ms(5);
    atomic_fetch_add(&ran, 1);
}

static void noop(void *arg)
{
    (void)arg;
    atomic_fetch_add(&ran, 1);
}

static uint64_t from_bucket(const cp_histogram *h, uint64_t le)
{
    uint64_t n = 0;
    for (int k = 0; k < CP_METRICS_BUCKETS; k++)
        if (cp_metrics_bucket_le(k) >= le)
            n += h->buckets[k];
    return n;
}

static uint64_t buckets_sum(const cp_histogram *h)
{
    uint64_t n = 0;
    for (int k = 0; k < CP_METRICS_BUCKETS; k++)
        n += h->buckets[k];
    return n;
}

/* One worker, blocked by a post for 100 ms: the messages sent meanwhile
 * show as its inbox depth, jobs pushed meanwhile waited that long, the round
 * took that long; sessions with an idle timeout are timers armed. */
Test(metrics, worker_loop, .timeout = 30)
{
    enum { POSTS = 10, JOBS = 50 };
    cp_server_opts o = { .host = CPT_HOST4, .max_sessions = 8, .session = { .idle_timeout_ms = 60000 } };
    cpt_env e;
    cpt_env_start(&e, 1, &o, NULL, 8, 0);
    cp_worker_metrics wm, all;
    cr_assert_eq(cp_port_metrics_get(e.port, 1, &wm), -EINVAL);
    cr_assert_eq(cp_port_metrics_get(e.port, -2, &wm), -EINVAL);

    int fds[3];
    for (int i = 0; i < 3; i++) {
        fds[i] = cpt_xconnect(e.sport);
        cpt_xsend_packet(fds[i], 5, "x", 1);
        cpt_xrecv_packet_eq(fds[i], 5, "x", 1);
    }
    CPT_AWAIT(cp_port_metrics_get(e.port, 0, &wm) == 0 && wm.timers_armed == 3, 5000, "timers armed %llu",
              (unsigned long long)wm.timers_armed);

    cp_jobq *q = NULL;
    cr_assert_eq(cp_jobq_create(&q, e.port), 0);
    atomic_store(&released, 0);
    atomic_store(&ran, 0);
    cr_assert_eq(cp_port_post(e.port, blocker, NULL), 0);
    cpt_sleep_ms(20); /* the worker is inside blocker now */
    for (int i = 0; i < POSTS; i++)
        cr_assert_eq(cp_port_post(e.port, noop, NULL), 0);
    cr_assert_eq(cp_port_metrics_get(e.port, 0, &wm), 0);
    cr_assert(wm.inbox_depth >= POSTS && wm.inbox_depth <= POSTS + 1, "inbox depth %llu",
              (unsigned long long)wm.inbox_depth);
    for (int i = 0; i < JOBS; i++)
        cr_assert_eq(cp_jobq_push(q, noop, NULL), 0);
    cpt_sleep_ms(100);
    atomic_store(&released, 1);
    CPT_AWAIT(atomic_load(&ran) == 1 + POSTS + JOBS, 5000, "ran %d", atomic_load(&ran));
    CPT_AWAIT(cp_port_metrics_get(e.port, 0, &wm) == 0 && wm.inbox_depth == 0, 5000, "inbox depth %llu",
              (unsigned long long)wm.inbox_depth);

    cr_assert_eq(cp_port_metrics_get(e.port, 0, &wm), 0);
    cr_assert_eq(wm.job_wait_ns.count, (uint64_t)JOBS);
    cr_assert_eq(buckets_sum(&wm.job_wait_ns), (uint64_t)JOBS);
    /* Each waited the 100 ms above at least: every one in a bucket up from 2^26 ns (67 ms). */
    cr_assert_eq(from_bucket(&wm.job_wait_ns, UINT64_C(1) << 26), (uint64_t)JOBS);
    cr_assert_geq(wm.job_wait_ns.sum, (uint64_t)JOBS * 100000000u);
    cr_assert_geq(from_bucket(&wm.round_ns, UINT64_C(1) << 26), 1u, "the blocked round");
    cr_assert_eq(buckets_sum(&wm.round_ns), wm.round_ns.count);
    cr_assert_geq(wm.round_ns.sum, 100000000u);
    cr_assert_gt(wm.wait_ns.count, 0u);
    cr_assert_eq(buckets_sum(&wm.wait_ns), wm.wait_ns.count);
    cr_assert_eq(cp_port_metrics_get(e.port, -1, &all), 0);
    cr_assert_geq(all.round_ns.count, wm.round_ns.count, "one worker: the sum is that worker's");

    for (int i = 0; i < 3; i++)
        cpt_close(fds[i]);
    CPT_AWAIT(cp_port_metrics_get(e.port, 0, &wm) == 0 && wm.timers_armed == 0, 5000, "timers armed %llu",
              (unsigned long long)wm.timers_armed);
    cpt_xjobq_drained(q);
    cp_jobq_unref(q);
    cpt_env_stop(&e);
}
