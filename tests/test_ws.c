/* SPDX-License-Identifier: MIT */
/*
 * WebSocket (RFC 6455) sessions, from outside, against real clients: the npm
 * ws package (tests/ws_peer.js: a strict, independent client) and a probe of
 * RFC 6455's edge cases over raw TCP (tests/ws_probe.js), whose outcomes
 * must be those of the reference ws server (tests/ws_probe.expected) except
 * where cport differs by design (the lines marked CPORT there). The server
 * is the tracking packet-echo service of helpers.h with WebSocket on, over
 * TLS too. Run once per backend. What needs no outside peer (cport's own
 * client, frames written by hand, the HTTP answers and refusals, hard
 * closes, a backed-up queue) is in test_ws_local.c, which runs under Wine
 * too.
 */
#include "helpers.h"
#include "peers.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <openssl/evp.h>

#ifndef CPT_WS_DIR
#  error "CPT_WS_DIR: the directory of ws_peer.js and ws_probe.js (tests/CMakeLists.txt)"
#endif

static pem g_cert;

typedef struct ws_env {
    cpt_env e;
    cp_ws *ws;
    cp_tls *tls; /* NULL: ws:// */
} ws_env;

static void env_start(ws_env *we, const cp_ws_opts *wo, bool tls)
{
    cp_ws_opts def = { 0 };
    cr_assert_eq(cp_ws_create(&we->ws, wo ? wo : &def), 0);
    we->tls = NULL;
    if (tls) {
        pem_make(&g_cert, "ws", "localhost");
        cp_tls_opts to = { .cert_file = g_cert.cert, .key_file = g_cert.key };
        cr_assert_eq(cp_tls_create(&we->tls, &to), 0);
    }
    cp_server_opts o = { .host = CPT_HOST4 };
    o.session.ws = we->ws;
    o.session.tls = we->tls;
    cpt_env_start(&we->e, 2, &o, NULL, 128, 0); /* the probe opens 87 sessions */
}

static void env_stop(ws_env *we)
{
    cpt_env_stop(&we->e);
    cp_ws_unref(we->ws);
    cp_tls_unref(we->tls);
}

static void url_of(const ws_env *we, char *url, size_t n)
{
    snprintf(url, n, "%s://127.0.0.1:%u/", we->tls ? "wss" : "ws", we->e.sport);
}

/* Runs node with script and its arguments (NULL-terminated) to its end:
 * its exit code; its output is in p. */
static int node_run(peer *p, const char *script, ...)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", CPT_WS_DIR, script);
    char *argv[16] = { NODE_BIN, path };
    int n = 2;
    va_list ap;
    va_start(ap, script);
    for (char *a; (a = va_arg(ap, char *)) != NULL && n < 15;)
        argv[n++] = a;
    va_end(ap);
    argv[n] = NULL;
    peer_start(p, argv);
    peer_close_in(p);
    return peer_xexit(p, 60000);
}

/* ws_peer.js in mode against we: it must succeed and print want. */
static void ws_peer_xrun(ws_env *we, const char *mode, const char *want)
{
    char url[64], ca[160];
    url_of(we, url, sizeof url);
    snprintf(ca, sizeof ca, "ca=%s", g_cert.cert);
    peer p;
    int rc = node_run(&p, "ws_peer.js", (char *)mode, url, we->tls ? ca : NULL, NULL);
    if (rc != 0 || !peer_has(&p, OUT, want))
        peer_dump(&p, mode);
    cr_assert_eq(rc, 0, "ws_peer.js %s failed", mode);
    cr_assert(peer_has(&p, OUT, want), "ws_peer.js %s did not print \"%s\"", mode, want);
    peer_stop(&p);
}

static void peer_modes(bool tls)
{
    ws_env we;
    env_start(&we, NULL, tls);
    ws_peer_xrun(&we, "burst", "OK 602122 408");
    ws_peer_xrun(&we, "ping", "OK");
    ws_peer_xrun(&we, "text", "CLOSED 1003");
    ws_peer_xrun(&we, "big", "CLOSED 1009");
    ws_peer_xrun(&we, "close", "CLOSED 1000");
    cr_assert_geq(cpt_stats(we.e.svc).by_reason[CP_REASON_WEBSOCKET], 2,
                  "text and big end as WebSocket errors");
    env_stop(&we);
}

/* 300 packets of 0-4000 bytes cut into messages at odd points come back
 * byte-identical; ping gets pong; text closes with 1003, 65 KB with 1009;
 * the close handshake echoes 1000. */
Test(ws, npm_ws_client_echo_ping_text_big_close, .timeout = 120) { peer_modes(false); }

Test(ws, npm_ws_client_over_tls, .timeout = 120) { peer_modes(true); }

/* Every case of the probe as the reference server answers it, or as
 * ws_probe.expected says cport answers by design. */
Test(ws, rfc6455_probe_matches_the_reference, .timeout = 300)
{
    ws_env we;
    env_start(&we, NULL, false);
    char port[16], expect[512];
    snprintf(port, sizeof port, "%u", we.e.sport);
    snprintf(expect, sizeof expect, "expect=%s/ws_probe.expected", CPT_WS_DIR);
    peer p;
    int rc = node_run(&p, "ws_probe.js", port, expect, "target=cport", NULL);
    if (rc != 0)
        peer_dump(&p, "ws_probe");
    cr_assert_eq(rc, 0, "the probe found differences (DIFF lines above)");
    cr_assert(peer_has(&p, OUT, ", 0 differ"));
    peer_stop(&p);
    env_stop(&we);
}

