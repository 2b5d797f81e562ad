/* SPDX-License-Identifier: MIT */
/*
 * Order: sends to one session are written in happens-before order.
 *
 * If one send call returns before another starts — on the same thread, or on
 * a thread it handed work to through cport (the next job of a job queue, a
 * posted function, a timer it started) — the first is written first. The bug
 * this pins down hid from every low-rate test: per-round batching kept a job's
 * messages in its worker's outbox while the next job, on another worker, sent
 * behind them and got there first. So every test here runs a chain of steps
 * that hops between 2+ workers as fast as it can, each step sending the next
 * number to 64 sessions (by group broadcast, by session, by id and by service
 * broadcast in turn), and the clients check that every number arrives, in
 * order.
 */
#include "helpers.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define NSESS 64
#define PKT_ID 9

enum hop { HOP_JOBQ, HOP_POST, HOP_TIMER, HOP_MIXED };

#define NCHAINS 4

typedef struct world world;

/* A chain of steps numbered 0..steps-1, one at a time, each handing the next
 * to another thread; several run at once (rooms, say), which keeps every
 * worker busy. */
typedef struct chain {
    world *w;
    uint8_t index;
    enum hop hop;
    cp_jobq *q;
    uint32_t steps;
    atomic_uint next; /* the step the chain runs next */
    atomic_bool done;
} chain;

struct world {
    cpt_env env;
    cp_group *g;
    cp_session *s[NSESS];
    uint64_t ids[NSESS];
    int nchains;
    chain c[NCHAINS];
    atomic_int failures; /* a hand-off or send the library refused */
};

/* One step: the numbered packet to all NSESS sessions, through one of the
 * four ways to send, chosen by the step number so that they interleave. */
static void send_step(chain *ch, uint32_t n)
{
    world *c = ch->w;
    uint8_t body[5] = { (uint8_t)n, (uint8_t)(n >> 8), (uint8_t)(n >> 16), (uint8_t)(n >> 24), ch->index };
    cp_sendbuf *b = cp_packet_make(PKT_ID, body, sizeof body);
    if (!b) {
        atomic_fetch_add(&c->failures, 1);
        return;
    }
    int sent = 0;
    switch (n % 4) {
    case 0: sent = cp_group_broadcast(c->g, b); break;
    case 1:
        for (int i = 0; i < NSESS; i++)
            sent += cp_session_send(c->s[i], b) == 0;
        break;
    case 2:
        for (int i = 0; i < NSESS; i++)
            sent += cp_service_send_to(c->env.svc, c->ids[i], b) == 0;
        break;
    default: sent = cp_service_broadcast(c->env.svc, b); break;
    }
    cp_sendbuf_unref(b);
    if (sent != NSESS)
        atomic_fetch_add(&c->failures, 1);
}

static void step(void *arg);

static void step_job(void *arg) { step(arg); }

/* Pushes the next step onto the job queue from wherever the post ran: the
 * queue has drained meanwhile, so the push schedules it afresh on the next
 * worker in turn. */
static void push_step(void *arg)
{
    chain *c = arg;
    if (cp_jobq_push(c->q, step_job, c) != 0)
        atomic_fetch_add(&c->w->failures, 1);
}

/* Hands the next step to another thread through cport, the way the chain's
 * kind says (the mixed chain rotates through all three). */
static void hand_off(chain *c, uint32_t n)
{
    enum hop how = c->hop == HOP_MIXED ? (enum hop)(n % 3) : c->hop;
    int r;
    switch (how) {
    case HOP_JOBQ: r = cp_port_post(c->w->env.port, push_step, c); break;
    case HOP_POST: r = cp_port_post(c->w->env.port, step, c); break;
    default: r = cp_timer_start(NULL, c->w->env.port, 0, 0, step, c, NULL); break;
    }
    if (r != 0)
        atomic_fetch_add(&c->w->failures, 1);
}

static void step(void *arg)
{
    chain *c = arg;
    uint32_t n = atomic_fetch_add(&c->next, 1);
    send_step(c, n);
    if (n + 1 < c->steps)
        hand_off(c, n + 1);
    else
        atomic_store(&c->done, true);
}

/* ------------------------------------------------------------------ the clients */

typedef struct reader {
    int fd;
    uint32_t total; /* packets to read: every step of every chain */
    uint32_t received;
    uint32_t late;    /* arrived after a higher number of the same chain */
    uint32_t missing; /* numbers skipped over */
    int err;
    pthread_t th;
} reader;

