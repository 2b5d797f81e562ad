/* SPDX-License-Identifier: MIT */
/*
 * The bus over a real NATS server (Debian's nats-server, started by each test
 * on a free loopback port and killed at its end): publish and subscribe
 * byte-exact and in order, a room bridged across two servers, queue groups,
 * unsubscribe, the broker killed and restarted, failover along the URL list,
 * the pending-bytes bound, and bad arguments. Linux only (the broker is
 * started with fork and exec).
 */
#include "helpers.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#define NATS_BIN "/usr/sbin/nats-server"
#define REDIS_BIN "/usr/bin/redis-server"

enum { NATS, REDIS };

/* ------------------------------------------------------------------ brokers */

typedef struct broker {
    int kind;
    pid_t pid;
    uint16_t port;
    /* NATS clusters: this node's route port and its peer's (0: alone). */
    uint16_t cluster, route;
    const char *config; /* NATS: a configuration file (NULL: none) */
} broker;

static uint16_t free_port(void)
{
    int fd = cpt_xlisten(1);
    uint16_t port = cpt_local_port(fd);
    cpt_close(fd);
    return port;
}

static void broker_exec(const broker *b, const char *port)
{
    char cluster[64], route[64];
    snprintf(cluster, sizeof cluster, "nats://127.0.0.1:%u", b->cluster);
    snprintf(route, sizeof route, "nats://127.0.0.1:%u", b->route);
    if (b->kind == NATS && b->cluster)
        execl(NATS_BIN, "nats-server", "-a", "127.0.0.1", "-p", port, "--cluster_name", "cport", "--cluster",
              cluster, "--routes", route, (char *)NULL);
    else if (b->kind == NATS && b->config)
        execl(NATS_BIN, "nats-server", "-a", "127.0.0.1", "-p", port, "-c", b->config, (char *)NULL);
    else if (b->kind == NATS)
        execl(NATS_BIN, "nats-server", "-a", "127.0.0.1", "-p", port, (char *)NULL);
    else
        execl(REDIS_BIN, "redis-server", "--bind", "127.0.0.1", "--port", port, "--save", "", "--appendonly",
              "no", (char *)NULL);
}

/* Starts a broker of this kind on 127.0.0.1:port (0: a free one) and waits
 * until it accepts connections. b's cluster, route and config are the
 * caller's: b must be initialized ({0} for a plain broker). */
