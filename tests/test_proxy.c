/* SPDX-License-Identifier: MIT */
/*
 * The PROXY protocol on a server (cp_server_opts proxy_protocol): headers
 * written by hand, v1 and v2, whole and in pieces, malformed, late and from
 * untrusted sources; the caps by address on the header's address; a filter
 * (WebSocket) behind the header; and, on Linux, Debian's haproxy in front
 * with send-proxy and send-proxy-v2 (TLS through it too).
 */
#include "helpers.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const uint8_t ping[] = "ping";

/* ------------------------------------------------------------------ peers seen */

/* Every connected session's cp_session_peer, in connect order. */
static pthread_mutex_t seen_lock = PTHREAD_MUTEX_INITIALIZER;
static char seen[64][96];
static int nseen;

static void on_connected_record(cp_session *s)
{
    cpt_on_connected(s);
    char buf[96];
    if (cp_session_peer(s, buf, sizeof buf) <= 0)
        snprintf(buf, sizeof buf, "?");
    pthread_mutex_lock(&seen_lock);
    if (nseen < 64)
        snprintf(seen[nseen++], sizeof seen[0], "%s", buf);
    pthread_mutex_unlock(&seen_lock);
}

static bool seen_has(const char *peer)
{
    pthread_mutex_lock(&seen_lock);
    bool found = false;
    for (int i = 0; i < nseen && !found; i++)
        found = strcmp(seen[i], peer) == 0;
    pthread_mutex_unlock(&seen_lock);
    return found;
}

static void xseen(const char *peer) { CPT_AWAIT(seen_has(peer), 5000, "the server saw the peer %s", peer); }

static cp_handlers record_handlers(void)
{
    cp_handlers h = cpt_track_handlers();
    h.on_connected = on_connected_record;
    return h;
}

/* A server behind a proxy at 127.0.0.0/8 (timeout_ms 0: the default). */
static void start(cpt_env *e, const char *trusted, uint32_t timeout_ms, uint32_t per_addr)
{
    cp_server_opts o = { .proxy_protocol = 1,
                         .proxy_trusted = trusted ? trusted : "127.0.0.0/8",
                         .proxy_timeout_ms = timeout_ms,
                         .max_sessions_per_addr = per_addr };
    cp_handlers h = record_handlers();
    cpt_env_start(e, 2, &o, &h, 32, 0);
}

/* A header then a packet in one write; the echo comes back. */
static int xserved(cpt_env *e, const void *hdr, size_t n)
{
    int fd = cpt_xconnect(e->sport);
    uint8_t buf[256];
    memcpy(buf, hdr, n);
    cpt_put_header(buf + n, (uint16_t)(4 + sizeof ping), 1);
    memcpy(buf + n + 4, ping, sizeof ping);
    cpt_xsend(fd, buf, n + 4 + sizeof ping);
    cpt_xrecv_packet_eq(fd, 1, ping, sizeof ping);
    return fd;
}

static uint64_t by_reason(const cp_service *svc, cp_reason r) { return cpt_stats(svc).by_reason[r]; }

/* ------------------------------------------------------------------ v2 headers */

static const uint8_t v2_sig[12] = { 0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a };

/* A v2 header: command (0 LOCAL, 1 PROXY), family byte, the address block
 * (addrs, alen bytes) and tlv bytes of TLVs after it. */
static size_t v2(uint8_t *out, unsigned cmd, uint8_t fam, const uint8_t *addrs, size_t alen, size_t tlv)
{
    memcpy(out, v2_sig, 12);
    out[12] = (uint8_t)(0x20 | cmd);
    out[13] = fam;
    size_t body = alen + tlv;
    out[14] = (uint8_t)(body >> 8);
    out[15] = (uint8_t)body;
    if (alen) /* addrs may be NULL then (LOCAL), which memcpy must not get */
        memcpy(out + 16, addrs, alen);
    for (size_t i = 0; i < tlv; i += 3) { /* PP2_TYPE_NOOP TLVs of no value */
        out[16 + alen + i] = 0x04;
        out[16 + alen + i + 1] = 0;
        out[16 + alen + i + 2] = 0;
    }
    return 16 + body;
}

static size_t v2_tcp4(uint8_t *out, const char *src, uint16_t sport, size_t tlv)
{
    uint8_t a[12] = { 0 };
    inet_pton(AF_INET, src, a);
    inet_pton(AF_INET, "192.0.2.1", a + 4);
    a[8] = (uint8_t)(sport >> 8), a[9] = (uint8_t)sport;
    a[10] = 0x1e, a[11] = 0x61;
    return v2(out, 1, 0x11, a, sizeof a, tlv);
}

