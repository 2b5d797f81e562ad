/* SPDX-License-Identifier: MIT */
/*
 * TLS against real peers, on every Linux backend: OpenSSL's own s_client and
 * s_server (Debian's openssl 3.0) and Node's tls module (tests/tls_peer.js),
 * each started by the test with fork and exec on 127.0.0.1 and killed with
 * it. Echo byte-identical over TLS 1.3 and 1.2 (packets up to 64 KiB);
 * cport's TLS client against s_server and cport, verification failures;
 * what is not TLS (plaintext, HTTP, garbage, silence) closed while a
 * neighbour is served, handshake deadlines also for hellos that waited for
 * their turn; close_notify both ways, also from a graceful stop; KeyUpdate;
 * renegotiation refused by the server and by the client; client
 * certificates; tickets shared by two servers, and none with no_tickets; a
 * certificate reloaded under load; a reconnect storm, and a stop in the
 * middle of one; bad arguments.
 *
 * Each test makes its own P-256 certificates with `openssl req` in a
 * temporary directory of its own, removed when the test process exits.
 * Linux only (fork and exec; TLS answers -ENOTSUP on Windows).
 */
#include "helpers.h"
#include "peers.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#ifndef CPT_TLS_PEER_JS
#  error "CPT_TLS_PEER_JS: the path of tests/tls_peer.js (tests/CMakeLists.txt)"
#endif

#define ID_BYE 9 /* the shutdown server: answer with data, then close gracefully */

/* The server's certificate of every test. */
static pem g_main;

static void certs(void) { pem_make(&g_main, "main", "localhost"); }

/* ------------------------------------------------------------------ the peers */

/* openssl s_client to 127.0.0.1:port, verifying the server against ca
 * (NULL: the test's certificate) for the name "localhost", with the extra
 * arguments given (NULL-terminated). */
static void sclient_start_ca(peer *p, uint16_t port, const char *ca, ...)
{
    char connect[32];
    snprintf(connect, sizeof connect, "127.0.0.1:%u", port);
    char *argv[40] = { OPENSSL_BIN,   "s_client",  "-connect",
                       connect,       "-CAfile",   (char *)(ca ? ca : g_main.cert),
                       "-servername", "localhost", "-verify_return_error" };
    int n = 9;
    va_list ap;
    va_start(ap, ca);
    for (char *a; (a = va_arg(ap, char *)) != NULL;) {
        cr_assert_lt(n, 39);
        argv[n++] = a;
    }
    va_end(ap);
    argv[n] = NULL;
    peer_start(p, argv);
}

#define sclient_start(p, port, ...) sclient_start_ca(p, port, NULL, __VA_ARGS__)

/* s_client with -brief: its stdout carries only what the server sent, its
 * stderr the summary, which says the handshake is done. The verification
 * comes after the protocol and the peer's certificate in it. */
static void sclient_xup(peer *p) { peer_xwait(p, ERR, "Verification: OK", 5000); }

/* Node's TLS (tests/tls_peer.js) in one of its modes, against port. */
static void node_start(peer *p, const char *mode, uint16_t port, const char *ca, ...)
{
    char ports[16];
    snprintf(ports, sizeof ports, "%u", port);
    char *argv[20] = { NODE_BIN, CPT_TLS_PEER_JS, (char *)mode, ports, (char *)(ca ? ca : g_main.cert) };
    int n = 5;
    va_list ap;
    va_start(ap, ca);
    for (char *a; (a = va_arg(ap, char *)) != NULL;) {
        cr_assert_lt(n, 19);
        argv[n++] = a;
    }
    va_end(ap);
    argv[n] = NULL;
    peer_start(p, argv);
}

/* The last "COUNT <echoes> <fewest of one connection> <errors>" line of a
 * node peer in load mode; false before the first. */
static bool node_count(peer *p, long *total, long *fewest, long *errors)
{
    bool ok = false;
    pthread_mutex_lock(&p->lock);
    const char *last = NULL, *at = p->buf[OUT];
    while (at && (at = strstr(at, "COUNT ")) != NULL) {
        last = at;
        at += 6;
    }
    if (last && strchr(last, '\n'))
        ok = sscanf(last, "COUNT %ld %ld %ld", total, fewest, errors) == 3;
    pthread_mutex_unlock(&p->lock);
    return ok;
}

static long node_fewest(peer *p)
{
    long total = 0, fewest = -1, errors = 0;
    return node_count(p, &total, &fewest, &errors) ? fewest : -1;
}

/* ------------------------------------------------------------------ packets */

static uint32_t rnd_state;

static uint32_t rnd(void)
{
    rnd_state ^= rnd_state << 13;
    rnd_state ^= rnd_state >> 17;
    rnd_state ^= rnd_state << 5;
    return rnd_state;
}

/* count packets with bodies of random sizes up to max_body, patterned: the
 * stream, its length in *len. */
static uint8_t *stream_make(int count, size_t max_body, uint32_t seed, size_t *len)
{
    rnd_state = seed;
    uint8_t *buf = malloc((size_t)count * (max_body + 4));
    size_t off = 0;
    for (int i = 0; i < count; i++) {
        size_t body = rnd() % (max_body + 1);
        cpt_put_header(buf + off, (uint16_t)(body + 4), (uint16_t)i);
        cpt_fill(buf + off + 4, body, off, seed);
        off += body + 4;
    }
    *len = off;
    return buf;
}

/* Sends one packet through an s_client peer (-brief: its stdout is the
 * server's bytes only) and asserts it comes back byte-identical. */
static void sclient_xecho(peer *p, uint16_t id, size_t body)
{
    uint8_t pkt[4100], back[4100];
    cr_assert_leq(body + 4, sizeof pkt);
    cpt_put_header(pkt, (uint16_t)(body + 4), id);
    cpt_fill(pkt + 4, body, id, 77);
    size_t from = peer_len(p, OUT);
    peer_write(p, pkt, body + 4);
    bool ok = false;
    CPT_WAIT(ok, peer_len(p, OUT) >= from + body + 4, 5000);
    if (!ok)
        peer_dump(p, "s_client");
    cr_assert(ok, "packet %u was not echoed (%zu of %zu bytes)", id, peer_len(p, OUT) - from, body + 4);
    cr_assert(peer_copy(p, OUT, from, back, body + 4));
    cr_assert_eq(memcmp(back, pkt, body + 4), 0, "packet %u came back different", id);
}

/* ------------------------------------------------------------------ servers */

/* What on_connected saw of each session's TLS (cp_session_tls_info). */
typedef struct seen_rec {
    int n, errors, resumed;
    int last_rc;
    cp_tls_info last;
    cp_service *last_svc;
} seen_rec;

static pthread_mutex_t seen_lock = PTHREAD_MUTEX_INITIALIZER;
static seen_rec seen;

static void seen_info(cp_session *s)
{
    cp_tls_info info;
    int rc = cp_session_tls_info(s, &info);
    pthread_mutex_lock(&seen_lock);
    seen.n++;
    seen.last_rc = rc;
    seen.last_svc = cp_session_service(s);
    if (rc == 0) {
        seen.last = info;
        seen.resumed += info.resumed;
    } else {
        seen.errors++;
    }
    pthread_mutex_unlock(&seen_lock);
}

/* A copy, for the test's thread. */
static seen_rec seen_get(void)
{
    pthread_mutex_lock(&seen_lock);
    seen_rec r = seen;
    pthread_mutex_unlock(&seen_lock);
    return r;
}

static int seen_count(void) { return seen_get().n; }

static void on_connected_info(cp_session *s)
{
    cpt_on_connected(s);
    seen_info(s);
}

/* The tracking handlers (echo), with the TLS query in on_connected. */
static cp_handlers tls_handlers(void)
{
    cp_handlers h = cpt_track_handlers();
    h.on_connected = on_connected_info;
    return h;
}

typedef struct tls_env {
    cpt_env e; /* port, server, tracking, leak mark */
    cp_tls *tls;
} tls_env;

/* A tracking packet-echo server on 127.0.0.1 speaking TLS with opts (NULL:
 * the test's certificate and nothing else), its other options from so
 * (NULL: the defaults). */
static void env_start_so(tls_env *te, const cp_tls_opts *opts, const cp_handlers *h, int cap,
                         const cp_server_opts *so)
{
    cp_tls_opts def = { .cert_file = g_main.cert, .key_file = g_main.key };
    cr_assert_eq(cp_tls_create(&te->tls, opts ? opts : &def), 0);
    cp_server_opts o = { .host = CPT_HOST4 };
    if (so)
        o = *so;
    o.session.tls = te->tls;
    cp_handlers hh = h ? *h : tls_handlers();
    cpt_env_start(&te->e, 2, &o, &hh, cap, 0);
}