/* A cport client service speaking WebSocket over TLS (wss): connected only
 * after the 101, its packets masked, the server's echo read back. Over
 * plain TCP, and refused upgrades: test_ws_local.c. */
Test(ws, cport_client_over_tls, .timeout = 60)
{
    ws_env we;
    env_start(&we, NULL, true);
    cp_ws *cws;
    cp_ws_opts cwo = { .path = "/play" };
    cr_assert_eq(cp_ws_create(&cws, &cwo), 0);
    cp_tls *ctls;
    cp_tls_opts to = { .ca_file = g_cert.cert, .verify = 1, .sni = "localhost" };
    cr_assert_eq(cp_tls_create(&ctls, &to), 0);
    cpt_track *t = cpt_track_new(4);
    t->echo = false;
    t->keep_refs = true;
    cp_client_opts co = { .host = CPT_HOST4, .port = we.e.sport, .sessions = 1 };
    co.session.ws = cws;
    co.session.tls = ctls;
    cp_handlers h = cpt_track_handlers();
    cp_service *svc = cpt_xclient(we.e.port, &co, &h, t);
    CPT_AWAIT(atomic_load(&t->connected) == 1, 5000, "the WebSocket client did not connect");
    static const char body[] = "masked on the way in, framed on the way out";
    for (int i = 0; i < 3; i++) {
        cp_sendbuf *b = cp_packet_make((uint16_t)(7 + i), body, sizeof body);
        cr_assert_eq(cp_session_send(t->recs[0].s, b), 0);
        cp_sendbuf_unref(b);
    }
    CPT_AWAIT(atomic_load(&t->packets) == 3, 5000, "the echoes did not come back (%lld)",
              (long long)atomic_load(&t->packets));
    cr_assert_eq(atomic_load(&t->recs[0].bytes), (long long)(3 * sizeof body));
    cr_assert_eq(atomic_load(&we.e.t->packets), 3, "the server read the client's masked packets");
    cpt_xstop(svc);
    cpt_track_stopped(t);
    cpt_track_xcheck(t);
    cpt_track_free(t);
    cp_ws_unref(cws);
    cp_tls_unref(ctls);
    env_stop(&we);
}

/* ------------------------------------------------------------------ a cport client's 101 */

/* The Sec-WebSocket-Accept that key asks for. */
static void accept_of(const char *key, char out[29])
{
    static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    cr_assert(c && EVP_DigestInit_ex(c, EVP_sha1(), NULL) && EVP_DigestUpdate(c, key, strlen(key)) &&
              EVP_DigestUpdate(c, guid, sizeof guid - 1) && EVP_DigestFinal_ex(c, md, &mdlen));
    EVP_MD_CTX_free(c);
    EVP_EncodeBlock((unsigned char *)out, md, (int)mdlen);
}

/* A 101 must say Connection: Upgrade (RFC 6455 4.1): without it a client's
 * connect fails, and never reports connected; with it, it connects.
 * fuzz_ws_upgrade found the client connected on a 101 whose Connection
 * header was misspelled. (Here, not in test_ws_local.c: the accept key
 * takes OpenSSL's SHA-1.) */
Test(ws, cport_client_requires_connection_upgrade, .timeout = 60)
{
    int lfd = cpt_xlisten(4);
    struct sockaddr_in la;
    socklen_t ll = sizeof la;
    cr_assert_eq(getsockname(lfd, (struct sockaddr *)&la, &ll), 0);
    cp_port *port;
    cp_port_opts po = { .workers = 1 };
    cr_assert_eq(cp_port_create(&port, &po), 0);
    cp_ws *cws;
    cp_ws_opts cwo = { 0 };
    cr_assert_eq(cp_ws_create(&cws, &cwo), 0);
    for (int with = 0; with < 2; with++) {
        cpt_track *t = cpt_track_new(4);
        t->echo = false;
        cp_client_opts co = { .host = CPT_HOST4, .port = ntohs(la.sin_port), .sessions = 1 };
        co.session.ws = cws;
        cp_handlers h = cpt_track_handlers();
        cp_service *svc = cpt_xclient(port, &co, &h, t);
        int fd = cpt_accept(lfd);
        cr_assert_geq(fd, 0);
        char req[1024] = "";
        size_t got = 0;
        while (!strstr(req, "\r\n\r\n")) {
            ssize_t r = cpt_recv_once(fd, req + got, sizeof req - 1 - got);
            cr_assert_gt(r, 0, "the client's request did not come");
            got += (size_t)r;
            req[got] = '\0';
        }
        const char *k = strstr(req, "Sec-WebSocket-Key: ");
        cr_assert(k);
        char key[25], acc[29], ans[256];
        memcpy(key, k + 19, 24);
        key[24] = '\0';
        accept_of(key, acc);
        int n = snprintf(ans, sizeof ans,
                         "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n%s"
                         "Sec-WebSocket-Accept: %s\r\n\r\n",
                         with ? "Connection: Upgrade\r\n" : "", acc);
        cpt_xsend(fd, ans, (size_t)n);
        if (with) {
            CPT_AWAIT(atomic_load(&t->connected) == 1, 5000,
                      "a 101 with Connection: Upgrade did not connect");
        } else {
            CPT_AWAIT(atomic_load(&t->connect_failed) == 1, 5000,
                      "a 101 without Connection: Upgrade did not fail");
            cr_assert_eq(atomic_load(&t->connected), 0, "a 101 without Connection: Upgrade connected");
        }
        cpt_close(fd);
        cpt_xstop(svc);
        cpt_track_stopped(t);
        cpt_track_xcheck(t);
        cpt_track_free(t);
    }
    cp_ws_unref(cws);
    cpt_xport_destroy(port);
    cpt_close(lfd);
}