static size_t v2_tcp6(uint8_t *out, const char *src, uint16_t sport)
{
    uint8_t a[36] = { 0 };
    inet_pton(AF_INET6, src, a);
    inet_pton(AF_INET6, "2001:db8::1", a + 16);
    a[32] = (uint8_t)(sport >> 8), a[33] = (uint8_t)sport;
    return v2(out, 1, 0x21, a, sizeof a, 0);
}

/* ------------------------------------------------------------------ headers by hand */

Test(proxy, v1_gives_the_clients_address)
{
    cpt_env e;
    start(&e, NULL, 0, 0);
    static const char h4[] = "PROXY TCP4 203.0.113.7 192.0.2.1 51234 7777\r\n";
    static const char h6[] = "PROXY TCP6 2001:db8::5 2001:db8::1 4000 7777\r\n";
    int a = xserved(&e, h4, strlen(h4));
    int b = xserved(&e, h6, strlen(h6));
    xseen("203.0.113.7:51234");
    xseen("[2001:db8::5]:4000");
    cpt_close(a);
    cpt_close(b);
    cpt_env_stop(&e);
}

Test(proxy, v2_gives_the_clients_address_and_local_keeps_the_sockets)
{
    cpt_env e;
    start(&e, NULL, 0, 0);
    uint8_t h[128];
    int a = xserved(&e, h, v2_tcp4(h, "198.51.100.9", 40000, 0));
    int b = xserved(&e, h, v2_tcp4(h, "198.51.100.10", 40001, 30)); /* with TLVs */
    int c = xserved(&e, h, v2_tcp6(h, "2001:db8:aa::7", 443));
    int d = xserved(&e, h, v2(h, 0, 0, NULL, 0, 0)); /* LOCAL: a health check */
    xseen("198.51.100.9:40000");
    xseen("198.51.100.10:40001");
    xseen("[2001:db8:aa::7]:443");
    char own[64];
    snprintf(own, sizeof own, "127.0.0.1:%u", cpt_local_port(d));
    xseen(own);
    cpt_close(a);
    cpt_close(b);
    cpt_close(c);
    cpt_close(d);
    cpt_env_stop(&e);
}

/* TCP may cut a header anywhere: byte by byte, then the packet after it
 * partly in the header's last write. */
static void split(cpt_env *e, const uint8_t *h, size_t n)
{
    int fd = cpt_xconnect(e->sport);
    for (size_t i = 0; i + 1 < n; i++) {
        cpt_xsend(fd, h + i, 1);
        cpt_sleep_ms(2);
    }
    uint8_t buf[16];
    buf[0] = h[n - 1];
    cpt_put_header(buf + 1, (uint16_t)(4 + sizeof ping), 1);
    cpt_xsend(fd, buf, 3);
    cpt_sleep_ms(2);
    memcpy(buf, buf + 3, 2);
    memcpy(buf + 2, ping, sizeof ping);
    cpt_xsend(fd, buf, 2 + sizeof ping);
    cpt_xrecv_packet_eq(fd, 1, ping, sizeof ping);
    cpt_close(fd);
}

Test(proxy, header_in_pieces)
{
    cpt_env e;
    start(&e, NULL, 0, 0);
    static const char h1[] = "PROXY TCP4 203.0.113.8 192.0.2.1 1111 7777\r\n";
    split(&e, (const uint8_t *)h1, strlen(h1));
    uint8_t h2[64];
    split(&e, h2, v2_tcp4(h2, "203.0.113.9", 2222, 6));
    xseen("203.0.113.8:1111");
    xseen("203.0.113.9:2222");
    cpt_env_stop(&e);
}