static void env_start(tls_env *te, const cp_tls_opts *opts, const cp_handlers *h, int cap)
{
    env_start_so(te, opts, h, cap, NULL);
}

static void env_stop(tls_env *te)
{
    cp_tls *tls = te->tls;
    cpt_env_stop(&te->e); /* the leak check: tls is still ours here, so not a leak */
    cp_tls_unref(tls);
}

static uint64_t by_reason(const cp_service *svc, cp_reason r) { return cpt_stats(svc).by_reason[r]; }

/* ------------------------------------------------------------------ 1. echo */

/* s_client sends a stream of count packets (bodies of 0..max_body bytes)
 * cut into pieces of odd sizes; its stdout must be the same stream, and
 * on_sent must have counted it (the user's bytes, not the records'). */
static void sclient_stream_echoed(const char *flag, const char *version, int count, size_t max_body)
{
    certs();
    cp_server_opts so = { .host = CPT_HOST4 };
    so.session.max_packet = (uint32_t)(max_body + 4);
    tls_env te;
    env_start_so(&te, NULL, NULL, 8, &so);
    peer c;
    sclient_start(&c, te.e.sport, "-brief", "-nocommands", flag, NULL);
    sclient_xup(&c);
    size_t len;
    uint8_t *stream = stream_make(count, max_body, 11, &len);
    rnd_state = 5;
    for (size_t off = 0; off < len;) {
        size_t take = 1 + rnd() % (max_body + 1000);
        take = take < len - off ? take : len - off;
        peer_write(&c, stream + off, take);
        off += take;
        if (rnd() % 4 == 0)
            cpt_sleep_ms(1); /* s_client reads each piece on its own: records of odd sizes */
    }
    bool ok = false;
    CPT_WAIT(ok, peer_len(&c, OUT) >= len, 20000);
    if (!ok)
        peer_dump(&c, "s_client");
    cr_assert(ok, "%zu of %zu bytes echoed", peer_len(&c, OUT), len);
    uint8_t *back = malloc(len);
    cr_assert(peer_copy(&c, OUT, 0, back, len));
    cr_assert_eq(memcmp(back, stream, len), 0, "the echo differs from what was sent");
    cr_assert_eq(peer_len(&c, OUT), len, "more came back than was sent");
    free(back);
    free(stream);

    char want[64];
    snprintf(want, sizeof want, "Protocol version: %s", version);
    cr_assert(peer_has(&c, ERR, want), "s_client did not speak %s", version);
    seen_rec sn = seen_get();
    cr_assert_eq(sn.n, 1);
    cr_assert_eq(sn.last_rc, 0, "cp_session_tls_info: %s", cp_strerror(sn.last_rc));
    cr_assert_str_eq(sn.last.version, version);
    cr_assert(sn.last.cipher[0] != '\0');
    cr_assert_eq(sn.last.resumed, 0);
    cr_assert_eq(cpt_stats(te.e.svc).packets_in, (uint64_t)count);
    CPT_AWAIT(atomic_load(&te.e.t->bytes_sent) == (long long)len, 5000, "on_sent counted %lld of %zu bytes",
              (long long)atomic_load(&te.e.t->bytes_sent), len);

    /* End of input: s_client sends close_notify, which ends the session. */
    peer_close_in(&c);
    cr_assert_eq(peer_xexit(&c, 5000), 0);
    CPT_AWAIT(atomic_load(&te.e.t->disconnected) == 1, 5000, "the session did not end");
    cr_assert_eq(atomic_load(&te.e.t->recs[0].reason), CP_REASON_PEER_CLOSED);
    cr_assert_eq(atomic_load(&te.e.t->recs[0].err), 0);
    peer_stop(&c);
    env_stop(&te);
}

Test(tls, s_client_tls13_stream_echoed_byte_identical, .timeout = 30)
{
    sclient_stream_echoed("-tls1_3", "TLSv1.3", 200, 4000);
}

Test(tls, s_client_tls12_stream_echoed_byte_identical, .timeout = 30)
{
    sclient_stream_echoed("-tls1_2", "TLSv1.2", 200, 4000);
}

/* Packets up to 64 KiB: echoes larger than one record's 16 KiB are
 * encrypted from where they are, between runs of small ones. */
Test(tls, s_client_large_packets_echoed_byte_identical, .timeout = 60)
{
    sclient_stream_echoed("-tls1_3", "TLSv1.3", 60, 65531);
}

/* Node: 300 packets of 0..4000 bytes, the stream cut at random points, each
 * piece its own write; Node compares the echo byte for byte. */
static void node_burst_echoed(const char *max, const char *seed)
{
    certs();
    tls_env te;
    env_start(&te, NULL, NULL, 8);
    peer n;
    char maxarg[32];
    snprintf(maxarg, sizeof maxarg, "max=%s", max);
    node_start(&n, "burst", te.e.sport, NULL, "packets=300", maxarg, seed, NULL);
    int rc = peer_xexit(&n, 20000);
    if (rc != 0)
        peer_dump(&n, "node");
    cr_assert_eq(rc, 0, "node's echo check failed");
    char up[32];
    snprintf(up, sizeof up, "UP %s ", max);
    cr_assert(peer_has(&n, OUT, up) && peer_has(&n, OUT, "\nOK "), "node: no %s session or no OK", max);
    cr_assert_eq(cpt_stats(te.e.svc).packets_in, 300);
    seen_rec sn = seen_get();
    cr_assert_eq(sn.n, 1);
    cr_assert_str_eq(sn.last.version, max);
    /* Node ended with close_notify. */
    CPT_AWAIT(atomic_load(&te.e.t->disconnected) == 1, 5000, "the session did not end");
    cr_assert_eq(atomic_load(&te.e.t->recs[0].reason), CP_REASON_PEER_CLOSED);
    cr_assert_eq(atomic_load(&te.e.t->recs[0].err), 0);
    peer_stop(&n);
    env_stop(&te);
}

Test(tls, node_tls13_300_packets_split_at_odd_points, .timeout = 40)
{
    node_burst_echoed("TLSv1.3", "seed=3");
}

Test(tls, node_tls12_300_packets_split_at_odd_points, .timeout = 40)
{
    node_burst_echoed("TLSv1.2", "seed=4");
}

/* ------------------------------------------------------------------ 2. cport's TLS client */

/* A client service speaking TLS, verifying the server with ca for sni;
 * tracking handlers without echo, sessions kept (recs[i].s stays valid). */
typedef struct tls_client {
    cp_tls *tls;
    cpt_track *t;
    cp_service *svc;
} tls_client;

static void client_start(tls_client *c, cp_port *port, uint16_t to, const char *ca, const char *sni,
                         uint32_t hs_ms, uint32_t sessions, const cp_handlers *h)
{
    cp_tls_opts o = { .ca_file = ca, .verify = 1, .sni = sni, .handshake_timeout_ms = hs_ms };
    cr_assert_eq(cp_tls_create(&c->tls, &o), 0);
    c->t = cpt_track_new(8);
    c->t->echo = false;
    c->t->keep_refs = true;
    cp_client_opts co = { .host = CPT_HOST4, .port = to, .sessions = sessions };
    co.session.tls = c->tls;
    cp_handlers hh = h ? *h : tls_handlers();
    c->svc = cpt_xclient(port, &co, &hh, c->t);
}

static void client_stop(tls_client *c)
{
    cpt_xstop(c->svc);
    cpt_track_stopped(c->t);
    cpt_track_xcheck(c->t);
    cpt_track_free(c->t);
    cp_tls_unref(c->tls);
}

/* The client's first session sends one packet. */
static void client_xsend(tls_client *c, uint16_t id, const void *body, size_t len)
{
    cp_sendbuf *b = cp_packet_make(id, body, len);
    cr_assert_not_null(b);
    cr_assert_eq(cp_session_send(c->t->recs[0].s, b), 0);
    cp_sendbuf_unref(b);
}