static void broker_start(broker *b, int kind, uint16_t port)
{
    const char *bin = kind == NATS ? NATS_BIN : REDIS_BIN;
    cr_assert(access(bin, X_OK) == 0, "%s is not installed (make deps installs it)", bin);
    b->kind = kind;
    b->port = port ? port : free_port();
    char ports[16];
    snprintf(ports, sizeof ports, "%u", b->port);
    b->pid = fork();
    cr_assert(b->pid >= 0);
    if (b->pid == 0) {
        /* The broker goes with the test process, also when an assertion
         * ends it early. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        int null = open("/dev/null", O_WRONLY);
        dup2(null, 1);
        dup2(null, 2);
        broker_exec(b, ports);
        _exit(127);
    }
    int fd = -1;
    CPT_AWAIT((fd = cpt_connect(CPT_HOST4, b->port, 0)) >= 0, 5000, "%s does not listen on %u", bin, b->port);
    cpt_close(fd);
}

static void broker_kill(broker *b)
{
    if (b->pid <= 0)
        return;
    kill(b->pid, SIGKILL);
    waitpid(b->pid, NULL, 0);
    b->pid = 0;
}

static char *broker_url(const broker *b, char *buf, size_t n)
{
    snprintf(buf, n, "%s://127.0.0.1:%u", b->kind == NATS ? "nats" : "redis", b->port);
    return buf;
}

/* ------------------------------------------------------------------ a collecting subscriber */

#define PROBE 0u           /* index of the probes that show a subscription is live */
#define MARKER 0xFFFFFFFFu /* index of a test's end marker */

typedef struct inbox {
    pthread_mutex_t lock;
    uint32_t probes, markers;
    uint32_t n; /* messages received, but probes and markers */
    uint32_t out_of_order;
    uint32_t corrupt;
    int64_t last;       /* index of the last message, -1 before the first */
    uint8_t seen[4096]; /* by index, for queue groups */
} inbox;

static void inbox_init(inbox *in)
{
    memset(in, 0, sizeof *in);
    pthread_mutex_init(&in->lock, NULL);
    in->last = -1;
}

static uint32_t inbox_count(inbox *in)
{
    pthread_mutex_lock(&in->lock);
    uint32_t n = in->n;
    pthread_mutex_unlock(&in->lock);
    return n;
}

/* Message i: its index (u32) and then i % 61 * 500 + 3 bytes of pattern i
 * (PROBE and MARKER: 3 bytes). Up to 30 KB, 15 KB on average: 2000 of them
 * stay below what the brokers let a subscriber fall behind by (Redis cuts
 * a pub/sub client at 32 MB of output by default), also when a sanitizer
 * slows the subscriber down. */
static size_t msg_make(uint8_t *buf, uint32_t i)
{
    size_t len = 4 + (i == MARKER ? 0 : (size_t)(i % 61) * 500) + 3;
    cp_put_u32(buf, i);
    cpt_fill(buf + 4, len - 4, 0, i);
    return len;
}

static void on_msg(void *arg, const cp_bus_msg *m)
{
    inbox *in = arg;
    pthread_mutex_lock(&in->lock);
    uint32_t i = m->len >= 4 ? cp_get_u32(m->data) : PROBE;
    size_t want = 4 + (i == MARKER ? 0 : (size_t)(i % 61) * 500) + 3;
    if (m->len != want || cpt_check_pattern(m->data + 4, m->len - 4, 0, i) >= 0)
        in->corrupt++;
    else if (i == PROBE)
        in->probes++;
    else if (i == MARKER)
        in->markers++;
    else {
        if ((int64_t)i <= in->last)
            in->out_of_order++;
        in->last = i;
        if (i < sizeof in->seen)
            in->seen[i]++;
        in->n++;
    }
    pthread_mutex_unlock(&in->lock);
}

static uint32_t inbox_probes(inbox *in)
{
    pthread_mutex_lock(&in->lock);
    uint32_t n = in->probes;
    pthread_mutex_unlock(&in->lock);
    return n;
}

static uint32_t inbox_markers(inbox *in)
{
    pthread_mutex_lock(&in->lock);
    uint32_t n = in->markers;
    pthread_mutex_unlock(&in->lock);
    return n;
}

/* The bus says why it reconnects: shown with the test's output. */
static void log_sink(cp_log_level level, const char *msg, void *ud)
{
    (void)ud;
    if (level >= CP_LOG_INFO)
        fprintf(stderr, "cport: %s\n", msg);
}

static cp_bus *xbus(cp_port *port, const char *url)
{
    cp_set_log(log_sink, NULL);
    cp_bus *bus = NULL;
    /* Pings at their default (5 s): no test here is about them, and at 500 ms
     * a PONG queued behind a flood of messages under ThreadSanitizer on a
     * busy machine came late twice, and the bus dropped a live broker. */
    cp_bus_opts o = { .url = url, .name = "cport-test" };
    cr_assert_eq(cp_bus_create(&bus, port, &o), 0);
    return bus;
}

static int bus_up(cp_bus *bus)
{
    cp_bus_stats st;
    cp_bus_stats_get(bus, &st);
    return st.connected;
}

static cp_bus_stats bus_stats(cp_bus *bus)
{
    cp_bus_stats st;
    cp_bus_stats_get(bus, &st);
    return st;
}

/* A subscription is live at the broker once a message published after it
 * arrives: publish probes until one does. Probes are not counted as
 * messages, so those still on the way do not matter. */
static void xsubscribed(cp_bus *pub, const char *subject, inbox *in)
{
    uint8_t probe[8];
    size_t len = msg_make(probe, PROBE);
    uint32_t before = inbox_probes(in);
    CPT_AWAIT((cp_bus_publish(pub, subject, probe, len), cpt_sleep_ms(20), inbox_probes(in) > before), 5000,
              "the subscription to %s never received", subject);
}

/* Publishes the end marker to subject. */
static void xmarker(cp_bus *pub, const char *subject)
{
    uint8_t m[8];
    cr_assert_eq(cp_bus_publish(pub, subject, m, msg_make(m, MARKER)), 0);
}

/* Two buses on one port and one broker of this kind: most tests subscribe
 * on one and publish on the other (NATS does not echo a connection's own
 * publishes). pair_stop destroys both and runs the leak check. */
typedef struct bus_pair {
    cpt_leak_mark leak;
    broker nb;
    char url[64];
    cp_port *port;
    cp_bus *a, *b;
} bus_pair;

static void pair_start(bus_pair *pr, int kind)
{
    memset(pr, 0, sizeof *pr);
    cpt_leak_begin(&pr->leak);
    broker_start(&pr->nb, kind, 0);
    broker_url(&pr->nb, pr->url, sizeof pr->url);
    pr->port = cpt_xport(2);
    pr->a = xbus(pr->port, pr->url);
    pr->b = xbus(pr->port, pr->url);
    CPT_AWAIT(bus_up(pr->a) && bus_up(pr->b), 5000, "the buses never connected");
}

static void pair_stop(bus_pair *pr)
{
    cr_assert_eq(cp_bus_destroy(pr->a), 0);
    cr_assert_eq(cp_bus_destroy(pr->b), 0);
    cpt_xport_destroy(pr->port);
    broker_kill(&pr->nb);
    cpt_leak_end(&pr->leak);
}

/* ------------------------------------------------------------------ tests */

static void publish_and_subscribe_byte_exact_in_order(int kind)
{
    bus_pair pr;
    pair_start(&pr, kind);
    cp_bus *a = pr.a, *b = pr.b;
    inbox in;
    inbox_init(&in);
    cp_bus_sub *sub;
    cr_assert_eq(cp_bus_subscribe(&sub, a, "t.data", NULL, on_msg, &in, NULL), 0);
    xsubscribed(b, "t.data", &in);

    static uint8_t buf[70000];
    enum { N = 2000 };
    for (uint32_t i = 1; i <= N; i++) {
        size_t len = msg_make(buf, i);
        int r;
        /* -EAGAIN is the pending bound: wait for the broker to take some. */
        while ((r = cp_bus_publish(b, "t.data", buf, len)) == -EAGAIN)
            cpt_sleep_ms(1);
        cr_assert_eq(r, 0, "publish %u: %s", i, cp_strerror(r));
    }
    CPT_AWAIT(inbox_count(&in) == N, 10000, "received %u of %d", inbox_count(&in), N);
    cr_assert_eq(in.corrupt, 0, "corrupt payloads");
    cr_assert_eq(in.out_of_order, 0, "out of order");
    cp_bus_stats st = bus_stats(b);
    cr_assert_geq(st.published, N);
    cr_assert_eq(st.dropped, 0);
    cr_assert_eq(bus_stats(a).delivered >= N, 1);

    cr_assert_eq(cp_bus_unsubscribe(sub), 0);
    pair_stop(&pr);
}

Test(bus, nats_publish_and_subscribe_byte_exact_in_order, .timeout = 60)
{
    publish_and_subscribe_byte_exact_in_order(NATS);
}
Test(bus, redis_publish_and_subscribe_byte_exact_in_order, .timeout = 60)
{
    publish_and_subscribe_byte_exact_in_order(REDIS);
}

static void unsubscribe_stops_delivery(int kind)
{
    bus_pair pr;
    pair_start(&pr, kind);
    cp_bus *a = pr.a, *b = pr.b;
    inbox in, marker;
    inbox_init(&in);
    inbox_init(&marker);
    cp_bus_sub *sub, *msub;
    cr_assert_eq(cp_bus_subscribe(&sub, a, "t.gone", NULL, on_msg, &in, NULL), 0);
    cr_assert_eq(cp_bus_subscribe(&msub, a, "t.marker", NULL, on_msg, &marker, NULL), 0);
    xsubscribed(b, "t.gone", &in);
    xsubscribed(b, "t.marker", &marker);
    cr_assert_eq(cp_bus_unsubscribe(sub), 0);
    uint32_t after = inbox_count(&in);
    static uint8_t m[70000];
    for (uint32_t i = 1; i <= 100; i++)
        cr_assert_eq(cp_bus_publish(b, "t.gone", m, msg_make(m, i)), 0);
    /* One connection's messages arrive in order: once the marker is here,
     * whatever was published before it would have been too. */
    xmarker(b, "t.marker");
    CPT_AWAIT(inbox_markers(&marker) == 1, 5000, "the marker never came");
    cr_assert_eq(inbox_count(&in), after, "a message was delivered after the unsubscribe");
    cr_assert_eq(cp_bus_unsubscribe(msub), 0);
    pair_stop(&pr);
}

Test(bus, nats_unsubscribe_stops_delivery, .timeout = 60) { unsubscribe_stops_delivery(NATS); }
Test(bus, redis_unsubscribe_stops_delivery, .timeout = 60) { unsubscribe_stops_delivery(REDIS); }

Test(bus, nats_a_queue_group_delivers_each_message_once, .timeout = 60)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    broker nb = { 0 };
    broker_start(&nb, NATS, 0);
    char url[64];
    cp_port *port = cpt_xport(2);
    cp_bus *pub = xbus(port, broker_url(&nb, url, sizeof url));
    cp_bus *w[3];
    inbox in[3], done[3];
    cp_bus_sub *sub[3], *dsub[3];
    for (int i = 0; i < 3; i++) {
        w[i] = xbus(port, url);
        inbox_init(&in[i]);
        inbox_init(&done[i]);
    }
    CPT_AWAIT(bus_up(pub) && bus_up(w[0]) && bus_up(w[1]) && bus_up(w[2]), 5000, "never connected");
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(cp_bus_subscribe(&sub[i], w[i], "mm.find", "matchers", on_msg, &in[i], NULL), 0);
        cr_assert_eq(cp_bus_subscribe(&dsub[i], w[i], "mm.done", NULL, on_msg, &done[i], NULL), 0);
        xsubscribed(pub, "mm.done", &done[i]);
    }
    /* The queue subscriptions were sent before the done ones: they are live. */
    enum { N = 600 };
    static uint8_t m[70000];
    for (uint32_t i = 1; i <= N; i++) {
        int r;
        while ((r = cp_bus_publish(pub, "mm.find", m, msg_make(m, i))) == -EAGAIN)
            cpt_sleep_ms(1);
        cr_assert_eq(r, 0);
    }
    xmarker(pub, "mm.done");
    CPT_AWAIT(inbox_markers(&done[0]) == 1 && inbox_markers(&done[1]) == 1 && inbox_markers(&done[2]) == 1,
              5000, "the end marker did not reach every worker");
    /* Each worker's messages come in order before its marker. */
    uint32_t total = 0;
    for (int i = 0; i < 3; i++)
        total += inbox_count(&in[i]);
    cr_assert_eq(total, N, "%u deliveries for %d messages", total, N);
    for (uint32_t k = 1; k <= N; k++) {
        uint32_t got = 0;
        for (int i = 0; i < 3; i++)
            got += in[i].seen[k];
        cr_assert_eq(got, 1, "message %u delivered %u times", k, got);
    }
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(cp_bus_unsubscribe(sub[i]), 0);
        cr_assert_eq(cp_bus_unsubscribe(dsub[i]), 0);
        cr_assert_eq(cp_bus_destroy(w[i]), 0);
    }
    cr_assert_eq(cp_bus_destroy(pub), 0);
    cpt_xport_destroy(port);
    broker_kill(&nb);
    cpt_leak_end(&leak);
}