/* Each is closed with CP_REASON_PROXY, never connected. */
Test(proxy, malformed_headers_close_with_the_reason)
{
    cpt_env e;
    start(&e, NULL, 0, 0);
    static const char *const bad[] = {
        "GET / HTTP/1.1\r\n\r\n",
        "PROXY TCP4 203.0.113.300 192.0.2.1 1 2\r\n",
        "PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n",
        "PROXY TCP4 203.0.113.1 192.0.2.1 1 65536\r\n",
        "PROXY TCP4 203.0.113.1 192.0.2.1 1\r\n",
        "PROXY UDP4 203.0.113.1 192.0.2.1 1 2\r\n",
        "PROXY TCP4 203.0.113.1  192.0.2.1 1 2\r\n",
        "PROXY TCP4 203.0.113.1 192.0.2.1 1 2\n",
    };
    int n = (int)(sizeof bad / sizeof bad[0]);
    for (int i = 0; i < n; i++) {
        int fd = cpt_xconnect(e.sport);
        cpt_xsend(fd, bad[i], strlen(bad[i]));
        cpt_xclosed(fd, 5000);
        cpt_close(fd);
    }
    /* v1 without its CRLF within 107 bytes, and v2 of a bad version,
     * command, family, or a length past 1024. */
    uint8_t h[1200];
    memset(h, 'x', sizeof h);
    memcpy(h, "PROXY TCP4 ", 11);
    size_t lens[5] = { 120 };
    lens[1] = v2_tcp4(h + 200, "203.0.113.1", 1, 0);
    h[200 + 12] = 0x31; /* version 3 */
    lens[2] = v2_tcp4(h + 300, "203.0.113.1", 1, 0);
    h[300 + 12] = 0x22; /* command 2 */
    lens[3] = v2_tcp4(h + 400, "203.0.113.1", 1, 0);
    h[400 + 13] = 0x12; /* UDP over IPv4 */
    lens[4] = 16;
    v2(h + 500, 1, 0x11, (const uint8_t *)"", 0, 0);
    h[500 + 14] = 0x04, h[500 + 15] = 0x00; /* 1024 bytes after the 16 */
    const size_t at[5] = { 0, 200, 300, 400, 500 };
    for (int i = 0; i < 5; i++) {
        int fd = cpt_xconnect(e.sport);
        cpt_xsend(fd, h + at[i], lens[i]);
        cpt_xclosed(fd, 5000);
        cpt_close(fd);
    }
    CPT_AWAIT(by_reason(e.svc, CP_REASON_PROXY) == (uint64_t)n + 5, 5000, "every one counted: %llu",
              (unsigned long long)by_reason(e.svc, CP_REASON_PROXY));
    cr_assert_eq(atomic_load(&e.t->connected), 0, "none reached on_connected");
    cpt_env_stop(&e);
}

Test(proxy, a_header_not_complete_in_time_closes)
{
    cpt_env e;
    start(&e, NULL, 300, 0);
    int silent = cpt_xconnect(e.sport);
    int partial = cpt_xconnect(e.sport);
    cpt_xsend(partial, "PROXY TCP4 ", 11);
    uint64_t t0 = cpt_now_ms();
    cpt_xclosed(silent, 5000);
    cpt_xclosed(partial, 5000);
    uint64_t took = cpt_now_ms() - t0;
    cr_assert(took >= 250, "closed after %llu ms, before the 300 ms deadline", (unsigned long long)took);
    CPT_AWAIT(by_reason(e.svc, CP_REASON_PROXY) == 2, 5000, "both counted");
    cr_assert_eq(atomic_load(&e.t->connected), 0);
    cpt_close(silent);
    cpt_close(partial);
    cpt_env_stop(&e);
}