static void *read_all(void *arg)
{
    reader *r = arg;
    uint32_t expect[NCHAINS] = { 0 };
    while (r->received < r->total) {
        uint8_t body[16];
        uint16_t id;
        size_t len;
        int rc = cpt_recv_packet(r->fd, &id, body, sizeof body, &len);
        if (rc != 0 || id != PKT_ID || len != 5 || body[4] >= NCHAINS) {
            r->err = rc != 0 ? rc : -EPROTO;
            break;
        }
        uint32_t n = (uint32_t)body[0] | (uint32_t)body[1] << 8 | (uint32_t)body[2] << 16 |
                     (uint32_t)body[3] << 24;
        uint32_t *e = &expect[body[4]];
        r->received++;
        if (n < *e) {
            r->late++;
        } else {
            r->missing += n - *e;
            *e = n + 1;
        }
    }
    return NULL;
}

/* The server side: NSESS sessions (kept by the tracker), all in one group,
 * and nchains chains of the given kind with steps steps each. */
static void world_start(world *c, int workers, int nchains, enum hop hop, uint32_t steps, reader *rd)
{
    memset(c, 0, sizeof *c);
    c->nchains = nchains;
    cp_server_opts o = { .max_sessions = NSESS + 8 };
    /* Room for every step at once: the clients read as fast as they can, but
     * a slow reader must show up as lateness, not as an overflow. */
    o.session.send_queue_limit = (size_t)steps * (size_t)nchains * 12 + 4096;
    cpt_env_start(&c->env, workers, &o, NULL, NSESS + 8, CPT_KEEP_REFS | CPT_NO_ECHO);
    cr_assert_eq(cp_group_create(&c->g), 0);
    for (int k = 0; k < nchains; k++) {
        c->c[k].w = c;
        c->c[k].index = (uint8_t)k;
        c->c[k].hop = hop;
        c->c[k].steps = steps;
        cr_assert_eq(cp_jobq_create(&c->c[k].q, c->env.port), 0);
    }
    for (int i = 0; i < NSESS; i++) {
        rd[i] = (reader){ .fd = cpt_xconnect(c->env.sport), .total = steps * (uint32_t)nchains };
        cpt_set_rcvtimeo(rd[i].fd, 10000);
    }
    CPT_AWAIT(atomic_load(&c->env.t->connected) == NSESS, 5000, "every client connected");
    for (int i = 0; i < NSESS; i++) {
        c->s[i] = c->env.t->recs[i].s;
        c->ids[i] = cp_session_id(c->s[i]);
        cr_assert_eq(cp_group_add(c->g, c->s[i]), 0);
    }
    for (int i = 0; i < NSESS; i++)
        cr_assert_eq(pthread_create(&rd[i].th, NULL, read_all, &rd[i]), 0);
}

/* Waits for the readers and asserts that every client got every number of
 * every chain once, in order; then tears everything down with the leak check. */
static void world_finish(world *c, reader *rd, const char *what)
{
    uint64_t late = 0, missing = 0, received = 0;
    int errs = 0;
    for (int i = 0; i < NSESS; i++) {
        pthread_join(rd[i].th, NULL);
        late += rd[i].late;
        missing += rd[i].missing;
        received += rd[i].received;
        errs += rd[i].err != 0;
        cpt_close(rd[i].fd);
    }
    for (int k = 0; k < c->nchains; k++)
        CPT_AWAIT(atomic_load(&c->c[k].done), 10000, "%s: chain %d ran to its end", what, k);
    cr_expect_eq(atomic_load(&c->failures), 0, "%s: every hand-off and send was accepted", what);
    cr_expect_eq(errs, 0, "%s: every client read to the end", what);
    cr_expect_eq(received, (uint64_t)rd[0].total * NSESS, "%s: every packet arrived", what);
    cr_expect_eq(missing, 0, "%s: no number was skipped", what);
    cr_assert_eq(late, 0, "%s: %llu of %llu packets arrived after a later one", what,
                 (unsigned long long)late, (unsigned long long)received);
    for (int k = 0; k < c->nchains; k++) {
        cp_jobq_close(c->c[k].q, NULL, NULL);
        cp_jobq_unref(c->c[k].q);
    }
    cp_group_destroy(c->g);
    cpt_env_stop(&c->env);
}

/* Wine's sockets are an order of magnitude slower than Linux's: the same
 * chains there would outlast the test's time limit. Order breaks there far
 * more often (most packets at 500 per second per client, before the fix), so
 * a twentieth of the steps is still a test that fails without it. */