Test(tls, client_against_a_cport_server, .timeout = 30)
{
    certs();
    tls_env te;
    env_start(&te, NULL, NULL, 8);
    tls_client c;
    client_start(&c, te.e.port, te.e.sport, g_main.cert, "localhost", 0, 1, NULL);
    CPT_AWAIT(atomic_load(&c.t->connected) == 1 && seen_count() == 2, 5000, "the client did not connect");
    /* Both on_connected ran after the handshake: the protocol was known. */
    seen_rec sn = seen_get();
    cr_assert_eq(sn.errors, 0, "cp_session_tls_info in on_connected: %s", cp_strerror(sn.last_rc));
    cr_assert_str_eq(sn.last.version, "TLSv1.3");
    cr_assert(sn.last.cipher[0]);
    static const char body[] = "over tls, both ways";
    client_xsend(&c, 5, body, sizeof body);
    CPT_AWAIT(atomic_load(&c.t->packets) == 1, 5000, "the echo did not come back");
    cr_assert_eq(atomic_load(&c.t->recs[0].bytes), (long long)sizeof body);
    cr_assert_eq(cpt_stats(c.svc).connect_failed, 0);
    client_stop(&c);
    env_stop(&te);
}

static uint16_t free_port(void)
{
    int fd = cpt_xlisten(1);
    uint16_t port = cpt_local_port(fd);
    cpt_close(fd);
    return port;
}

/* openssl s_server on a free port of 127.0.0.1 with the test's certificate
 * and the extra arguments (NULL-terminated); returns once it listens. */
static uint16_t sserver_start(peer *p, const char *extra)
{
    uint16_t port = free_port();
    char accept[32];
    snprintf(accept, sizeof accept, "127.0.0.1:%u", port);
    char *argv[] = { OPENSSL_BIN, "s_server", "-accept",  accept,        "-cert",
                     g_main.cert, "-key",     g_main.key, (char *)extra, NULL };
    peer_start(p, argv);
    peer_xwait(p, OUT, "ACCEPT", 5000);
    return port;
}