Test(proxy, untrusted_source_is_refused_at_accept)
{
    cpt_env e;
    start(&e, "127.0.0.3/32,::1/128", 0, 0);
    static const char h[] = "PROXY TCP4 203.0.113.7 192.0.2.1 51234 7777\r\n";
    int fd = cpt_connect_from("127.0.0.2", CPT_HOST4, e.sport);
    cr_assert_geq(fd, 0);
    cpt_xsend(fd, h, strlen(h));
    cpt_xclosed(fd, 5000);
    cpt_close(fd);
    CPT_AWAIT(cpt_stats(e.svc).refused[CP_REFUSED_UNTRUSTED] == 1, 5000, "the untrusted source counted");
    cr_assert_eq(atomic_load(&e.t->connected), 0);

    /* The trusted proxy's clients are served. */
    fd = cpt_connect_from("127.0.0.3", CPT_HOST4, e.sport);
    cr_assert_geq(fd, 0);
    uint8_t buf[128];
    memcpy(buf, h, strlen(h));
    cpt_put_header(buf + strlen(h), (uint16_t)(4 + sizeof ping), 1);
    memcpy(buf + strlen(h) + 4, ping, sizeof ping);
    cpt_xsend(fd, buf, strlen(h) + 4 + sizeof ping);
    cpt_xrecv_packet_eq(fd, 1, ping, sizeof ping);
    xseen("203.0.113.7:51234");
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* Every connection comes from the proxy's one address: the caps count the
 * clients' addresses from the headers instead. */
Test(proxy, caps_by_address_use_the_headers_address)
{
    cpt_env e;
    start(&e, NULL, 0, 1);
    static const char a1[] = "PROXY TCP4 198.51.100.1 192.0.2.1 1000 7777\r\n";
    static const char a2[] = "PROXY TCP4 198.51.100.2 192.0.2.1 1001 7777\r\n";
    static const char a1b[] = "PROXY TCP4 198.51.100.1 192.0.2.1 1002 7777\r\n";
    int x = xserved(&e, a1, strlen(a1));
    int y = xserved(&e, a2, strlen(a2));
    int z = cpt_xconnect(e.sport);
    cpt_xsend(z, a1b, strlen(a1b));
    cpt_xclosed(z, 5000);
    CPT_AWAIT(cpt_stats(e.svc).refused[CP_REFUSED_PER_ADDR] == 1, 5000,
              "the second from 198.51.100.1 refused");
    cr_assert_eq(atomic_load(&e.t->connected), 2);
    cr_assert_eq(by_reason(e.svc, CP_REASON_PROXY), 0, "a refusal, not a bad header");
    cpt_close(x);
    cpt_close(y);
    cpt_close(z);
    cpt_env_stop(&e);
}

Test(proxy, options_that_cannot_work_are_refused)
{
    cp_port *port = cpt_xport(1);
    cp_handlers h = cpt_track_handlers();
    static const char *const bad[] = { NULL,        "",          "10.0.0.1/8", "10.0.0.0/33", "::1/129",
                                       "localhost", "10.0.0.0/", "1.2.3.4,",   "1.2.3.4/8x" };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        cp_server_opts o = { .host = CPT_HOST4, .proxy_protocol = 1, .proxy_trusted = bad[i] };
        cp_service *svc = NULL;
        cr_assert_eq(cp_server_start(&svc, port, &o, &h, NULL), -EINVAL, "trusted '%s'",
                     bad[i] ? bad[i] : "NULL");
    }
    cp_server_opts o = { .host = CPT_HOST4, .proxy_trusted = "127.0.0.1" }; /* ranges, no header */
    cp_service *svc = NULL;
    cr_assert_eq(cp_server_start(&svc, port, &o, &h, NULL), -EINVAL);
    cpt_xport_destroy(port);
}

/* The header comes before a filter's handshake: a WebSocket upgrade in the
 * same write as the header. */
Test(proxy, websocket_behind_the_header)
{
    cp_ws *ws = NULL;
    int r = cp_ws_create(&ws, &(cp_ws_opts){ 0 });
    if (r == -ENOTSUP)
        cr_skip_test("no WebSocket in this build");
    cr_assert_eq(r, 0);
    cpt_env e;
    cp_server_opts o = { .proxy_protocol = 1, .proxy_trusted = "127.0.0.1/32", .session = { .ws = ws } };
    cp_handlers h = record_handlers();
    cpt_env_start(&e, 1, &o, &h, 8, 0);
    cp_ws_unref(ws);
    int fd = cpt_xconnect(e.sport);
    static const char req[] =
        "PROXY TCP4 203.0.113.44 192.0.2.1 5555 80\r\n"
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    cpt_xsend(fd, req, strlen(req));
    char resp[512];
    size_t got = 0;
    while (got < sizeof resp - 1 && !strstr(resp, "\r\n\r\n")) {
        ssize_t k = cpt_recv_some(fd, resp + got, sizeof resp - 1 - got);
        cr_assert_gt(k, 0, "the upgrade's answer");
        got += (size_t)k;
        resp[got] = '\0';
    }
    cr_assert(strncmp(resp, "HTTP/1.1 101", 12) == 0, "upgraded: %s", resp);
    cr_assert(strstr(resp, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "the key's answer: %s", resp);
    xseen("203.0.113.44:5555");
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* ------------------------------------------------------------------ haproxy */

#ifndef _WIN32
#  include "peers.h"

#  include <signal.h>
#  include <sys/wait.h>

#  define HAPROXY_BIN "/usr/sbin/haproxy"

/* A port free a moment ago. */
static uint16_t free_port(const char *host)
{
    int fd = cpt_socket(strchr(host, ':') ? AF_INET6 : AF_INET);
    cr_assert_geq(fd, 0);
    struct sockaddr_storage ss = { 0 };
    socklen_t len;
    if (strchr(host, ':')) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6;
        inet_pton(AF_INET6, host, &a->sin6_addr);
        len = sizeof *a;
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        inet_pton(AF_INET, host, &a->sin_addr);
        len = sizeof *a;
    }
    cr_assert_eq(bind(fd, (struct sockaddr *)&ss, len), 0);
    socklen_t l = sizeof ss;
    getsockname(fd, (struct sockaddr *)&ss, &l);
    uint16_t p = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                : ((struct sockaddr_in *)&ss)->sin_port);
    cpt_close(fd);
    return p;
}

