/* SPDX-License-Identifier: MIT */
/*
 * A rolling restart: a new server listens on the port of an old one
 * (reuseport), the old one stops with a drain, and clients that keep
 * connecting meanwhile are never refused, while the old one's sessions end
 * gracefully with CP_REASON_STOPPING.
 *
 * Each test runs in a network namespace of its own (unshare, in the test's
 * own process), where it sets net.ipv4.tcp_migrate_req: connections queued
 * to the old listener when it closes move to the new one instead of being
 * reset. Needs root; skipped without it. Linux only; run once per backend.
 */
#include "helpers.h"

#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

/* A namespace of this process's own with loopback up and requests of a
 * closing listener migrated; the test is skipped where that cannot be. */
static void private_net(void)
{
    if (geteuid() != 0 || unshare(CLONE_NEWNET) != 0)
        cr_skip_test("needs root to make a network namespace");
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    cr_assert_geq(fd, 0);
    struct ifreq ifr = { 0 };
    strcpy(ifr.ifr_name, "lo");
    cr_assert_eq(ioctl(fd, SIOCGIFFLAGS, &ifr), 0, "SIOCGIFFLAGS lo: %s", strerror(errno));
    ifr.ifr_flags |= IFF_UP;
    cr_assert_eq(ioctl(fd, SIOCSIFFLAGS, &ifr), 0, "SIOCSIFFLAGS lo: %s", strerror(errno));
    close(fd);
    /* /proc/sys/net is the opening thread's namespace: the new one. */
    fd = open("/proc/sys/net/ipv4/tcp_migrate_req", O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        cr_skip_test("no net.ipv4.tcp_migrate_req (Linux before 5.14)");
    cr_assert_eq(write(fd, "1", 1), 1);
    close(fd);
}

static cp_service *xserver_on(cp_port *p, uint16_t port, cpt_track *t)
{
    cp_handlers h = cpt_track_handlers();
    cp_server_opts o = { .host = CPT_HOST4, .port = port, .reuseport = 1 };
    return cpt_xserver(p, &o, &h, t);
}

/* One connect after another, each served (a packet and its echo) and then
 * closed by the client; what failed and how. A connection the old server
 * accepted as its listener closed is drained at once: its client reads the
 * end of the stream, not an echo, and would connect again (sent_away). */
typedef struct connector {
    uint16_t port;
    atomic_bool stop;
    atomic_int served, refused, lost, sent_away;
    atomic_int last_err;
} connector;

static void *connect_loop(void *arg)
{
    connector *c = arg;
    while (!atomic_load(&c->stop)) {
        int fd = cpt_connect(CPT_HOST4, c->port, 0);
        if (fd < 0) {
            atomic_fetch_add(&c->refused, 1);
            atomic_store(&c->last_err, fd);
            continue;
        }
        cpt_set_rcvtimeo(fd, 5000);
        uint16_t id = 0;
        uint8_t body[16];
        size_t len = 0;
        int rc = cpt_send_packet(fd, 9, "hello", 5);
        if (rc == 0)
            rc = cpt_recv_packet(fd, &id, body, sizeof body, &len);
        if (rc == 1) {
            atomic_fetch_add(&c->sent_away, 1);
        } else if (rc < 0 || id != 9 || len != 5) {
            atomic_fetch_add(&c->lost, 1);
            atomic_store(&c->last_err, rc < 0 ? rc : -EPROTO);
        } else {
            atomic_fetch_add(&c->served, 1);
        }
        cpt_close(fd);
        /* A pace, so that a slow run (sanitizers) does not outgrow the
         * trackers: a thousand connects a second at most. */
        cpt_sleep_us(1000);
    }
    return NULL;
}

typedef struct stopper {
    cp_service *svc;
    cp_service_stats final;
    int rc;
    atomic_bool done;
} stopper;

static void *stop_draining(void *arg)
{
    stopper *st = arg;
    st->rc = cp_service_stop_ex(st->svc, 3000, &st->final);
    atomic_store(&st->done, true);
    return NULL;
}

/* The old server holds HELD sessions, each with echoes queued that its
 * client has not read yet, and more sessions come and go all the time; a
 * new server starts on its port and the old one drains. No connect is
 * refused or left unanswered; every held client reads all its echoes, then
 * the end of the stream; every session the old one had ends without an
 * error, the held ones by the drain (STOPPING), the others by their
 * clients. */
Test(restart, a_draining_server_hands_the_port_over_without_refusing, .timeout = 60)
{
    enum { HELD = 20, QUEUED = 40, BODY = 4000 };
    private_net();
    cp_port *p = cpt_xport(2);
    cpt_track *old_t = cpt_track_new(1 << 15), *new_t = cpt_track_new(1 << 15);
    old_t->echo = new_t->echo = true;
    cp_service *old_svc = xserver_on(p, 0, old_t);
    uint16_t port = cp_service_listen_port(old_svc);

    int held[HELD];
    static uint8_t body[BODY];
    memset(body, 0x5A, sizeof body);
    for (int i = 0; i < HELD; i++) {
        /* A small receive buffer, so that most of the echoes wait in the
         * server's send queue, which the drain must still write. */
        held[i] = cpt_connect(CPT_HOST4, port, 4096);
        cr_assert_geq(held[i], 0);
        cpt_xsend_packet(held[i], 1, "held", 4);
        cpt_xrecv_packet_eq(held[i], 1, "held", 4);
        for (int k = 0; k < QUEUED; k++)
            cpt_xsend_packet(held[i], 2, body, sizeof body);
    }
    CPT_AWAIT(atomic_load(&old_t->packets) >= HELD * (1 + QUEUED), 5000,
              "the old server read %lld of %d packets", (long long)atomic_load(&old_t->packets),
              HELD * (1 + QUEUED));
    cp_service *new_svc = xserver_on(p, port, new_t);

    connector c = { .port = port };
    pthread_t ct;
    cr_assert_eq(pthread_create(&ct, NULL, connect_loop, &c), 0);
    CPT_AWAIT(atomic_load(&c.served) >= 50, 5000, "the connector was not served");

    stopper st = { .svc = old_svc };
    pthread_t sth;
    cr_assert_eq(pthread_create(&sth, NULL, stop_draining, &st), 0);
    /* The held clients read every echo, then the end of the stream. The
     * old server waits for their FINs: a drain, not a hard stop. */
    for (int i = 0; i < HELD; i++) {
        cpt_set_rcvtimeo(held[i], 5000);
        for (int k = 0; k < QUEUED; k++)
            cpt_xrecv_packet_eq(held[i], 2, body, sizeof body); /* queued before the drain */
        cpt_xclosed(held[i], 5000);
    }
    cr_expect(!atomic_load(&st.done), "the old server stopped before its clients closed");
    for (int i = 0; i < HELD; i++)
        cpt_close(held[i]);
    pthread_join(sth, NULL);
    cr_assert_eq(st.rc, 0, "cp_service_stop_ex: %d (%s)", st.rc, cp_strerror(st.rc));
    int served_at_stop = atomic_load(&c.served);
    CPT_AWAIT(atomic_load(&c.served) >= served_at_stop + 50, 5000,
              "nobody served after the old server stopped");
    atomic_store(&c.stop, true);
    pthread_join(ct, NULL);

    cr_expect_eq(atomic_load(&c.refused), 0, "%d connects refused (last %s)", atomic_load(&c.refused),
                 cp_strerror(atomic_load(&c.last_err)));
    cr_expect_eq(atomic_load(&c.lost), 0, "%d connects unanswered (last %s)", atomic_load(&c.lost),
                 cp_strerror(atomic_load(&c.last_err)));
    int away = atomic_load(&c.sent_away);
    cr_expect_geq((int)st.final.by_reason[CP_REASON_STOPPING], HELD + away,
                  "the drain ended %d sessions, not all %d held and %d sent away",
                  (int)st.final.by_reason[CP_REASON_STOPPING], HELD, away);
    int n = atomic_load(&old_t->nrec), bad = 0;
    for (int i = 0; i < n; i++) {
        cpt_srec *r = &old_t->recs[i];
        int reason = atomic_load(&r->reason);
        if (atomic_load(&r->err) != 0 || (reason != CP_REASON_STOPPING && reason != CP_REASON_PEER_CLOSED))
            bad++;
    }
    cr_expect_eq(bad, 0, "%d of the old server's %d sessions ended with an error or another reason", bad, n);
    cr_expect_gt(atomic_load(&new_t->connected), 0, "the new server took no connection");

    cpt_track_stopped(old_t);
    cpt_track_xcheck(old_t);
    cpt_xstop(new_svc);
    cpt_track_stopped(new_t);
    cpt_track_xcheck(new_t);
    cpt_xport_destroy(p);
    cpt_track_free(old_t);
    cpt_track_free(new_t);
}