static void client_against_s_server(const char *flag, const char *version)
{
    certs();
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(2);
    peer srv;
    uint16_t sp = sserver_start(&srv, flag);
    tls_client c;
    client_start(&c, port, sp, g_main.cert, "localhost", 0, 1, NULL);
    CPT_AWAIT(atomic_load(&c.t->connected) == 1 && seen_count() == 1, 5000, "the client did not connect");
    seen_rec sn = seen_get();
    cr_assert_eq(sn.last_rc, 0, "cp_session_tls_info: %s", cp_strerror(sn.last_rc));
    cr_assert_str_eq(sn.last.version, version);
    cr_assert(sn.last.cipher[0]);
    /* cport to s_server: s_server prints what it reads. */
    static const char up[] = "from cport to s_server";
    client_xsend(&c, 5, up, sizeof up);
    uint8_t pkt[64];
    cpt_put_header(pkt, (uint16_t)(4 + sizeof up), 5);
    memcpy(pkt + 4, up, sizeof up);
    bool ok = false;
    CPT_WAIT(ok, peer_has_at(&srv, OUT, 0, pkt, 4 + sizeof up), 5000);
    cr_assert(ok, "s_server did not receive the packet");
    /* s_server to cport: s_server sends what it reads on stdin. */
    static const char down[] = "s_server to cport";
    cpt_put_header(pkt, (uint16_t)(4 + sizeof down), 6);
    memcpy(pkt + 4, down, sizeof down);
    peer_write(&srv, pkt, 4 + sizeof down);
    CPT_AWAIT(atomic_load(&c.t->packets) == 1, 5000, "the client did not receive s_server's packet");
    cr_assert_eq(atomic_load(&c.t->recs[0].bytes), (long long)sizeof down);
    client_stop(&c);
    peer_stop(&srv);
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

Test(tls, client_against_s_server_tls13, .timeout = 30) { client_against_s_server("-tls1_3", "TLSv1.3"); }

Test(tls, client_against_s_server_tls12, .timeout = 30) { client_against_s_server("-tls1_2", "TLSv1.2"); }

/* A connect whose verification fails: a connect failure (-EPROTO) counted
 * as CP_REASON_TLS, never on_connected. */
static void client_xrefused(cp_port *port, uint16_t to, const char *ca, const char *sni)
{
    tls_client c;
    client_start(&c, port, to, ca, sni, 0, 1, NULL);
    CPT_AWAIT(atomic_load(&c.t->connect_failed) == 1, 5000, "the connect did not fail");
    cr_assert_eq(atomic_load(&c.t->last_connect_err), -EPROTO, "err %s",
                 cp_err_name(atomic_load(&c.t->last_connect_err)));
    cr_assert_eq(atomic_load(&c.t->connected), 0);
    cp_service_stats st = cpt_stats(c.svc);
    cr_assert_eq(st.connect_failed, 1);
    cr_assert_eq(st.by_reason[CP_REASON_TLS], 1);
    cr_assert_eq(st.connected, 0);
    client_stop(&c);
}

Test(tls, client_verify_failure_is_a_connect_failure, .timeout = 30)
{
    certs();
    pem other;
    pem_make(&other, "other", "localhost");
    tls_env te;
    env_start(&te, NULL, NULL, 8);
    client_xrefused(te.e.port, te.e.sport, other.cert, "localhost");      /* not our CA */
    client_xrefused(te.e.port, te.e.sport, g_main.cert, "wrong.example"); /* not its name */
    /* The server saw the client's alert each time: a failed handshake. */
    CPT_AWAIT(by_reason(te.e.svc, CP_REASON_TLS) == 2, 5000, "server: %llu TLS failures",
              (unsigned long long)by_reason(te.e.svc, CP_REASON_TLS));
    cr_assert_eq(atomic_load(&te.e.t->connected), 0);
    cr_assert_eq(seen_count(), 0);

    peer srv;
    uint16_t sp = sserver_start(&srv, "-tls1_3");
    client_xrefused(te.e.port, sp, other.cert, "localhost");
    /* It was told why, rather than seeing the stream end. */
    peer_xwait(&srv, ERR, "alert unknown ca", 5000);
    peer_stop(&srv);
    env_stop(&te);
}

static atomic_int err_calls, err_code;
static _Atomic(void *) err_data;

static void on_connect_error_rec(cp_service *svc, void *data, int err)
{
    (void)svc;
    atomic_store(&err_data, data);
    atomic_store(&err_code, err);
    atomic_fetch_add(&err_calls, 1);
}

/* With on_connect_error the failed connect's data comes back with it. */
Test(tls, client_verify_failure_reaches_on_connect_error_with_its_data, .timeout = 30)
{
    certs();
    tls_env te;
    env_start(&te, NULL, NULL, 8);
    cp_handlers h = tls_handlers();
    h.on_connect_error = on_connect_error_rec;
    tls_client c;
    client_start(&c, te.e.port, te.e.sport, g_main.cert, "wrong.example", 0, 0, &h);
    static int tag;
    cr_assert_eq(cp_client_connect_data(c.svc, &tag), 0);
    CPT_AWAIT(atomic_load(&err_calls) == 1, 5000, "on_connect_error was not called");
    cr_assert_eq(atomic_load(&err_data), &tag);
    cr_assert_eq(atomic_load(&err_code), -EPROTO);
    cr_assert_eq(atomic_load(&c.t->connect_failed), 0, "on_connect_failed too");
    cr_assert_eq(atomic_load(&c.t->connected), 0);
    cr_assert_eq(cpt_stats(c.svc).by_reason[CP_REASON_TLS], 1);
    client_stop(&c);
    cr_assert_eq(atomic_load(&err_calls), 1);
    env_stop(&te);
}

/* A server that accepts and never answers the hello: the client's
 * on_connected never runs, and its handshake deadline fails the connect. */
Test(tls, client_on_connected_only_after_the_handshake, .timeout = 30)
{
    certs();
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(2);
    int lfd = cpt_xlisten(4);
    tls_client c;
    uint64_t t0 = cpt_now_ms();
    client_start(&c, port, cpt_local_port(lfd), g_main.cert, "localhost", 300, 1, NULL);
    int a = cpt_accept(lfd);
    cr_assert_geq(a, 0);
    uint8_t rec[5];
    cpt_xrecv(a, rec, sizeof rec);
    cr_assert_eq(rec[0], 0x16, "the client's first bytes are not a TLS handshake record");
    CPT_AWAIT(atomic_load(&c.t->connect_failed) == 1, 3000, "the connect did not fail");
    uint64_t took = cpt_now_ms() - t0;
    cr_assert_geq(took, 250, "failed after %llu ms, before its deadline", (unsigned long long)took);
    cr_assert_eq(atomic_load(&c.t->last_connect_err), -ETIMEDOUT);
    cr_assert_eq(atomic_load(&c.t->connected), 0);
    cp_service_stats st = cpt_stats(c.svc);
    cr_assert_eq(st.by_reason[CP_REASON_HANDSHAKE_TIMEOUT], 1);
    cr_assert_eq(st.connect_failed, 1);
    cpt_xclosed(a, 2000);
    cpt_close(a);
    cpt_close(lfd);
    client_stop(&c);
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

/* ------------------------------------------------------------------ 3, 4. not TLS */

Test(tls, plaintext_http_and_garbage_closed_while_a_neighbour_is_served, .timeout = 30)
{
    certs();
    tls_env te;
    env_start(&te, NULL, NULL, 8);
    peer nb;
    sclient_start(&nb, te.e.sport, "-brief", "-nocommands", NULL);
    sclient_xup(&nb);
    sclient_xecho(&nb, 1, 100);

    /* A plain cport client. */
    int fd = cpt_xconnect(te.e.sport);
    cpt_xsend_packet(fd, 42, "hello", 5);
    cpt_xclosed(fd, 3000);
    cpt_close(fd);
    CPT_AWAIT(by_reason(te.e.svc, CP_REASON_TLS) == 1, 3000, "plaintext: not counted as a TLS failure");
    sclient_xecho(&nb, 2, 1000);

    /* HTTP on the TLS port. */
    static const char http[] = "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
    fd = cpt_xconnect(te.e.sport);
    cpt_xsend(fd, http, strlen(http));
    cpt_xclosed(fd, 3000);
    cpt_close(fd);
    CPT_AWAIT(by_reason(te.e.svc, CP_REASON_TLS) == 2, 3000, "HTTP: not counted as a TLS failure");
    sclient_xecho(&nb, 3, 4000);

    /* Garbage: more than any record header it may look like announces, so
     * it cannot be taken for a record still arriving. The server may close
     * while it is sent (a reset then). */
    static uint8_t junk[40000];
    cpt_fill(junk, sizeof junk, 0, 99);
    fd = cpt_xconnect(te.e.sport);
    (void)cpt_send_all(fd, junk, sizeof junk);
    cpt_xclosed(fd, 3000);
    cpt_close(fd);
    CPT_AWAIT(by_reason(te.e.svc, CP_REASON_TLS) == 3, 3000, "garbage: not counted as a TLS failure");
    sclient_xecho(&nb, 4, 10);

    cr_assert_eq(atomic_load(&te.e.t->connected), 1, "only the neighbour was ever connected");
    cr_assert_eq(atomic_load(&te.e.t->disconnected), 0);
    cr_assert_eq(by_reason(te.e.svc, CP_REASON_HANDSHAKE_TIMEOUT), 0);
    peer_close_in(&nb);
    cr_assert_eq(peer_xexit(&nb, 5000), 0);
    peer_stop(&nb);
    env_stop(&te);
}

/* A client that says nothing, and one that stops inside its first record
 * header: both closed at the handshake deadline, never connected; a
 * neighbour past its handshake is not held to it. */
Test(tls, silent_clients_closed_at_the_handshake_timeout, .timeout = 30)
{
    certs();
    cp_tls_opts o = { .cert_file = g_main.cert, .key_file = g_main.key, .handshake_timeout_ms = 300 };
    tls_env te;
    env_start(&te, &o, NULL, 8);
    peer nb;
    sclient_start(&nb, te.e.sport, "-brief", "-nocommands", NULL);
    sclient_xup(&nb);
    sclient_xecho(&nb, 1, 100);

    uint64_t t0 = cpt_now_ms();
    int silent = cpt_xconnect(te.e.sport);
    int partial = cpt_xconnect(te.e.sport);
    static const uint8_t start[] = { 0x16, 0x03, 0x01 };
    cpt_xsend(partial, start, sizeof start);
    cpt_xclosed(silent, 3000);
    uint64_t took = cpt_now_ms() - t0;
    cpt_xclosed(partial, 3000);
    cpt_close(silent);
    cpt_close(partial);
    cr_assert_geq(took, 250, "closed after %llu ms, before the deadline", (unsigned long long)took);
    CPT_AWAIT(by_reason(te.e.svc, CP_REASON_HANDSHAKE_TIMEOUT) == 2, 3000, "%llu handshake timeouts counted",
              (unsigned long long)by_reason(te.e.svc, CP_REASON_HANDSHAKE_TIMEOUT));
    cr_assert_eq(atomic_load(&te.e.t->connected), 1, "only the neighbour was ever connected");

    cpt_sleep_ms(400); /* the neighbour outlives the deadline */
    sclient_xecho(&nb, 2, 100);
    cr_assert_eq(atomic_load(&te.e.t->disconnected), 0);
    peer_close_in(&nb);
    cr_assert_eq(peer_xexit(&nb, 5000), 0);
    peer_stop(&nb);
    env_stop(&te);
}

/* Regression (found by fuzz_tls, fixed in bc38d83): a broadcast that found
 * a session in its handshake took a send ticket that the session's owner
 * never applied, so every later send to it waited for good: the session
 * completed its handshake and then never answered. The client here is the
 * test's own OpenSSL over a blocking socket, so it can stay silent while the
 * broadcasts go out and then shake hands. */
Test(tls, a_broadcast_during_the_handshake_does_not_mute_the_session, .timeout = 30)
{
    certs();
    tls_env te;
    env_start(&te, NULL, NULL, 8);
    int fd = cpt_xconnect(te.e.sport);
    CPT_AWAIT(cpt_stats(te.e.svc).sessions == 1, 5000, "the server did not take the connection");
    static const char news[] = "to everyone connected";
    for (int i = 0; i < 3; i++) {
        cp_sendbuf *b = cp_packet_make(9, news, sizeof news);
        cr_assert_not_null(b);
        cr_assert_eq(cp_service_broadcast(te.e.svc, b), 0, "a session in its handshake is not connected");
        cp_sendbuf_unref(b);
    }

    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    cr_assert_not_null(ctx);
    SSL *ssl = SSL_new(ctx);
    cr_assert_not_null(ssl);
    SSL_set_fd(ssl, fd); /* blocking, with cpt_connect's receive timeout */
    cr_assert_eq(SSL_connect(ssl), 1, "the handshake failed");
    CPT_AWAIT(atomic_load(&te.e.t->connected) == 1, 5000, "on_connected did not run");
    static const char body[] = "still heard";
    cp_sendbuf *p = cp_packet_make(4, body, sizeof body);
    cr_assert_not_null(p);
    size_t plen = cp_sendbuf_len(p);
    cr_assert_eq(SSL_write(ssl, cp_sendbuf_data(p), (int)plen), (int)plen);
    /* The echo, and nothing of the broadcasts before it. */
    uint8_t got[64];
    size_t have = 0;
    while (have < plen) {
        int r = SSL_read(ssl, got + have, (int)(sizeof got - have));
        cr_assert_gt(r, 0, "no echo: the session was muted (SSL error %d)", SSL_get_error(ssl, r));
        have += (size_t)r;
    }
    cr_assert_eq(have, plen);
    cr_assert(memcmp(got, cp_sendbuf_data(p), plen) == 0);
    cp_sendbuf_unref(p);
    SSL_shutdown(ssl); /* close_notify: the session ends as the peer's close */
    SSL_free(ssl);
    SSL_CTX_free(ctx);
    ERR_clear_error();
    cpt_close(fd);
    CPT_AWAIT(atomic_load(&te.e.t->disconnected) == 1, 5000, "the session did not end");
    cr_assert_eq(atomic_load(&te.e.t->recs[0].reason), CP_REASON_PEER_CLOSED);
    env_stop(&te);
}

/* Hellos that had to wait for their turn (one handshake started per
 * worker and round) are held to the same deadline, also on a service with
 * an idle timeout, whose clock must not replace the handshake's. */
Test(tls, waiting_hellos_keep_the_handshake_deadline, .timeout = 30)
{
    enum { N = 20 };
    certs();
    cp_tls_opts o = { .cert_file = g_main.cert,
                      .key_file = g_main.key,
                      .handshake_timeout_ms = 300,
                      .handshakes_per_round = 1 };
    cp_server_opts so = { .host = CPT_HOST4 };
    so.session.idle_timeout_ms = 20000;
    tls_env te;
    env_start_so(&te, &o, NULL, 8, &so);
    int fds[N];
    for (int i = 0; i < N; i++)
        fds[i] = cpt_xconnect(te.e.sport);
    cpt_sleep_ms(50); /* all accepted: their first bytes come in the same rounds */
    static const uint8_t start[] = { 0x16, 0x03, 0x01 };
    uint64_t t0 = cpt_now_ms();
    for (int i = 0; i < N; i++)
        cpt_xsend(fds[i], start, sizeof start);
    for (int i = 0; i < N; i++) {
        int rc = cpt_wait_closed(fds[i], 3000);
        cr_assert_eq(rc, 0, "connection %d still open after %llu ms", i,
                     (unsigned long long)(cpt_now_ms() - t0));
        cpt_close(fds[i]);
    }
    CPT_AWAIT(by_reason(te.e.svc, CP_REASON_HANDSHAKE_TIMEOUT) == N, 3000, "%llu handshake timeouts",
              (unsigned long long)by_reason(te.e.svc, CP_REASON_HANDSHAKE_TIMEOUT));
    env_stop(&te);
}

/* ------------------------------------------------------------------ 5. closing */

/* ID_BYE: 50 packets of 4000 bytes, then cp_session_shutdown. */
static int bye_on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    if (id != ID_BYE)
        return cpt_on_packet(s, id, body, len);
    cpt_track *t = cp_session_ctx(s);
    cpt_enter(s);
    for (uint16_t i = 0; i < 50; i++) {
        cp_sendbuf *b = cp_packet_open(i, 4000);
        cpt_fill(cp_packet_body(b), 4000, (uint64_t)i * 4000, 5);
        if (cp_packet_close(b, 4000) != 0 || cp_session_send(s, b) != 0)
            atomic_fetch_add(&t->failures, 1);
        cp_sendbuf_unref(b);
    }
    if (cp_session_shutdown(s, 5000) != 0)
        atomic_fetch_add(&t->failures, 1);
    cpt_leave(s);
    return 0;
}

/* cp_session_shutdown: the queued packets, then close_notify, then FIN;
 * s_client reads everything and sees a clean end (an end without
 * close_notify is an error to it: "unexpected eof while reading"). */
Test(tls, shutdown_sends_close_notify_after_the_queued_data, .timeout = 30)
{
    certs();
    cp_handlers h = tls_handlers();
    h.on_packet = bye_on_packet;
    tls_env te;
    env_start(&te, NULL, &h, 8);
    peer c;
    sclient_start(&c, te.e.sport, "-brief", "-nocommands", NULL);
    sclient_xup(&c);
    uint8_t bye[4];
    cpt_put_header(bye, 4, ID_BYE);
    peer_write(&c, bye, sizeof bye);
    int rc = peer_xexit(&c, 10000);
    if (rc != 0 || peer_has(&c, ERR, "unexpected eof"))
        peer_dump(&c, "s_client");
    cr_assert_eq(rc, 0, "s_client did not end cleanly");
    cr_assert(!peer_has(&c, ERR, "unexpected eof"), "the stream ended without close_notify");
    /* Everything queued before the shutdown arrived, in order. */
    cr_assert_eq(peer_len(&c, OUT), (size_t)50 * 4004, "s_client read %zu bytes", peer_len(&c, OUT));
    uint8_t got[4004], want[4004];
    for (uint16_t i = 0; i < 50; i++) {
        cr_assert(peer_copy(&c, OUT, (size_t)i * 4004, got, sizeof got));
        cpt_put_header(want, 4004, i);
        cpt_fill(want + 4, 4000, (uint64_t)i * 4000, 5);
        cr_assert_eq(memcmp(got, want, sizeof got), 0, "packet %u differs", i);
    }
    CPT_AWAIT(atomic_load(&te.e.t->disconnected) == 1, 5000, "the session did not end");
    cr_assert_eq(atomic_load(&te.e.t->recs[0].reason), CP_REASON_LOCAL);
    cr_assert_eq(atomic_load(&te.e.t->recs[0].err), 0);
    peer_stop(&c);
    env_stop(&te);
}

/* The client's close_notify is the peer's close with no error; a bare TCP
 * close (s_client killed) is a truncated stream: -ECONNABORTED. */
Test(tls, client_close_notify_and_a_bare_tcp_close, .timeout = 30)
{
    certs();
    tls_env te;
    env_start(&te, NULL, NULL, 8);
    peer c;
    sclient_start(&c, te.e.sport, "-brief", "-nocommands", NULL);
    sclient_xup(&c);
    sclient_xecho(&c, 1, 500);
    peer_close_in(&c); /* s_client: close_notify, then close */
    cr_assert_eq(peer_xexit(&c, 5000), 0);
    peer_stop(&c);
    CPT_AWAIT(atomic_load(&te.e.t->disconnected) == 1, 5000, "the session did not end");
    cr_assert_eq(atomic_load(&te.e.t->recs[0].reason), CP_REASON_PEER_CLOSED);
    cr_assert_eq(atomic_load(&te.e.t->recs[0].err), 0);

    sclient_start(&c, te.e.sport, "-brief", "-nocommands", NULL);
    sclient_xup(&c);
    sclient_xecho(&c, 2, 500); /* it has read everything: its close is a FIN, not a reset */
    kill(c.pid, SIGKILL);
    peer_stop(&c);
    CPT_AWAIT(atomic_load(&te.e.t->disconnected) == 2, 5000, "the session did not end");
    cr_assert_eq(atomic_load(&te.e.t->recs[1].reason), CP_REASON_PEER_CLOSED);
    cr_assert_eq(atomic_load(&te.e.t->recs[1].err), -ECONNABORTED, "err %s",
                 cp_err_name(atomic_load(&te.e.t->recs[1].err)));
    env_stop(&te);
}

/* A graceful stop (cp_service_stop_ex) ends a TLS session as
 * cp_session_shutdown does: close_notify after what was queued, so the
 * peer sees a clean end, and the session is counted as STOPPING. */
Test(tls, graceful_stop_sends_close_notify, .timeout = 30)
{
    certs();
    tls_env te;
    env_start(&te, NULL, NULL, 8);
    peer c;
    sclient_start(&c, te.e.sport, "-brief", "-nocommands", NULL);
    sclient_xup(&c);
    sclient_xecho(&c, 1, 1000);
    cp_service_stats final;
    cr_assert_eq(cp_service_stop_ex(te.e.svc, 3000, &final), 0);
    int rc = peer_xexit(&c, 5000);
    if (rc != 0 || peer_has(&c, ERR, "unexpected eof"))
        peer_dump(&c, "s_client");
    cr_assert_eq(rc, 0, "s_client did not end cleanly");
    cr_assert(!peer_has(&c, ERR, "unexpected eof"), "the stream ended without close_notify");
    cr_assert_eq(final.by_reason[CP_REASON_STOPPING], 1);
    cr_assert_eq(atomic_load(&te.e.t->recs[0].reason), CP_REASON_STOPPING);
    cr_assert_eq(atomic_load(&te.e.t->recs[0].err), 0);
    peer_stop(&c);
    cpt_track_stopped(te.e.t);
    cpt_track_xcheck(te.e.t);
    cpt_track_free(te.e.t);
    cpt_xport_destroy(te.e.port);
    cp_tls_unref(te.tls);
    cpt_leak_end(&te.e.leak);
}

/* ------------------------------------------------------------------ 6, 7. KeyUpdate, renegotiation */

static bool file_has(const char *path, const char *text, int *count)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return false;
    char line[512];
    int n = 0;
    while (fgets(line, sizeof line, f))
        n += strstr(line, text) != NULL;
    fclose(f);
    if (count)
        *count = n;
    return n > 0;
}