typedef struct haproxy {
    peer p;
    uint16_t v1, v2, v6, untrusted, probe;
} haproxy;

/* haproxy in front of 127.0.0.1:sport: frontends v1 (send-proxy), v2
 * (send-proxy-v2), v6 (on ::1, send-proxy-v2) and untrusted (send-proxy,
 * connecting from 127.0.0.5), and probe (to port 1, for the start). */
static bool haproxy_try(haproxy *h, uint16_t sport)
{
    h->v1 = free_port("127.0.0.1");
    h->v2 = free_port("127.0.0.1");
    h->v6 = free_port("::1");
    h->untrusted = free_port("127.0.0.1");
    h->probe = free_port("127.0.0.1");
    char cfg[256];
    tmp_path(cfg, sizeof cfg, "haproxy.cfg");
    FILE *f = fopen(cfg, "w");
    cr_assert(f);
    fprintf(f,
            "global\n  maxconn 200\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n"
            "frontend v1\n  bind 127.0.0.1:%u\n  default_backend v1\n"
            "backend v1\n  server s 127.0.0.1:%u send-proxy\n"
            "frontend v2\n  bind 127.0.0.1:%u\n  default_backend v2\n"
            "backend v2\n  server s 127.0.0.1:%u send-proxy-v2\n"
            "frontend v6\n  bind [::1]:%u\n  default_backend v6\n"
            "backend v6\n  server s 127.0.0.1:%u send-proxy-v2\n"
            "frontend untrusted\n  bind 127.0.0.1:%u\n  default_backend untrusted\n"
            "backend untrusted\n  server s 127.0.0.1:%u send-proxy source 127.0.0.5\n"
            "frontend probe\n  bind 127.0.0.1:%u\n  default_backend probe\n"
            "backend probe\n  server s 127.0.0.1:1\n",
            h->v1, sport, h->v2, sport, h->v6, sport, h->untrusted, sport, h->probe);
    fclose(f);
    char *argv[] = { HAPROXY_BIN, "-db", "-f", cfg, NULL };
    peer_start(&h->p, argv);
    /* Listening once a connect to its last frontend succeeds: one that
     * leads nowhere, so that the probe is no connection the server sees. */
    for (int i = 0; i < 500; i++) {
        int fd = cpt_connect(CPT_HOST4, h->probe, 0);
        if (fd >= 0) {
            cpt_close(fd);
            return true;
        }
        if (peer_exited(&h->p))
            break;
        cpt_sleep_ms(10);
    }
    return false;
}

/* The frontends' ports are picked free and then bound by haproxy: a test
 * running beside this one can take one in between (CI saw "Address already
 * in use" once, under ctest -j2). haproxy then exits at once, and is started
 * again on fresh ports; any other failure to start fails the test. */
static void haproxy_start(haproxy *h, uint16_t sport)
{
    if (access(HAPROXY_BIN, X_OK) != 0)
        cr_skip_test("haproxy is not installed (make test-deps)");
    for (int attempt = 1;; attempt++) {
        if (haproxy_try(h, sport))
            return;
        for (int i = 0; i < 200 && !peer_drained(&h->p); i++)
            cpt_sleep_ms(10); /* its last words are read */
        if (attempt == 5 || !peer_exited(&h->p) || !peer_has(&h->p, ERR, "Address already in use"))
            break;
        peer_stop(&h->p);
    }
    peer_dump(&h->p, "haproxy");
    cr_assert_fail("haproxy did not start");
}

/* A client of source src through haproxy's port: served, and the server saw
 * src with the client's own port. */