static void the_broker_killed_and_restarted_is_reconnected_and_resubscribed(int kind)
{
    bus_pair pr;
    pair_start(&pr, kind);
    cp_bus *a = pr.a, *b = pr.b;
    inbox in;
    inbox_init(&in);
    cp_bus_sub *sub;
    cr_assert_eq(cp_bus_subscribe(&sub, a, "t.restart", NULL, on_msg, &in, NULL), 0);
    xsubscribed(b, "t.restart", &in);

    broker_kill(&pr.nb);
    CPT_AWAIT(!bus_up(a) && !bus_up(b), 5000, "the buses did not see the broker go");
    uint8_t m[8];
    cr_assert_eq(cp_bus_publish(b, "t.restart", m, msg_make(m, PROBE)), -ENOTCONN);
    cr_assert_geq(bus_stats(b).dropped, 1, "the lost publish is counted");

    uint64_t t0 = cpt_now_ms();
    broker_start(&pr.nb, kind, pr.nb.port);
    CPT_AWAIT(bus_up(a) && bus_up(b), 5000, "the buses never came back");
    cr_assert_leq(cpt_now_ms() - t0, 3000 + 500, "reconnected after %llu ms",
                  (unsigned long long)(cpt_now_ms() - t0));
    cr_assert_geq(bus_stats(a).reconnects, 1);
    /* Resubscribed: a publish reaches the subscription again. */
    xsubscribed(b, "t.restart", &in);

    cr_assert_eq(cp_bus_unsubscribe(sub), 0);
    pair_stop(&pr);
}