static uint32_t scaled(uint32_t steps) { return cpt_under_wine() ? steps / 20 : steps; }

static world the_world;
static reader readers[NSESS];

static void run_chains(int workers, enum hop hop, uint32_t steps, const char *what)
{
    world_start(&the_world, workers, NCHAINS, hop, scaled(steps), readers);
    for (int k = 0; k < NCHAINS; k++)
        step(&the_world.c[k]);
    world_finish(&the_world, readers, what);
}

/* Each step posts a function that pushes the next step onto the chain's job
 * queue: consecutive jobs of one queue run on different workers. */
Test(order, jobq_steps_hopping_workers_keep_order, .timeout = 120)
{
    run_chains(2, HOP_JOBQ, 2000, "job queues, 2 workers");
}

Test(order, jobq_steps_on_four_workers_keep_order, .timeout = 120)
{
    run_chains(4, HOP_JOBQ, 2000, "job queues, 4 workers");
}

/* Each step posts the next one. */
Test(order, posted_steps_keep_order, .timeout = 120)
{
    run_chains(3, HOP_POST, 2000, "cp_port_post, 3 workers");
}

/* Each step starts a timer of 0 ms for the next one. */
Test(order, timer_steps_keep_order, .timeout = 120)
{
    run_chains(3, HOP_TIMER, 2000, "cp_timer_start, 3 workers");
}

Test(order, mixed_hand_offs_keep_order, .timeout = 120)
{
    run_chains(4, HOP_MIXED, 2000, "jobs, posts and timers, 4 workers");
}

/* The shape of a chat room: a thread that is not a worker pushes the jobs
 * (here the test's own thread, as fast as it can, into one queue), and each
 * job sends the next number; the queue keeps running on one worker until its
 * time slice ends or it drains, then moves. */
static void feed_job(void *arg)
{
    chain *c = arg;
    send_step(c, atomic_fetch_add(&c->next, 1));
}

Test(order, jobq_fed_by_a_user_thread_keeps_order, .timeout = 120)
{
    uint32_t steps = scaled(10000);
    world_start(&the_world, 2, 1, HOP_JOBQ, steps, readers);
    chain *c = &the_world.c[0];
    for (uint32_t i = 0; i < steps; i++) {
        cr_assert_eq(cp_jobq_push(c->q, feed_job, c), 0);
        if ((i & 63) == 0)
            cpt_sleep_us(50); /* a sleep: paces the pushes, so that the queue drains now and then */
    }
    atomic_store(&c->done, true);
    world_finish(&the_world, readers, "job queue fed by a user thread, 2 workers");
}

/* The same with a queue that drains after every job: the thread pushes the
 * next job as soon as the previous one has run, so each job is scheduled
 * afresh on the next worker while the previous one's worker may still be
 * writing (its end of round). */
Test(order, jobq_drained_after_every_job_keeps_order, .timeout = 120)
{
    uint32_t steps = scaled(3000);
    world_start(&the_world, 2, 1, HOP_JOBQ, steps, readers);
    chain *c = &the_world.c[0];
    for (uint32_t i = 0; i < steps; i++) {
        cr_assert_eq(cp_jobq_push(c->q, feed_job, c), 0);
        while (atomic_load(&c->next) <= i)
            ;
    }
    atomic_store(&c->done, true);
    world_finish(&the_world, readers, "job queue drained after every job, 2 workers");
}

/* Sends alternate between a job on a worker and the test's own thread, which
 * learns that the job has sent through a plain atomic (no cport hand-off in
 * that direction): the owner must still write the job's number first. */
static void alternate_job(void *arg)
{
    chain *c = arg;
    uint32_t n = atomic_load(&c->next);
    send_step(c, n);
    atomic_store(&c->next, n + 1);
}

Test(order, sends_alternating_between_jobs_and_a_user_thread_keep_order, .timeout = 120)
{
    uint32_t steps = scaled(6000);
    world_start(&the_world, 2, 1, HOP_JOBQ, steps, readers);
    chain *c = &the_world.c[0];
    for (uint32_t i = 0; i < steps; i += 2) {
        cr_assert_eq(cp_jobq_push(c->q, alternate_job, c), 0);
        while (atomic_load(&c->next) <= i)
            ;
        send_step(c, i + 1);
        atomic_store(&c->next, i + 2);
    }
    atomic_store(&c->done, true);
    world_finish(&the_world, readers, "jobs and a user thread in turn, 2 workers");
}