/* s_client's "k" updates its own keys, "K" asks the server to update its
 * keys too; the echo goes on through both, and the server's KeyUpdate is
 * in s_client's message trace. */
Test(tls, key_update_both_ways_echo_goes_on, .timeout = 30)
{
    certs();
    tls_env te;
    env_start(&te, NULL, NULL, 8);
    char msgs[128];
    tmp_path(msgs, sizeof msgs, "keyupdate.msg");
    peer c;
    /* Commands on: a packet's first byte must not be a command letter, so
     * the sizes below avoid 'k', 'K', 'Q', 'R' as their low byte. */
    sclient_start(&c, te.e.sport, "-brief", "-tls1_3", "-msg", "-msgfile", msgs, NULL);
    sclient_xup(&c);
    sclient_xecho(&c, 1, 300);
    peer_write(&c, "k\n", 2);
    CPT_AWAIT(peer_count(&c, ERR, "KEYUPDATE") == 1, 5000, "s_client did not update its keys");
    sclient_xecho(&c, 2, 1000);
    peer_write(&c, "K\n", 2);
    CPT_AWAIT(peer_count(&c, ERR, "KEYUPDATE") == 2, 5000, "s_client did not update its keys");
    sclient_xecho(&c, 3, 4000);
    sclient_xecho(&c, 4, 0);
    cr_assert_eq(atomic_load(&te.e.t->disconnected), 0);
    peer_close_in(&c);
    cr_assert_eq(peer_xexit(&c, 5000), 0); /* its trace is complete now */
    peer_stop(&c);
    int sent = 0, got = 0;
    file_has(msgs, ">>> TLS 1.3, Handshake [length 0005], KeyUpdate", &sent);
    file_has(msgs, "<<< TLS 1.3, Handshake [length 0005], KeyUpdate", &got);
    cr_assert_eq(sent, 2, "s_client sent %d KeyUpdates", sent);
    cr_assert_eq(got, 1, "the server answered the request with %d KeyUpdates", got);
    CPT_AWAIT(atomic_load(&te.e.t->disconnected) == 1, 5000, "the session did not end");
    cr_assert_eq(atomic_load(&te.e.t->recs[0].reason), CP_REASON_PEER_CLOSED);
    env_stop(&te);
}