Test(bus, nats_the_broker_killed_and_restarted_is_reconnected_and_resubscribed, .timeout = 60)
{
    the_broker_killed_and_restarted_is_reconnected_and_resubscribed(NATS);
}
Test(bus, redis_the_broker_killed_and_restarted_is_reconnected_and_resubscribed, .timeout = 60)
{
    the_broker_killed_and_restarted_is_reconnected_and_resubscribed(REDIS);
}

Test(bus, nats_a_dead_node_fails_over_to_the_next_url, .timeout = 60)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    broker n1 = { 0 }, n2 = { 0 };
    broker_start(&n1, NATS, 0);
    broker_start(&n2, NATS, 0);
    char url[128];
    snprintf(url, sizeof url, "nats://127.0.0.1:%u,127.0.0.1:%u", n1.port, n2.port);
    cp_port *port = cpt_xport(2);
    cp_bus *a = xbus(port, url);
    cp_bus *b = xbus(port, url);
    CPT_AWAIT(bus_up(a) && bus_up(b), 5000, "the buses never connected");
    broker_kill(&n1);
    CPT_AWAIT(bus_stats(a).reconnects >= 1 && bus_stats(b).reconnects >= 1 && bus_up(a) && bus_up(b), 5000,
              "the buses did not move to the second node");
    inbox in;
    inbox_init(&in);
    cp_bus_sub *sub;
    cr_assert_eq(cp_bus_subscribe(&sub, a, "t.failover", NULL, on_msg, &in, NULL), 0);
    xsubscribed(b, "t.failover", &in);
    cr_assert_eq(cp_bus_unsubscribe(sub), 0);
    cr_assert_eq(cp_bus_destroy(a), 0);
    cr_assert_eq(cp_bus_destroy(b), 0);
    cpt_xport_destroy(port);
    broker_kill(&n2);
    cpt_leak_end(&leak);
}

static void a_publish_past_the_pending_bound_is_refused(int kind)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    broker nb = { 0 };
    broker_start(&nb, kind, 0);
    char url[64];
    cp_port *port = cpt_xport(2);
    cp_bus *bus = NULL;
    cp_bus_opts o = { .url = broker_url(&nb, url, sizeof url),
                      .pending_limit = 256 * 1024,
                      .ping_interval_ms = 60000 };
    cr_assert_eq(cp_bus_create(&bus, port, &o), 0);
    CPT_AWAIT(bus_up(bus), 5000, "never connected");
    /* A stopped broker reads nothing: the socket buffers fill, then the bus's
     * own queue up to its bound. */
    kill(nb.pid, SIGSTOP);
    static uint8_t big[60000];
    int r = 0;
    uint64_t deadline = cpt_now_ms() + 10000;
    while ((r = cp_bus_publish(bus, "t.flood", big, sizeof big)) == 0 && cpt_now_ms() < deadline)
        ;
    cr_assert_eq(r, -EAGAIN, "publishing into a stopped broker ended with %d", r);
    cp_bus_stats st = bus_stats(bus);
    cr_assert_leq(st.pending_bytes, o.pending_limit, "%llu bytes pending",
                  (unsigned long long)st.pending_bytes);
    cr_assert_geq(st.pending_bytes, o.pending_limit - sizeof big - 64);
    kill(nb.pid, SIGCONT);
    CPT_AWAIT(bus_stats(bus).pending_bytes == 0, 5000, "the queue never drained");
    cr_assert_eq(cp_bus_publish(bus, "t.flood", big, 100), 0);
    cr_assert_eq(cp_bus_destroy(bus), 0);
    cpt_xport_destroy(port);
    broker_kill(&nb);
    cpt_leak_end(&leak);
}