static int xthrough(const char *src, const char *host, uint16_t port)
{
    int fd = cpt_connect_from(src, host, port);
    cr_assert_geq(fd, 0, "connect from %s: %s", src, strerror(-fd));
    cpt_xsend_packet(fd, 1, ping, sizeof ping);
    cpt_xrecv_packet_eq(fd, 1, ping, sizeof ping);
    char want[96];
    snprintf(want, sizeof want, strchr(src, ':') ? "[%s]:%u" : "%s:%u", src, cpt_local_port(fd));
    xseen(want);
    return fd;
}

Test(proxy, haproxy_send_proxy_v1_and_v2_report_each_clients_address)
{
    cpt_env e;
    start(&e, "127.0.0.1/32", 0, 1);
    haproxy h;
    haproxy_start(&h, e.sport);
    int a = xthrough("127.0.0.2", CPT_HOST4, h.v1);
    int b = xthrough("127.0.0.3", CPT_HOST4, h.v1);
    int c = xthrough("127.0.0.4", CPT_HOST4, h.v2);
    int d = xthrough("::1", CPT_HOST6, h.v6);
    /* The cap of one session per address holds on the clients' addresses
     * from the header, though every connection comes from haproxy. */
    int over = cpt_connect_from("127.0.0.2", CPT_HOST4, h.v2);
    cr_assert_geq(over, 0);
    cpt_xclosed(over, 5000);
    cpt_close(over);
    CPT_AWAIT(cpt_stats(e.svc).refused[CP_REFUSED_PER_ADDR] == 1, 5000, "the second from 127.0.0.2 refused");
    /* haproxy connecting from 127.0.0.5, which the server does not trust. */
    int u = cpt_connect_from("127.0.0.6", CPT_HOST4, h.untrusted);
    cr_assert_geq(u, 0);
    cpt_xclosed(u, 5000);
    cpt_close(u);
    CPT_AWAIT(cpt_stats(e.svc).refused[CP_REFUSED_UNTRUSTED] == 1, 5000, "haproxy from 127.0.0.5 refused");
    cr_assert_eq(atomic_load(&e.t->connected), 4);
    cr_assert_eq(by_reason(e.svc, CP_REASON_PROXY), 0);
    cpt_close(a);
    cpt_close(b);
    cpt_close(c);
    cpt_close(d);
    peer_stop(&h.p);
    cpt_env_stop(&e);
}

/* TLS behind the header: openssl s_client through haproxy's send-proxy-v2,
 * the handshake verified and a packet echoed. */
Test(proxy, tls_behind_haproxy)
{
    pem pm;
    pem_make(&pm, "proxy", "localhost");
    cp_tls *tls = NULL;
    int r = cp_tls_create(&tls, &(cp_tls_opts){ .cert_file = pm.cert, .key_file = pm.key });
    if (r == -ENOTSUP)
        cr_skip_test("no TLS in this build");
    cr_assert_eq(r, 0);
    cpt_env e;
    cp_server_opts o = { .proxy_protocol = 1, .proxy_trusted = "127.0.0.1/32", .session = { .tls = tls } };
    cp_handlers hd = record_handlers();
    cpt_env_start(&e, 2, &o, &hd, 8, 0);
    cp_tls_unref(tls);
    haproxy h;
    haproxy_start(&h, e.sport);
    char connect[32];
    snprintf(connect, sizeof connect, "127.0.0.1:%u", h.v2);
    char *argv[] = { OPENSSL_BIN,   "s_client",  "-connect",
                     connect,       "-CAfile",   pm.cert,
                     "-servername", "localhost", "-verify_return_error",
                     "-brief",      NULL };
    peer c;
    peer_start(&c, argv);
    peer_xwait(&c, ERR, "Verification: OK", 5000);
    uint8_t pkt[4 + sizeof ping], back[sizeof pkt];
    cpt_put_header(pkt, (uint16_t)sizeof pkt, 3);
    memcpy(pkt + 4, ping, sizeof ping);
    peer_write(&c, pkt, sizeof pkt);
    CPT_AWAIT(peer_len(&c, OUT) >= sizeof pkt, 5000, "the packet came back through TLS and haproxy");
    cr_assert(peer_copy(&c, OUT, 0, back, sizeof back));
    cr_assert_eq(memcmp(back, pkt, sizeof pkt), 0);
    cr_assert_eq(atomic_load(&e.t->connected), 1);
    peer_stop(&c);
    peer_stop(&h.p);
    cpt_env_stop(&e);
}
#endif