/* s_client -tls1_2 asks to renegotiate ("R"): the server refuses. The
 * session may end or go on, but no second handshake happens; the
 * neighbour and new sessions are served. */
Test(tls, renegotiation_refused_neighbours_served, .timeout = 30)
{
    certs();
    tls_env te;
    env_start(&te, NULL, NULL, 8);
    char msgs[128];
    tmp_path(msgs, sizeof msgs, "reneg.msg");
    peer c, nb;
    sclient_start(&c, te.e.sport, "-brief", "-tls1_2", "-msg", "-msgfile", msgs, NULL);
    sclient_xup(&c);
    sclient_xecho(&c, 1, 300);
    sclient_start(&nb, te.e.sport, "-brief", "-nocommands", NULL);
    sclient_xup(&nb);
    sclient_xecho(&nb, 1, 100);

    peer_write(&c, "R\n", 2);
    peer_xwait(&c, ERR, "RENEGOTIATING", 5000);
    /* s_client gives up at the server's refusal (no_renegotiation) and
     * ends the session; should it go on instead, the echo must work. */
    bool ended = false;
    CPT_WAIT(ended, peer_exited(&c) || atomic_load(&te.e.t->recs[0].disconnected), 3000);
    if (!ended)
        sclient_xecho(&c, 2, 300);
    sclient_xecho(&nb, 2, 1000);
    peer_close_in(&c);
    peer_xexit(&c, 5000);
    peer_stop(&c);
    int hellos = 0;
    file_has(msgs, "ServerHello\n", &hellos);
    cr_assert_eq(hellos, 1, "the server answered the renegotiation with a ServerHello");
    cr_log_info("renegotiation: the session %s", ended ? "ended" : "went on");

    peer again;
    sclient_start(&again, te.e.sport, "-brief", "-nocommands", NULL);
    sclient_xup(&again);
    sclient_xecho(&again, 1, 100);
    sclient_xecho(&nb, 3, 100);
    peer_close_in(&again);
    peer_close_in(&nb);
    cr_assert_eq(peer_xexit(&again, 5000), 0);
    cr_assert_eq(peer_xexit(&nb, 5000), 0);
    peer_stop(&again);
    peer_stop(&nb);
    env_stop(&te);
}

/* s_server asks cport's client to renegotiate (TLS 1.2, command "r"): the
 * client refuses, which s_server takes as fatal; the client's session ends
 * as a TLS failure, after it was connected. */