Test(bus, nats_a_publish_past_the_pending_bound_is_refused, .timeout = 60)
{
    a_publish_past_the_pending_bound_is_refused(NATS);
}
Test(bus, redis_a_publish_past_the_pending_bound_is_refused, .timeout = 60)
{
    a_publish_past_the_pending_bound_is_refused(REDIS);
}

Test(bus, bad_arguments_are_refused, .timeout = 10)
{
    cp_port *port = cpt_xport(1);
    cp_bus *bus = NULL;
    const char *bad[] = { "",
                          "nats://",
                          "nats://127.0.0.1",
                          "nats://127.0.0.1:0",
                          "nats://127.0.0.1:65536",
                          "nats://:4222",
                          "tcp://127.0.0.1:4222",
                          "nats://127.0.0.1:4222,",
                          "127.0.0.1:4222" };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        cp_bus_opts o = { .url = bad[i] };
        cr_assert_eq(cp_bus_create(&bus, port, &o), -EINVAL, "%s", bad[i]);
    }
    cp_bus_opts o = { .url = "nats://127.0.0.1:4222", .name = "has space" };
    cr_assert_eq(cp_bus_create(&bus, port, &o), -EINVAL);
    cr_assert_eq(cp_bus_create(NULL, port, &o), -EINVAL);
    /* A valid bus to a closed port: created, not connected; calls refused. */
    char url[64];
    snprintf(url, sizeof url, "nats://127.0.0.1:%u", free_port());
    cp_bus_opts ok = { .url = url };
    cr_assert_eq(cp_bus_create(&bus, port, &ok), 0);
    cp_bus_sub *sub;
    cr_assert_eq(cp_bus_subscribe(&sub, bus, "a..b", NULL, on_msg, NULL, NULL), -EINVAL);
    cr_assert_eq(cp_bus_subscribe(&sub, bus, "a b", NULL, on_msg, NULL, NULL), -EINVAL);
    cr_assert_eq(cp_bus_subscribe(&sub, bus, "a", "q q", on_msg, NULL, NULL), -EINVAL);
    cr_assert_eq(cp_bus_subscribe(&sub, bus, "a", NULL, NULL, NULL, NULL), -EINVAL);
    cr_assert_eq(cp_bus_publish(bus, "a.*", "x", 1), -EINVAL);
    cr_assert_eq(cp_bus_publish(bus, "a\r\nPUB b 1", "x", 1), -EINVAL);
    cr_assert_eq(cp_bus_publish(bus, "a", "x", 1), -ENOTCONN);
    cr_assert_eq(cp_bus_destroy(bus), 0);
    cpt_xport_destroy(port);
}

/* ------------------------------------------------------------------ a room across two servers */

typedef struct room_server {
    cp_service *svc;
    cp_group *g;
    cp_bus *bus;
} room_server;

static void room_on_connected(cp_session *s)
{
    room_server *rs = cp_session_ctx(s);
    cr_assert_eq(cp_group_add(rs->g, s), 0);
}

/* Every packet a player sends goes to the room (id kept). */
static int room_on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    room_server *rs = cp_session_ctx(s);
    cp_sendbuf *b = cp_packet_make(id, body, len);
    if (!b)
        return -1;
    cp_group_broadcast(rs->g, b);
    cp_sendbuf_unref(b);
    return 0;
}

static void room_start(room_server *rs, cp_port *port, const char *url)
{
    cr_assert_eq(cp_group_create(&rs->g), 0);
    rs->bus = xbus(port, url);
    cr_assert_eq(cp_group_bridge(rs->g, rs->bus, "room.t"), 0);
    cr_assert_eq(cp_group_bridge(rs->g, rs->bus, "room.t"), -EBUSY);
    cp_server_opts so = { .host = CPT_HOST4 };
    cp_handlers h = { .on_connected = room_on_connected, .on_packet = room_on_packet };
    rs->svc = cpt_xserver(port, &so, &h, rs);
}

/* Two room servers on one port, A's bus on url_a and B's on url_b (one
 * broker's URL twice, or a cluster's nodes), both bridged to room.t. */
static cp_port *rooms_start(room_server *a, room_server *b, const char *url_a, const char *url_b)
{
    cp_port *port = cpt_xport(2);
    *a = (room_server){ 0 };
    *b = (room_server){ 0 };
    room_start(a, port, url_a);
    room_start(b, port, url_b);
    CPT_AWAIT(bus_up(a->bus) && bus_up(b->bus), 5000, "the buses never connected");
    return port;
}

/* Stops both; A's group goes before its bus and B's after: the bridge ends
 * with either. */
static void rooms_stop(cp_port *port, room_server *a, room_server *b)
{
    cpt_xstop(a->svc);
    cpt_xstop(b->svc);
    cp_group_destroy(a->g);
    cr_assert_eq(cp_bus_destroy(a->bus), 0);
    cr_assert_eq(cp_bus_destroy(b->bus), 0);
    cp_group_destroy(b->g);
    cpt_xport_destroy(port);
}

