/* SPDX-License-Identifier: MIT */
/*
 * Dead peers: a peer that vanishes without a FIN (a cable pulled, a NAT
 * that forgot the flow) is found by the service's keepalive and user
 * timeout options, in seconds, with a reason that says which fired.
 *
 * The peer lives in a network namespace of the test's own, joined to this
 * one by a veth pair; taking its end of the link down makes it vanish: no
 * FIN, no reset, nothing answers. Needs root and iproute2 (`ip`); skipped
 * without them. Each test makes its own namespace (named after the process
 * and test) and removes it, which removes the pair too. Run once per
 * backend.
 */
#include "helpers.h"

#include <fcntl.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct netpair {
    char ns[32], here[16], there[16];
    char host[24], peer[24]; /* the addresses of this side and the peer's */
} netpair;

/* Runs a shell command line made from fmt, quietly; true if it worked. */
static bool sh(const char *fmt, ...)
{
    char cmd[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    char quiet[600];
    snprintf(quiet, sizeof quiet, "%s >/dev/null 2>&1", cmd);
    return system(quiet) == 0;
}

/* The pair of the running test, removed whatever happened (netpair_fini). */
static netpair *g_np;
static void netpair_fini(void);

/* A namespace and a veth pair, a /30 of 10.213.0.0/16 of this process and
 * test of its own (ctest runs the backends' programs side by side). */
static void netpair_up(netpair *np, int n)
{
    unsigned idx = ((unsigned)getpid() % 2000u) * 8u + (unsigned)n;
    snprintf(np->ns, sizeof np->ns, "cpt_dp%d_%d", (int)getpid(), n);
    snprintf(np->here, sizeof np->here, "cdpa%d_%d", (int)getpid() % 10000, n);
    snprintf(np->there, sizeof np->there, "cdpb%d_%d", (int)getpid() % 10000, n);
    snprintf(np->host, sizeof np->host, "10.213.%u.%u", idx / 64u, (idx % 64u) * 4u + 1u);
    snprintf(np->peer, sizeof np->peer, "10.213.%u.%u", idx / 64u, (idx % 64u) * 4u + 2u);
    if (geteuid() != 0 || !sh("ip netns add %s", np->ns))
        cr_skip_test("needs root and iproute2 (ip netns)");
    /* Removed at the test's end, or at its process's exit if an assertion
     * ended it first (each test runs in a process of its own). */
    static netpair kept;
    static bool registered;
    kept = *np;
    g_np = &kept;
    if (!registered)
        atexit(netpair_fini);
    registered = true;
    cr_assert(sh("ip link add %s type veth peer name %s", np->here, np->there), "veth pair");
    cr_assert(sh("ip link set %s netns %s", np->there, np->ns));
    cr_assert(sh("ip addr add %s/30 dev %s", np->host, np->here));
    cr_assert(sh("ip link set %s up", np->here));
    cr_assert(sh("ip netns exec %s ip addr add %s/30 dev %s", np->ns, np->peer, np->there));
    cr_assert(sh("ip netns exec %s ip link set %s up", np->ns, np->there));
    cr_assert(sh("ip netns exec %s ip link set lo up", np->ns));
}

/* The peer vanishes: its end of the link goes down, so nothing it had
 * reaches us and nothing we send reaches it, and no one says so. */
static void netpair_cut(const netpair *np)
{
    cr_assert(sh("ip netns exec %s ip link set %s down", np->ns, np->there), "link down");
}

/* Deleting our end of the pair deletes the other at once; the namespace
 * itself goes when the last socket made in it does. */
static void netpair_down(const netpair *np)
{
    sh("ip link del %s", np->here);
    sh("ip netns del %s", np->ns);
}

static void netpair_fini(void)
{
    if (g_np)
        netpair_down(g_np);
    g_np = NULL;
}

/* A TCP connection from inside the namespace to host:port: the socket is
 * made while this thread is in the namespace, which it keeps for good. */
static int connect_from(const netpair *np, uint16_t port)
{
    char path[64];
    snprintf(path, sizeof path, "/var/run/netns/%s", np->ns);
    int target = open(path, O_RDONLY | O_CLOEXEC),
        self = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    cr_assert(target >= 0 && self >= 0, "namespace files");
    cr_assert_eq(setns(target, CLONE_NEWNET), 0, "setns into %s", np->ns);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    cr_assert_eq(setns(self, CLONE_NEWNET), 0, "setns back");
    close(target);
    close(self);
    cr_assert_geq(fd, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    inet_pton(AF_INET, np->host, &a.sin_addr);
    cr_assert_eq(connect(fd, (struct sockaddr *)&a, sizeof a), 0, "connect from %s", np->ns);
    return fd;
}

typedef struct dp_env {
    netpair np;
    cpt_env e;
    int fd;
} dp_env;

static void dp_start(dp_env *d, int n, cp_server_opts *o)
{
    netpair_up(&d->np, n);
    o->host = d->np.host;
    cpt_env_start(&d->e, 1, o, NULL, 4, CPT_KEEP_REFS | CPT_NO_ECHO);
    d->fd = connect_from(&d->np, d->e.sport);
    CPT_AWAIT(atomic_load(&d->e.t->connected) == 1, 5000, "not connected");
}

static void dp_stop(dp_env *d)
{
    cpt_close(d->fd);
    cpt_env_stop(&d->e);
    netpair_fini();
}

/* Cuts the link, optionally sends (data in flight), and returns how long
 * the session took to end, in ms; its reason is in *reason. */
static uint64_t vanish(dp_env *d, bool send, int *reason)
{
    netpair_cut(&d->np);
    uint64_t t0 = cpt_now_ms();
    if (send) {
        static const char body[1000] = "in flight when the peer vanished";
        cp_sendbuf *b = cp_packet_make(3, body, sizeof body);
        cr_assert_eq(cp_session_send(d->e.t->recs[0].s, b), 0);
        cp_sendbuf_unref(b);
    }
    CPT_AWAIT(atomic_load(&d->e.t->disconnected) == 1, 20000, "the vanished peer was never found");
    *reason = atomic_load(&d->e.t->recs[0].reason);
    return cpt_now_ms() - t0;
}

/* Data in flight to a peer that vanished: TCP_USER_TIMEOUT ends the
 * session within its setting and a second. */
Test(dead_peer, user_timeout_ends_a_peer_that_vanished_with_data_in_flight, .timeout = 60)
{
    dp_env d;
    cp_server_opts o = { .session.user_timeout_ms = 1000 };
    dp_start(&d, 1, &o);
    int reason = 0;
    uint64_t ms = vanish(&d, true, &reason);
    cr_assert_eq(reason, CP_REASON_USER_TIMEOUT, "reason %d (%s)", reason, cp_reason_str((cp_reason)reason));
    cr_assert_leq(ms, 1000 + 1000, "found after %llu ms", (unsigned long long)ms);
    cr_assert_eq(cpt_stats(d.e.svc).by_reason[CP_REASON_USER_TIMEOUT], 1);
    dp_stop(&d);
}

/* An idle connection whose peer vanished: keepalive's probes go
 * unanswered and end it, idle + interval x probes (+ 1 s) after the cut. */
Test(dead_peer, keepalive_ends_an_idle_peer_that_vanished, .timeout = 60)
{
    dp_env d;
    cp_server_opts o = { .session.keepalive_idle_ms = 1000,
                         .session.keepalive_interval_ms = 1000,
                         .session.keepalive_probes = 2 };
    dp_start(&d, 2, &o);
    int reason = 0;
    uint64_t ms = vanish(&d, false, &reason);
    cr_assert_eq(reason, CP_REASON_KEEPALIVE, "reason %d (%s)", reason, cp_reason_str((cp_reason)reason));
    cr_assert_leq(ms, 1000 + 2 * 1000 + 1000, "found after %llu ms", (unsigned long long)ms);
    dp_stop(&d);
}

/* Both set: which one fired is told apart by what was unacknowledged. */
static void both(int n, bool send, cp_reason want)
{
    dp_env d;
    cp_server_opts o = { .session.keepalive_idle_ms = 1000,
                         .session.keepalive_interval_ms = 1000,
                         .session.keepalive_probes = 2,
                         .session.user_timeout_ms = 2500 };
    dp_start(&d, n, &o);
    int reason = 0;
    uint64_t ms = vanish(&d, send, &reason);
    cr_assert_eq(reason, (int)want, "reason %d (%s), want %s", reason, cp_reason_str((cp_reason)reason),
                 cp_reason_str(want));
    cr_assert_leq(ms, 2500 + 1000 + 1000, "found after %llu ms", (unsigned long long)ms);
    dp_stop(&d);
}

Test(dead_peer, with_both_data_in_flight_is_the_user_timeout, .timeout = 60)
{
    both(3, true, CP_REASON_USER_TIMEOUT);
}

Test(dead_peer, with_both_an_idle_peer_is_keepalive, .timeout = 60) { both(4, false, CP_REASON_KEEPALIVE); }

/* A live peer is never cut: keepalive's probes are answered. */
Test(dead_peer, a_live_idle_peer_stays, .timeout = 60)
{
    dp_env d;
    cp_server_opts o = { .session.keepalive_idle_ms = 1000,
                         .session.keepalive_interval_ms = 1000,
                         .session.keepalive_probes = 1,
                         .session.user_timeout_ms = 1000 };
    dp_start(&d, 5, &o);
    cpt_sleep_ms(4000); /* a window in which nothing may happen: four idle periods */
    cr_assert_eq(atomic_load(&d.e.t->disconnected), 0, "a live peer was cut");
    dp_stop(&d);
}

Test(dead_peer, options_are_checked)
{
    cp_port *p = cpt_xport(1);
    cp_handlers h = cpt_track_handlers();
    cp_service *svc = NULL;
    cp_server_opts o = { .host = CPT_HOST4, .session.keepalive_interval_ms = 1000 };
    cr_assert_eq(cp_server_start(&svc, p, &o, &h, NULL), -EINVAL, "an interval without keepalive");
    o.session.keepalive_interval_ms = 0;
    o.session.keepalive_probes = 3;
    cr_assert_eq(cp_server_start(&svc, p, &o, &h, NULL), -EINVAL, "probes without keepalive");
    o.session.keepalive_idle_ms = 1000;
    o.session.keepalive_probes = 128;
    cr_assert_eq(cp_server_start(&svc, p, &o, &h, NULL), -EINVAL, "more probes than TCP counts");
    cpt_xport_destroy(p);
}