Test(tls, client_refuses_a_servers_renegotiation, .timeout = 30)
{
    certs();
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(2);
    peer srv;
    uint16_t sp = sserver_start(&srv, "-tls1_2");
    tls_client c;
    client_start(&c, port, sp, g_main.cert, "localhost", 0, 1, NULL);
    CPT_AWAIT(atomic_load(&c.t->connected) == 1, 5000, "the client did not connect");
    peer_xwait(&srv, OUT, "CIPHER is", 5000); /* s_server's handshake is done too */
    peer_write(&srv, "r\n", 2);
    CPT_AWAIT(atomic_load(&c.t->disconnected) == 1, 5000, "the client's session did not end");
    cr_assert_eq(atomic_load(&c.t->recs[0].reason), CP_REASON_TLS);
    cr_assert_eq(atomic_load(&c.t->recs[0].err), -EPROTO);
    /* s_server sends its fatal alert before it prints the error, so the
     * client's session can end before the line reaches the test. */
    peer_xwait(&srv, ERR, "no renegotiation", 5000);
    client_stop(&c);
    peer_stop(&srv);
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

/* ------------------------------------------------------------------ 8. resumption */

/* A second server on e's port: its own context made with o, its own
 * tracking. */
typedef struct side_server {
    cp_tls *tls;
    cpt_track *t;
    cp_service *svc;
    uint16_t port;
} side_server;

static void side_start(side_server *ss, cp_port *port, const cp_tls_opts *o)
{
    cr_assert_eq(cp_tls_create(&ss->tls, o), 0);
    ss->t = cpt_track_new(8);
    ss->t->echo = true;
    cp_server_opts so = { .host = CPT_HOST4 };
    so.session.tls = ss->tls;
    cp_handlers h = tls_handlers();
    ss->svc = cpt_xserver(port, &so, &h, ss->t);
    ss->port = cp_service_listen_port(ss->svc);
}

static void side_stop(side_server *ss)
{
    cpt_xstop(ss->svc);
    cpt_track_stopped(ss->t);
    cpt_track_xcheck(ss->t);
    cpt_track_free(ss->t);
    cp_tls_unref(ss->tls);
}

/* s_client -sess_out to port: returns once the session (its ticket) is in
 * the file. */
static void session_save(uint16_t port, const char *flag, const char *file)
{
    peer c;
    sclient_start(&c, port, flag, "-sess_out", file, NULL);
    peer_xwait(&c, OUT, "New, ", 5000);
    CPT_AWAIT(file_has(file, "-----END SSL SESSION PARAMETERS-----", NULL), 5000, "no session was saved");
    peer_close_in(&c);
    cr_assert_eq(peer_xexit(&c, 5000), 0);
    peer_stop(&c);
}

/* s_client -sess_in to port: whether it resumed ("Reused" rather than
 * "New"). */
static bool session_resumed(uint16_t port, const char *flag, const char *file)
{
    peer c;
    sclient_start(&c, port, flag, "-sess_in", file, NULL);
    bool ok = false;
    CPT_WAIT(ok, peer_has(&c, OUT, "Reused, ") || peer_has(&c, OUT, "New, "), 5000);
    if (!ok)
        peer_dump(&c, "s_client");
    cr_assert(ok, "s_client did not connect");
    bool reused = peer_has(&c, OUT, "Reused, ");
    peer_close_in(&c);
    cr_assert_eq(peer_xexit(&c, 5000), 0);
    peer_stop(&c);
    return reused;
}

/* Two servers given the same ticket key: a session from one resumes on the
 * other, and the second server says so. */
static void resumed_across_servers(const char *flag, const char *version)
{
    certs();
    uint8_t key[CP_TLS_TICKET_KEY_LEN];
    cpt_fill(key, sizeof key, 0, 42);
    cp_tls_opts o = { .cert_file = g_main.cert, .key_file = g_main.key, .ticket_key = key };
    tls_env a;
    env_start(&a, &o, NULL, 8);
    side_server b;
    side_start(&b, a.e.port, &o);
    char sess[128];
    tmp_path(sess, sizeof sess, "session.pem");
    session_save(a.e.sport, flag, sess);
    CPT_AWAIT(seen_count() == 1, 5000, "server a did not connect");
    cr_assert_eq(seen_get().last.resumed, 0);
    cr_assert(session_resumed(b.port, flag, sess), "the session did not resume on the other server");
    CPT_AWAIT(seen_count() == 2, 5000, "server b did not connect");
    seen_rec sn = seen_get();
    cr_assert_eq(sn.last_svc, b.svc);
    cr_assert_eq(sn.last.resumed, 1, "cp_session_tls_info does not say resumed");
    cr_assert_str_eq(sn.last.version, version);
    side_stop(&b);
    env_stop(&a);
}

Test(tls, tls13_ticket_resumes_on_a_server_sharing_the_key, .timeout = 30)
{
    resumed_across_servers("-tls1_3", "TLSv1.3");
}

Test(tls, tls12_ticket_resumes_on_a_server_sharing_the_key, .timeout = 30)
{
    resumed_across_servers("-tls1_2", "TLSv1.2");
}

/* no_tickets: no ticket is issued, and one from a server with the same key
 * is not accepted. */
static void no_tickets_no_resumption(const char *flag)
{
    certs();
    uint8_t key[CP_TLS_TICKET_KEY_LEN];
    cpt_fill(key, sizeof key, 0, 43);
    cp_tls_opts o = { .cert_file = g_main.cert, .key_file = g_main.key, .ticket_key = key };
    tls_env a;
    env_start(&a, &o, NULL, 8);
    o.no_tickets = 1;
    side_server c;
    side_start(&c, a.e.port, &o);

    /* No ticket: s_client has nothing to save by the time data flows. */
    char none[128];
    tmp_path(none, sizeof none, "none.pem");
    peer p;
    sclient_start(&p, c.port, flag, "-sess_out", none, "-nocommands", NULL);
    peer_xwait(&p, OUT, "New, ", 5000);
    uint8_t pkt[8];
    cpt_put_header(pkt, sizeof pkt, 3);
    memcpy(pkt + 4, "ping", 4);
    peer_write(&p, pkt, sizeof pkt);
    bool echoed = false;
    CPT_WAIT(echoed, peer_has_at(&p, OUT, 0, pkt, sizeof pkt), 5000);
    if (!echoed)
        peer_dump(&p, "s_client");
    cr_assert(echoed, "no echo");
    cr_assert(!peer_has(&p, OUT, "New Session Ticket") && !peer_has(&p, OUT, "TLS session ticket:"),
              "the no_tickets server issued a ticket");
    peer_close_in(&p);
    cr_assert_eq(peer_xexit(&p, 5000), 0);
    peer_stop(&p);
    cr_assert(!file_has(none, "-----END SSL SESSION PARAMETERS-----", NULL), "s_client saved a session");

    /* A ticket of the same key, from the server that issues them. */
    char sess[128];
    tmp_path(sess, sizeof sess, "session.pem");
    session_save(a.e.sport, flag, sess);
    cr_assert(!session_resumed(c.port, flag, sess), "the no_tickets server resumed a session");
    CPT_AWAIT(seen_count() == 3, 5000, "the sessions did not connect");
    seen_rec sn = seen_get();
    cr_assert_eq(sn.last_svc, c.svc);
    cr_assert_eq(sn.resumed, 0);
    side_stop(&c);
    env_stop(&a);
}

Test(tls, tls13_no_tickets_no_resumption, .timeout = 30) { no_tickets_no_resumption("-tls1_3"); }

Test(tls, tls12_no_tickets_no_resumption, .timeout = 30) { no_tickets_no_resumption("-tls1_2"); }

/* ------------------------------------------------------------------ 9, 10. under load */

/* "DONE <echoes> <errors>" of a node peer in load mode, after it exited. */
static void node_xdone(peer *p, long *echoes)
{
    long errors = -1;
    *echoes = -1;
    pthread_mutex_lock(&p->lock);
    const char *d = p->buf[OUT] ? strstr(p->buf[OUT], "DONE ") : NULL;
    if (d)
        (void)sscanf(d, "DONE %ld %ld", echoes, &errors);
    pthread_mutex_unlock(&p->lock);
    if (errors != 0)
        peer_dump(p, "node");
    cr_assert_eq(errors, 0, "node's load: %ld errors (or no DONE)", errors);
}

/* Sessions echoing without a pause while the certificate is reloaded over
 * and over: new handshakes get the certificate of the last reload, the
 * sessions of before go on, and no echo is lost or changed. */
Test(tls, reload_under_load, .timeout = 60)
{
    certs();
    pem next;
    pem_make(&next, "next", "reloaded");
    tls_env te;
    env_start(&te, NULL, NULL, 16);
    peer load;
    node_start(&load, "load", te.e.sport, NULL, "conns=4", NULL);
    CPT_AWAIT(peer_count(&load, OUT, " localhost\n") == 4, 10000, "node's sessions did not come up");
    CPT_AWAIT(node_fewest(&load) >= 20, 10000, "node's sessions do not echo");

    for (int i = 0; i <= 10; i++) {
        const pem *to = i % 2 == 0 ? &next : &g_main;
        cr_assert_eq(cp_tls_reload(te.tls, to->cert, to->key), 0);
        cpt_sleep_ms(20);
    }
    long before = node_fewest(&load);
    peer c;
    sclient_start_ca(&c, te.e.sport, next.cert, "-brief", "-nocommands", NULL);
    sclient_xup(&c);
    cr_assert(peer_has(&c, ERR, "Peer certificate: CN = reloaded"),
              "a new handshake got the old certificate");
    sclient_xecho(&c, 1, 100);

    /* A reload that fails keeps the certificate in use. */
    cr_assert_eq(cp_tls_reload(te.tls, "/nonexistent/cert.pem", next.key), -EIO);
    cr_assert_eq(cp_tls_reload(te.tls, g_main.cert, next.key), -EIO); /* not its key */
    peer c2;
    sclient_start_ca(&c2, te.e.sport, next.cert, "-brief", "-nocommands", NULL);
    sclient_xup(&c2);
    cr_assert(peer_has(&c2, ERR, "Peer certificate: CN = reloaded"),
              "a failed reload changed the certificate");

    CPT_AWAIT(node_fewest(&load) >= before + 20, 10000, "the sessions of before stopped echoing");
    cr_assert_eq(peer_count(&load, OUT, "UP "), 4, "node reconnected");
    peer_close_in(&load);
    cr_assert_eq(peer_xexit(&load, 10000), 0);
    long echoes;
    node_xdone(&load, &echoes);
    peer_close_in(&c);
    peer_close_in(&c2);
    cr_assert_eq(peer_xexit(&c, 5000), 0);
    cr_assert_eq(peer_xexit(&c2, 5000), 0);
    peer_stop(&c);
    peer_stop(&c2);
    peer_stop(&load);
    /* Every echo node counted is a packet the server read, and no more. */
    CPT_AWAIT(atomic_load(&te.e.t->disconnected) == 6, 5000, "sessions did not end");
    cr_assert_eq(cpt_stats(te.e.svc).packets_in, (uint64_t)echoes + 1);
    cr_assert_eq(atomic_load(&te.e.t->reasons[CP_REASON_PEER_CLOSED]), 6);
    env_stop(&te);
}

/* 300 new handshakes, 100 at a time, at most 2 started per worker and round,
 * while 20 sessions echo: every handshake completes and the established
 * sessions keep echoing through it. */
Test(tls, reconnect_storm_while_sessions_echo, .timeout = 120)
{
    certs();
    cp_tls_opts o = { .cert_file = g_main.cert, .key_file = g_main.key, .handshakes_per_round = 2 };
    tls_env te;
    env_start(&te, &o, NULL, 400);
    peer load, storm;
    node_start(&load, "load", te.e.sport, NULL, "conns=20", NULL);
    CPT_AWAIT(peer_count(&load, OUT, "UP ") == 20, 20000, "node's sessions did not come up");
    CPT_AWAIT(node_fewest(&load) >= 5, 10000, "node's sessions do not echo");
    long before = node_fewest(&load);
    node_start(&storm, "storm", te.e.sport, NULL, "handshakes=300", "parallel=100", NULL);
    int rc = peer_xexit(&storm, 90000);
    long during = node_fewest(&load);
    if (rc != 0)
        peer_dump(&storm, "node storm");
    cr_assert_eq(rc, 0, "handshakes of the storm failed");
    cr_assert(peer_has(&storm, OUT, "STORM 300 0"));
    cr_assert_gt(during, before, "an established session echoed nothing during the storm");
    CPT_AWAIT(node_fewest(&load) >= during + 5, 10000, "the established sessions stopped echoing");
    peer_close_in(&load);
    cr_assert_eq(peer_xexit(&load, 10000), 0);
    long echoes;
    node_xdone(&load, &echoes);
    peer_stop(&storm);
    peer_stop(&load);
    CPT_AWAIT(atomic_load(&te.e.t->disconnected) == 320, 5000, "sessions did not end");
    cp_service_stats st = cpt_stats(te.e.svc);
    cr_assert_eq(st.connected, 320);
    cr_assert_eq(st.by_reason[CP_REASON_TLS], 0);
    cr_assert_eq(st.by_reason[CP_REASON_HANDSHAKE_TIMEOUT], 0);
    cr_assert_eq(st.by_reason[CP_REASON_PEER_CLOSED], 320);
    env_stop(&te);
}

/* The server stops in the middle of a storm, one handshake started per
 * worker and round: sessions in their handshake and hellos waiting for
 * their turn are all closed, and nothing leaks. */
Test(tls, stop_in_the_middle_of_a_storm, .timeout = 60)
{
    certs();
    cp_tls_opts o = { .cert_file = g_main.cert, .key_file = g_main.key, .handshakes_per_round = 1 };
    tls_env te;
    env_start(&te, &o, NULL, 400);
    peer storm;
    node_start(&storm, "storm", te.e.sport, NULL, "handshakes=1000", "parallel=100", NULL);
    CPT_AWAIT(cpt_stats(te.e.svc).connected >= 50, 30000, "the storm did not begin");
    cpt_xstop(te.e.svc);
    cpt_track_stopped(te.e.t);
    cpt_track_xcheck(te.e.t);
    cpt_track_free(te.e.t);
    cpt_xport_destroy(te.e.port);
    peer_stop(&storm);
    cp_tls_unref(te.tls);
    cpt_leak_end(&te.e.leak);
}

/* verify on a server: a client certificate is required and checked. A
 * client without one, or with one the CA did not sign, fails its
 * handshake (never connected); one with the right certificate is served,
 * s_client's and cport's own client alike. */
Test(tls, server_verify_requires_a_client_certificate, .timeout = 30)
{
    certs();
    pem other;
    pem_make(&other, "other", "localhost");
    cp_tls_opts o = { .cert_file = g_main.cert, .key_file = g_main.key, .ca_file = g_main.cert, .verify = 1 };
    tls_env te;
    env_start(&te, &o, NULL, 8);
    peer c;
    sclient_start(&c, te.e.sport, "-brief", "-nocommands", "-tls1_2", NULL);
    cr_assert_neq(peer_xexit(&c, 5000), 0, "s_client connected without a certificate");
    peer_stop(&c);
    sclient_start(&c, te.e.sport, "-brief", "-nocommands", "-tls1_2", "-cert", other.cert, "-key", other.key,
                  NULL);
    cr_assert_neq(peer_xexit(&c, 5000), 0, "s_client connected with a certificate of another CA");
    peer_stop(&c);
    CPT_AWAIT(by_reason(te.e.svc, CP_REASON_TLS) == 2, 5000, "%llu TLS failures",
              (unsigned long long)by_reason(te.e.svc, CP_REASON_TLS));
    cr_assert_eq(atomic_load(&te.e.t->connected), 0);

    sclient_start(&c, te.e.sport, "-brief", "-nocommands", "-cert", g_main.cert, "-key", g_main.key, NULL);
    sclient_xup(&c);
    sclient_xecho(&c, 1, 100);
    peer_close_in(&c);
    cr_assert_eq(peer_xexit(&c, 5000), 0);
    peer_stop(&c);

    cp_tls_opts co = { .cert_file = g_main.cert,
                       .key_file = g_main.key,
                       .ca_file = g_main.cert,
                       .verify = 1,
                       .sni = "localhost" };
    tls_client cl;
    cr_assert_eq(cp_tls_create(&cl.tls, &co), 0);
    cl.t = cpt_track_new(8);
    cl.t->keep_refs = true;
    cp_client_opts cop = { .host = CPT_HOST4, .port = te.e.sport, .sessions = 1 };
    cop.session.tls = cl.tls;
    cp_handlers h = tls_handlers();
    cl.svc = cpt_xclient(te.e.port, &cop, &h, cl.t);
    CPT_AWAIT(atomic_load(&cl.t->connected) == 1, 5000,
              "cport's client with its certificate did not connect");
    static const char body[] = "mutual";
    client_xsend(&cl, 2, body, sizeof body);
    CPT_AWAIT(atomic_load(&cl.t->packets) == 1, 5000, "no echo");
    client_stop(&cl);
    env_stop(&te);
}

/* ------------------------------------------------------------------ 11. arguments */

Test(tls, bad_arguments, .timeout = 30)
{
    certs();
    pem other;
    pem_make(&other, "other", "localhost");
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_tls *t = (cp_tls *)&m; /* set to NULL by a failing create */
    cp_tls_opts missing = { .cert_file = "/nonexistent/cert.pem", .key_file = "/nonexistent/key.pem" };
    cr_assert_eq(cp_tls_create(&t, &missing), -EIO);
    cr_assert_null(t);
    cp_tls_opts cert_only = { .cert_file = g_main.cert };
    cr_assert_eq(cp_tls_create(&t, &cert_only), -EINVAL);
    cp_tls_opts key_only = { .key_file = g_main.key };
    cr_assert_eq(cp_tls_create(&t, &key_only), -EINVAL);
    cp_tls_opts mismatch = { .cert_file = g_main.cert, .key_file = other.key };
    cr_assert_eq(cp_tls_create(&t, &mismatch), -EIO);
    cp_tls_opts no_ca = { .ca_file = "/nonexistent/ca.pem", .verify = 1 };
    cr_assert_eq(cp_tls_create(&t, &no_ca), -EIO);
    static const int bogus[] = { 1, 0x0301, 0x0302, 0x0305, -1 };
    for (size_t i = 0; i < sizeof bogus / sizeof bogus[0]; i++) {
        cp_tls_opts o = { .cert_file = g_main.cert, .key_file = g_main.key, .min_version = bogus[i] };
        cr_assert_eq(cp_tls_create(&t, &o), -EINVAL, "min_version %#x", bogus[i]);
    }
    cp_tls_opts empty = { .cert_file = "", .key_file = "" };
    cr_assert_eq(cp_tls_create(&t, &empty), -EINVAL);
    cp_tls_opts empty_sni = { .sni = "" };
    cr_assert_eq(cp_tls_create(&t, &empty_sni), -EINVAL);
    cp_tls_opts good = { .cert_file = g_main.cert, .key_file = g_main.key };
    cr_assert_eq(cp_tls_create(NULL, &good), -EINVAL);
    cr_assert_eq(cp_tls_create(&t, NULL), -EINVAL);

    cr_assert_eq(cp_tls_create(&t, &good), 0);
    cr_assert_eq(cp_tls_reload(NULL, g_main.cert, g_main.key), -EINVAL);
    cr_assert_eq(cp_tls_reload(t, NULL, g_main.key), -EINVAL);
    cr_assert_eq(cp_tls_reload(t, g_main.cert, ""), -EINVAL);
    cr_assert_eq(cp_tls_reload(t, "/nonexistent/cert.pem", g_main.key), -EIO);
    cr_assert_eq(cp_tls_reload(t, g_main.cert, other.key), -EIO);
    cr_assert_eq(cp_tls_reload(t, other.cert, other.key), 0);
    cp_tls_ref(t);
    cp_tls_unref(t);
    cp_tls_unref(t);
    cp_tls_unref(NULL);
    cp_tls_info info;
    cr_assert_eq(cp_session_tls_info(NULL, &info), -EINVAL);
    cpt_leak_end(&m);
}

static atomic_int plain_info_rc = 1, plain_null_rc = 1;

static void on_connected_plain(cp_session *s)
{
    cpt_on_connected(s);
    cp_tls_info info;
    atomic_store(&plain_info_rc, cp_session_tls_info(s, &info));
    atomic_store(&plain_null_rc, cp_session_tls_info(s, NULL));
}

Test(tls, tls_info_of_a_plain_session_is_einval, .timeout = 30)
{
    cp_handlers h = cpt_track_handlers();
    h.on_connected = on_connected_plain;
    cpt_env e;
    cpt_env_start(&e, 2, NULL, &h, 4, 0);
    int fd = cpt_xconnect(e.sport);
    cpt_xsend_packet(fd, 1, "plain", 5);
    cpt_xrecv_packet_eq(fd, 1, "plain", 5);
    cr_assert_eq(atomic_load(&plain_info_rc), -EINVAL);
    cr_assert_eq(atomic_load(&plain_null_rc), -EINVAL);
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* A server at TLS 1.3 at least refuses a TLS 1.2 client (a failed
 * handshake, never connected) and serves a TLS 1.3 one. */
Test(tls, min_version_tls13_refuses_a_tls12_client, .timeout = 30)
{
    certs();
    cp_tls_opts o = { .cert_file = g_main.cert, .key_file = g_main.key, .min_version = CP_TLS_1_3 };
    tls_env te;
    env_start(&te, &o, NULL, 8);
    peer c;
    sclient_start(&c, te.e.sport, "-brief", "-nocommands", "-tls1_2", NULL);
    cr_assert_neq(peer_xexit(&c, 5000), 0, "s_client connected with TLS 1.2");
    cr_assert(peer_has(&c, ERR, "alert protocol version"), "s_client was not told why");
    peer_stop(&c);
    CPT_AWAIT(by_reason(te.e.svc, CP_REASON_TLS) == 1, 5000, "the failed handshake was not counted");
    cr_assert_eq(atomic_load(&te.e.t->connected), 0);
    sclient_start(&c, te.e.sport, "-brief", "-nocommands", "-tls1_3", NULL);
    sclient_xup(&c);
    sclient_xecho(&c, 1, 100);
    peer_close_in(&c);
    cr_assert_eq(peer_xexit(&c, 5000), 0);
    peer_stop(&c);
    env_stop(&te);
}