/* Reads packets until one with id 1 (probes have id 2); its u32 body. */
static uint32_t next_room_packet(int fd)
{
    for (;;) {
        uint16_t id;
        uint8_t body[16];
        size_t len;
        cr_assert_eq(cpt_recv_packet(fd, &id, body, sizeof body, &len), 0, "no packet from the room");
        if (id == 1) {
            cr_assert_eq(len, 4);
            return cp_get_u32(body);
        }
    }
}

static void a_room_bridged_across_two_servers_gets_every_packet_in_each_senders_order(int kind)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    broker nb = { 0 };
    broker_start(&nb, kind, 0);
    char url[64];
    broker_url(&nb, url, sizeof url);
    room_server a, b;
    cp_port *port = rooms_start(&a, &b, url, url);
    int fa[2], fb[2];
    for (int i = 0; i < 2; i++) {
        fa[i] = cpt_xconnect(cp_service_listen_port(a.svc));
        fb[i] = cpt_xconnect(cp_service_listen_port(b.svc));
    }
    CPT_AWAIT(cp_group_size(a.g) == 2 && cp_group_size(b.g) == 2, 5000, "the players never joined");
    /* The bridges are live once a probe from a player on A reaches B. */
    uint8_t probe[4] = { 0 };
    CPT_AWAIT((cpt_xsend_packet(fa[0], 2, probe, 4), cpt_poll_in(fb[0], 20) > 0), 5000,
              "the bridge never carried");

    enum { N = 300 };
    for (uint32_t i = 1; i <= N; i++) {
        uint8_t body[4];
        cp_put_u32(body, i);
        cpt_xsend_packet(fa[0], 1, body, 4);
        cp_put_u32(body, 100000 + i);
        cpt_xsend_packet(fb[1], 1, body, 4);
    }
    int all[4] = { fa[0], fa[1], fb[0], fb[1] };
    for (int k = 0; k < 4; k++) {
        uint32_t from_a = 0, from_b = 100000;
        for (int n = 0; n < 2 * N; n++) {
            uint32_t v = next_room_packet(all[k]);
            if (v < 100000) {
                cr_assert_eq(v, from_a + 1, "player %d: %u after %u from A", k, v, from_a);
                from_a = v;
            } else {
                cr_assert_eq(v, from_b + 1, "player %d: %u after %u from B", k, v, from_b);
                from_b = v;
            }
        }
    }
    cr_assert_eq(bus_stats(a.bus).gaps, 0);
    cr_assert_eq(bus_stats(b.bus).gaps, 0);
    cr_assert_eq(bus_stats(a.bus).dropped + bus_stats(b.bus).dropped, 0);

    for (int i = 0; i < 2; i++) {
        cpt_close(fa[i]);
        cpt_close(fb[i]);
    }
    rooms_stop(port, &a, &b);
    broker_kill(&nb);
    cpt_leak_end(&leak);
}

Test(bus, nats_a_room_bridged_across_two_servers_gets_every_packet_in_each_senders_order, .timeout = 60)
{
    a_room_bridged_across_two_servers_gets_every_packet_in_each_senders_order(NATS);
}
Test(bus, redis_a_room_bridged_across_two_servers_gets_every_packet_in_each_senders_order, .timeout = 60)
{
    a_room_bridged_across_two_servers_gets_every_packet_in_each_senders_order(REDIS);
}

/* ------------------------------------------------------------------ Redis's own */

Test(bus, redis_a_servers_own_publishes_do_not_come_back, .timeout = 60)
{
    bus_pair pr;
    pair_start(&pr, REDIS);
    cp_bus *a = pr.a, *b = pr.b;
    inbox ina, inb;
    inbox_init(&ina);
    inbox_init(&inb);
    cp_bus_sub *sa, *sb;
    cr_assert_eq(cp_bus_subscribe(&sa, a, "t.own", NULL, on_msg, &ina, NULL), 0);
    cr_assert_eq(cp_bus_subscribe(&sb, b, "t.own", NULL, on_msg, &inb, NULL), 0);
    xsubscribed(b, "t.own", &ina);
    xsubscribed(a, "t.own", &inb);
    static uint8_t m[70000];
    for (uint32_t i = 1; i <= 100; i++)
        cr_assert_eq(cp_bus_publish(a, "t.own", m, msg_make(m, i)), 0);
    xmarker(a, "t.own");
    CPT_AWAIT(inbox_markers(&inb) == 1, 5000, "the marker never reached the other server");
    cr_assert_eq(inbox_count(&inb), 100);
    cr_assert_eq(inb.corrupt + inb.out_of_order, 0);
    /* a's own marker would have come back by now, after its 100 messages. */
    xmarker(b, "t.own");
    CPT_AWAIT(inbox_markers(&ina) == 1, 5000, "b's marker never reached a");
    cr_assert_eq(inbox_count(&ina), 0, "a got %u of its own messages back", inbox_count(&ina));

    /* What Redis cannot do is refused, not emulated. */
    cp_bus_sub *sq;
    cr_assert_eq(cp_bus_subscribe(&sq, a, "t.q", "workers", on_msg, &ina, NULL), -ENOTSUP);
    cr_assert_eq(cp_bus_subscribe(&sq, a, "t.*", NULL, on_msg, &ina, NULL), -ENOTSUP);

    cr_assert_eq(cp_bus_unsubscribe(sa), 0);
    cr_assert_eq(cp_bus_unsubscribe(sb), 0);
    pair_stop(&pr);
}

