/* SPDX-License-Identifier: MIT */
/* Job-queue bounds: a queue fed by sessions' packets stays near its bound,
 * because the sessions that push past it are not read until it drains; the
 * pushes themselves always succeed and nothing is lost. */
#include "helpers.h"

#include <errno.h>
#include <stdlib.h>

#define HIGH 64u
#define LOW 16u
#define PACKETS 4000
#define BODY 1020 /* 1 KiB packets: one receive holds at most 64 of them */

typedef struct bound_ctx {
    _Atomic(cp_jobq *) q;   /* set after the service started: atomic */
    atomic_int pending;     /* pushed and not yet run */
    atomic_int max_pending; /* the most seen right after a push */
    atomic_int ran;
    atomic_int push_failed;
} bound_ctx;

static bound_ctx ctx;

/* A slow job (a room's broadcast, say): the queue fills faster than it runs. */
static void slow_job(void *arg)
{
    (void)arg;
    cpt_sleep_us(50); /* a sleep: the job is slow on purpose, so that the queue fills faster than it runs */
    atomic_fetch_sub(&ctx.pending, 1);
    atomic_fetch_add(&ctx.ran, 1);
}

static void note_push(void)
{
    int now = atomic_fetch_add(&ctx.pending, 1) + 1;
    int seen = atomic_load(&ctx.max_pending);
    while (now > seen && !atomic_compare_exchange_weak(&ctx.max_pending, &seen, now))
        ;
}

static int push_on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    (void)s, (void)id, (void)body, (void)len;
    note_push();
    if (cp_jobq_push(ctx.q, slow_job, NULL) != 0) {
        atomic_fetch_sub(&ctx.pending, 1);
        atomic_fetch_add(&ctx.push_failed, 1);
    }
    return 0;
}

static void start(cpt_env *e, uint32_t high, uint32_t low)
{
    memset(&ctx, 0, sizeof ctx);
    cp_handlers h = cpt_track_handlers();
    h.on_packet = push_on_packet;
    cpt_env_start(e, 2, NULL, &h, 8, CPT_NO_ECHO);
    cp_jobq *q;
    cr_assert_eq(cp_jobq_create(&q, e->port), 0);
    cr_assert_eq(cp_jobq_set_bound(q, high, low), 0);
    atomic_store(&ctx.q, q);
}

static void stop(cpt_env *e)
{
    cr_assert_eq(cp_jobq_close_wait(ctx.q), 0);
    cp_jobq_unref(ctx.q);
    cpt_env_stop(e);
}

/* Sends PACKETS 1 KiB packets as fast as TCP takes them. */
static void flood(int fd)
{
    static uint8_t buf[(CP_PACKET_HEADER + BODY) * 100];
    for (int i = 0; i < 100; i++)
        cpt_put_header(buf + i * (CP_PACKET_HEADER + BODY), CP_PACKET_HEADER + BODY, 1);
    for (int sent = 0; sent < PACKETS; sent += 100)
        cpt_xsend(fd, buf, sizeof buf);
}

/* Without the bound the queue held nearly all PACKETS jobs at once (the
 * handler pushes far faster than the jobs run). With it, a paused session can
 * add at most the rest of the receive in hand (64 packets here; io_uring may
 * deliver one more buffer that was already in flight). */
Test(jobq_bound, pushing_session_paused_at_bound)
{
    cpt_env e;
    start(&e, HIGH, LOW);
    int fd = cpt_xconnect(e.sport);
    flood(fd);
    CPT_AWAIT(atomic_load(&ctx.ran) == PACKETS, 20000, "ran %d of %d", atomic_load(&ctx.ran), PACKETS);
    cr_expect_eq(atomic_load(&ctx.push_failed), 0);
    cr_expect_leq(atomic_load(&ctx.max_pending), (int)(HIGH + 3 * 64),
                  "the queue grew to %d jobs past its bound %u", atomic_load(&ctx.max_pending), HIGH);
    cr_expect_eq(cpt_stats(e.svc).disconnected, 0, "no one is cut for it");
    cpt_close(fd);
    stop(&e);
}

/* Two feeders: both are paused and both resumed; everything they sent runs. */
Test(jobq_bound, every_paused_feeder_resumes)
{
    cpt_env e;
    start(&e, HIGH, LOW);
    int a = cpt_xconnect(e.sport), b = cpt_xconnect(e.sport);
    flood(a);
    flood(b);
    CPT_AWAIT(atomic_load(&ctx.ran) == 2 * PACKETS, 30000, "ran %d of %d", atomic_load(&ctx.ran),
              2 * PACKETS);
    cr_expect_leq(atomic_load(&ctx.max_pending), (int)(HIGH + 6 * 64));
    cpt_close(a);
    cpt_close(b);
    stop(&e);
}

/* The bound holds back sessions, never other producers: a thread of the
 * user's pushes far past it and every push succeeds. */
static void count_job(void *arg) { atomic_fetch_add((atomic_int *)arg, 1); }

Test(jobq_bound, other_pushers_never_refused)
{
    cpt_env e;
    start(&e, HIGH, LOW);
    atomic_int n = 0;
    for (int i = 0; i < 10000; i++)
        cr_assert_eq(cp_jobq_push(ctx.q, count_job, &n), 0);
    CPT_AWAIT(atomic_load(&n) == 10000, 10000, "ran %d", atomic_load(&n));
    stop(&e);
}

Test(jobq_bound, bad_bounds)
{
    cpt_env e;
    start(&e, HIGH, LOW);
    cr_expect_eq(cp_jobq_set_bound(ctx.q, 10, 10), -EINVAL);
    cr_expect_eq(cp_jobq_set_bound(ctx.q, 10, 20), -EINVAL);
    cr_expect_eq(cp_jobq_set_bound(NULL, 10, 5), -EINVAL);
    cr_expect_eq(cp_jobq_set_bound(ctx.q, 0, 0), 0, "0 turns it off");
    stop(&e);
}