/* ------------------------------------------------------------------ the broker gone under a room */

static void send_room(int fd, uint32_t v)
{
    uint8_t body[4];
    cp_put_u32(body, v);
    cpt_xsend_packet(fd, 1, body, 4);
}

static void room_broker_outage(int kind)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    broker nb = { 0 };
    broker_start(&nb, kind, 0);
    char url[64];
    broker_url(&nb, url, sizeof url);
    room_server a, b;
    cp_port *port = rooms_start(&a, &b, url, url);
    int fa = cpt_xconnect(cp_service_listen_port(a.svc));
    int fb = cpt_xconnect(cp_service_listen_port(b.svc));
    CPT_AWAIT(cp_group_size(a.g) == 1 && cp_group_size(b.g) == 1, 5000, "the players never joined");
    uint8_t probe[4] = { 0 };
    CPT_AWAIT((cpt_xsend_packet(fa, 2, probe, 4), cpt_poll_in(fb, 20) > 0), 5000, "the bridge never carried");

    uint32_t v = 0;
    for (int i = 0; i < 50; i++)
        send_room(fa, ++v);
    for (uint32_t i = 1; i <= 50; i++) {
        cr_assert_eq(next_room_packet(fa), i);
        cr_assert_eq(next_room_packet(fb), i);
    }
    broker_kill(&nb);
    CPT_AWAIT(!bus_up(a.bus) && !bus_up(b.bus), 5000, "the buses did not see the broker go");
    /* The server still serves its own players. */
    for (int i = 0; i < 50; i++)
        send_room(fa, ++v);
    for (uint32_t i = 51; i <= 100; i++)
        cr_assert_eq(next_room_packet(fa), i, "the local room stopped while the broker was gone");

    uint64_t t0 = cpt_now_ms();
    broker_start(&nb, kind, nb.port);
    /* Sent every 20 ms until one crosses: the first that does shows the gap. */
    uint32_t got = 0;
    while (got == 0 && cpt_now_ms() - t0 < 5000) {
        send_room(fa, ++v);
        cr_assert_eq(next_room_packet(fa), v);
        while (cpt_poll_in(fb, 20) > 0 && got == 0)
            got = next_room_packet(fb);
    }
    uint64_t took = cpt_now_ms() - t0;
    cr_assert(got > 100, "no room packet crossed after the broker came back (%llu ms)",
              (unsigned long long)took);
    cr_assert_leq(took, 3000, "cross-server delivery resumed %llu ms after the broker",
                  (unsigned long long)took);
    CPT_AWAIT(bus_stats(b.bus).gaps >= got - 51, 2000, "the receiving server counted %llu lost of %u",
              (unsigned long long)bus_stats(b.bus).gaps, got - 51);
    cp_service_stats st;
    cp_service_stats_get(a.svc, &st);
    cr_assert_eq(st.disconnected, 0, "a player was disconnected during the outage");

    cpt_close(fa);
    cpt_close(fb);
    rooms_stop(port, &a, &b);
    broker_kill(&nb);
    cpt_leak_end(&leak);
}

Test(bus, nats_the_broker_gone_under_a_room_loses_only_what_crossed_and_counts_it, .timeout = 60)
{
    room_broker_outage(NATS);
}

Test(bus, redis_the_broker_gone_under_a_room_loses_only_what_crossed_and_counts_it, .timeout = 60)
{
    room_broker_outage(REDIS);
}

/* ------------------------------------------------------------------ a NATS cluster */

Test(bus, nats_a_room_survives_losing_a_node_of_a_two_node_cluster, .timeout = 60)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    /* Two nodes routed to each other: what is published on one reaches
     * subscribers on the other. */
    broker n1 = { .cluster = free_port() }, n2 = { .cluster = free_port() };
    n1.route = n2.cluster;
    n2.route = n1.cluster;
    broker_start(&n1, NATS, 0);
    broker_start(&n2, NATS, 0);
    char url_a[128], url_b[128];
    snprintf(url_a, sizeof url_a, "nats://127.0.0.1:%u,127.0.0.1:%u", n1.port, n2.port);
    snprintf(url_b, sizeof url_b, "nats://127.0.0.1:%u,127.0.0.1:%u", n2.port, n1.port);
    room_server a, b;
    cp_port *port = rooms_start(&a, &b, url_a, url_b); /* A on node 1, B on node 2 */
    int fa = cpt_xconnect(cp_service_listen_port(a.svc));
    int fb = cpt_xconnect(cp_service_listen_port(b.svc));
    CPT_AWAIT(cp_group_size(a.g) == 1 && cp_group_size(b.g) == 1, 5000, "the players never joined");
    /* Across the route, both ways, once the nodes have met and shared the
     * subscriptions. */
    uint8_t probe[4] = { 0 };
    CPT_AWAIT((cpt_xsend_packet(fa, 2, probe, 4), cpt_poll_in(fb, 20) > 0), 10000,
              "node 1 never reached node 2");
    CPT_AWAIT((cpt_xsend_packet(fb, 2, probe, 4), cpt_poll_in(fa, 20) > 0), 10000,
              "node 2 never reached node 1");

    broker_kill(&n1);
    CPT_AWAIT(bus_stats(a.bus).reconnects >= 1 && bus_up(a.bus), 5000,
              "server A did not fail over to node 2");
    /* The room carries again, both ways, each sender's packets in order. */
    uint32_t v = 1000;
    uint32_t got = 0;
    uint64_t t0 = cpt_now_ms();
    while (got == 0 && cpt_now_ms() - t0 < 5000) {
        send_room(fa, ++v);
        cr_assert_eq(next_room_packet(fa), v);
        while (cpt_poll_in(fb, 20) > 0 && got == 0)
            got = next_room_packet(fb);
    }
    cr_assert(got > 1000, "nothing crossed from A after the failover");
    for (uint32_t i = 1; i <= 50; i++) {
        send_room(fb, 5000 + i);
        send_room(fa, ++v);
    }
    /* At B's player: A's packets after the first that crossed, strictly
     * increasing up to the last sent, and B's own 5001..5050 in order (a
     * missing packet makes next_room_packet time out and fail). */
    uint32_t last_a = got, last_b = 5000;
    while (last_a != v || last_b != 5050) {
        uint32_t x = next_room_packet(fb);
        if (x > 5000) {
            cr_assert_eq(x, last_b + 1, "B's own packets out of order");
            last_b = x;
        } else {
            cr_assert_gt(x, last_a, "A's packets out of order at B");
            last_a = x;
        }
    }
    cr_assert_eq(last_a, v, "A's packets stopped at %u of %u", last_a, v);
    cr_assert_eq(last_b, 5050);
    cp_service_stats st;
    cp_service_stats_get(a.svc, &st);
    cr_assert_eq(st.disconnected, 0, "a player was disconnected by the failover");

    cpt_close(fa);
    cpt_close(fb);
    rooms_stop(port, &a, &b);
    broker_kill(&n2);
    cpt_leak_end(&leak);
}

/* ------------------------------------------------------------------ a slow consumer */

static atomic_int stall_ms;

/* Holds the subscriber's worker once, as a game's slow handler would. */
static void on_msg_stall(void *arg, const cp_bus_msg *m)
{
    int ms = atomic_exchange(&stall_ms, 0);
    if (ms)
        cpt_sleep_ms((unsigned)ms);
    on_msg(arg, m);
}

Test(bus, nats_a_subscriber_the_broker_cuts_as_slow_reconnects_and_counts_it, .timeout = 60)
{
    cpt_leak_mark leak;
    cpt_leak_begin(&leak);
    /* A server that lets a client fall behind by 256 KB only. */
    char conf[] = "/tmp/cport-nats-XXXXXX";
    int cfd = mkstemp(conf);
    cr_assert(cfd >= 0);
    static const char text[] = "max_pending: 262144\nmax_payload: 131072\nwrite_deadline: \"500ms\"\n";
    cr_assert_eq(write(cfd, text, sizeof text - 1), (ssize_t)(sizeof text - 1));
    close(cfd);
    broker nb = { .config = conf };
    broker_start(&nb, NATS, 0);
    char url[64];
    broker_url(&nb, url, sizeof url);
    /* Each bus on a port of its own: the stalled worker is the subscriber's
     * alone. */
    cp_port *ps = cpt_xport(1), *pp = cpt_xport(1);
    cp_bus *sub_bus = xbus(ps, url), *pub_bus = xbus(pp, url);
    CPT_AWAIT(bus_up(sub_bus) && bus_up(pub_bus), 5000, "the buses never connected");
    inbox in;
    inbox_init(&in);
    cp_bus_sub *sub;
    cr_assert_eq(cp_bus_subscribe(&sub, sub_bus, "t.slow", NULL, on_msg_stall, &in, NULL), 0);
    xsubscribed(pub_bus, "t.slow", &in);
    atomic_store(&stall_ms, 3000);
    static uint8_t m[70000];
    uint64_t t0 = cpt_now_ms();
    for (uint32_t i = 1; bus_stats(sub_bus).reconnects == 0 && cpt_now_ms() - t0 < 20000; i++) {
        int r = cp_bus_publish(pub_bus, "t.slow", m, msg_make(m, 60));
        if (r == -EAGAIN)
            cpt_sleep_ms(1);
    }
    cr_assert_geq(bus_stats(sub_bus).reconnects, 1, "the broker never cut the stalled subscriber");
    /* Back and subscribed again: new messages arrive. */
    xsubscribed(pub_bus, "t.slow", &in);
    cr_assert_eq(cp_bus_unsubscribe(sub), 0);
    cr_assert_eq(cp_bus_destroy(sub_bus), 0);
    cr_assert_eq(cp_bus_destroy(pub_bus), 0);
    cpt_xport_destroy(ps);
    cpt_xport_destroy(pp);
    broker_kill(&nb);
    unlink(conf);
    cpt_leak_end(&leak);
}
