/* SPDX-License-Identifier: MIT */
/*
 * fuzz_ws_upgrade: the HTTP side of cport's WebSocket, under libFuzzer (+
 * ASan + UBSan): arbitrary bytes as the upgrade request a server reads, or
 * as the answer a client session reads.
 *
 * The process runs, created once in LLVMFuzzerInitialize on 127.0.0.1 with
 * two workers (CP_FRAMING_PACKET, max_packet 1024, odd ids echoed):
 *   server A: path "/ws", Origin allow-list { "http://ok.example" },
 *     subprotocol "game", a page for plain GETs, an on_upgrade callback that
 *     refuses targets containing "deny" (403), "busy" (503) or "odd" (299:
 *     not an error status, so 403), the default request cap (8 KiB) and a
 *     150 ms upgrade deadline;
 *   server B: any path and Origin, no subprotocol, no page (426), a request
 *     cap of 512 bytes and an 80 ms deadline;
 *   client services C1 (path "/c", no subprotocol, the default cap, 150 ms)
 *     and C2 (subprotocol "game", a cap of 512 bytes, 80 ms), which connect
 *     to a raw listening socket of the harness.
 * Every socket of the harness is non-blocking, driven with poll and
 * deadlines. Byte 0 of the input chooses:
 *
 *   bit 0: 0 server mode, 1 client mode
 *   bit 1: server B / client C2 (else A / C1)
 *   bits 2-4: how the bytes are cut into writes: whole; single bytes (the
 *     first 64); chunks of 3, 16, 100 or 1000; three random cuts; one cut in
 *     the middle
 *   bit 5: server mode: shutdown(SHUT_WR) after the request; client mode: a
 *     server frame (a binary message holding packet 0x4243) follows the
 *     answer in the same write
 *   bit 6: server mode: after a 101, no probe (below); client mode: the
 *     harness closes its socket right after the answer
 *   bit 7: a pause past the deadline before the last piece
 *
 * and the rest of the input is the request (server mode) or the answer
 * (client mode; each byte 0x01 in it becomes the Sec-WebSocket-Accept that
 * the client's key asks for, so that valid answers are within reach).
 *
 * Checked (abort() on a violation, which libFuzzer reports with the input):
 * Server mode: what the server sends is a well-formed HTTP answer, or
 * nothing. The status line is "HTTP/1.1 <code> <text>" with a code the
 * options can produce (101, 200, 400, 403, 404, 405, 426, 431, 503), the head
 * ends within 4 KiB, header lines are "Name: value"; a refusal says
 * Connection: close and its Content-Length, its body is that long (the page
 * for 200) and the stream then ends (once the harness, done reading, sends
 * its FIN); a 101 has Upgrade: websocket,
 * Connection: Upgrade, the accept key of a Sec-WebSocket-Key of the request
 * (and A's subprotocol), answers a request that begins with GET and whose
 * head ends within the cap, and its session is connected (on_connected ran
 * before it was written), while a session answered otherwise never is.
 * What follows a 101 is read as strict server frames; unless bit 6, the
 * harness then sends a masked packet and a Close and must read a Close back
 * (and the echo first, when the request held nothing after its head). No
 * answer at all is allowed only for a reset (an answer may be lost to it), a
 * request the client ended (bit 5), or the upgrade deadline: the server may
 * not end a stream without an answer before it, nor wait past it (or past a
 * request longer than the cap) with none.
 * Client mode: the client's request is well-formed (GET of its path,
 * Upgrade, Connection, a 16-byte base64 key, version 13, its subprotocol);
 * each connect ends in exactly one of on_connected or on_connect_error, in
 * time (the deadline, then 1.5 s of patience not counting stalls); an
 * answer that is surely no valid 101 (no status 101, no accept key, no
 * "websocket", no Connection: Upgrade, an extension or subprotocol not
 * asked for, no head within the cap) never connects, and a strictly
 * well-formed valid 101 always does; then a frame sent with the answer
 * reaches on_packet. Both modes: callbacks of a session never overlap,
 * on_disconnected exactly once per on_connected, and after the input every
 * session of all four services is gone within 5 s.
 *
 * FUZZ_WS_TRACE=1 in the environment prints what each input sent and got:
 *   FUZZ_WS_TRACE=1 build-fuzz/fuzz_ws_upgrade -runs=1 tests/fuzz/corpus/fuzz_ws_upgrade/upgrade_a
 */
#define FUZZ_NAME "fuzz_ws_upgrade"
#include "fuzz_ws.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_PACKET 1024
#define ID_PROBE 0x4243 /* odd: the server echoes it */
#define CAP_A 8192u
#define CAP_B 512u
#define DEADLINE_A_MS 150u
#define DEADLINE_B_MS 80u
#define PATIENCE_US 1500000u
#define END_WAIT_US 5000000u
#define IN_MAX (64 * 1024 + 4096)

static const char PAGE[] = "<!doctype html><title>game</title><p>play</p>";

static int g_trace;
static cp_port *g_port;

/* ------------------------------------------------------------------ the servers */

enum { S_A, S_B, S_COUNT };
static cp_service *g_srv[S_COUNT];
static int g_srv_listen[S_COUNT];

static void srv_connected(cp_session *s) { rec_connected(s); }

static int srv_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    rec *r;
    rec_enter(s, &r);
    if (id & 1) {
        cp_sendbuf *b = cp_packet_make(id, body, len);
        if (b) {
            cp_session_send(s, b);
            cp_sendbuf_unref(b);
        }
    }
    rec_leave(r);
    return 0;
}

static void srv_disconnected(cp_session *s, cp_reason reason, int err) { rec_disconnected(s, reason, err); }

static int on_upgrade(const cp_ws_request *req, void *arg)
{
    (void)arg;
    if (!req->path || !req->host || !req->origin || !req->protocols)
        fail("on_upgrade got a NULL string", 0, 0);
    if (strstr(req->path, "deny"))
        return 403;
    if (strstr(req->path, "busy"))
        return 503;
    if (strstr(req->path, "odd"))
        return 299;
    return 0;
}

/* ------------------------------------------------------------------ the clients */

enum { C_1, C_2, C_COUNT };
static cp_service *g_cli[C_COUNT];
static int g_raw = -1; /* the harness's listening socket the clients connect to */
static uint16_t g_raw_port;

/* One connect of a client service; its data from the start. */
typedef struct attempt {
    atomic_int inside;
    atomic_int connected, failed, disconnected;
    atomic_int probe; /* packet ID_PROBE read */
    atomic_int err;   /* on_connect_error's */
} attempt;

static attempt *att_enter(cp_session *s)
{
    attempt *a = cp_session_data(s);
    if (!a)
        fail("a client session without its connect's data", 0, 0);
    if (atomic_fetch_add(&a->inside, 1) != 0)
        fail("callbacks of a client session overlap", 0, 0);
    if (atomic_load(&a->disconnected))
        fail("a client callback after on_disconnected", 0, 0);
    return a;
}

static void att_leave(attempt *a) { atomic_fetch_sub(&a->inside, 1); }

static void cli_connected(cp_session *s)
{
    attempt *a = att_enter(s);
    if (atomic_load(&a->failed) || atomic_fetch_add(&a->connected, 1) != 0)
        fail("a connect reported twice", 0, 0);
    att_leave(a);
}

static int cli_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    attempt *a = att_enter(s);
    if (!atomic_load(&a->connected))
        fail("a packet before on_connected", id, (long)len);
    if (id == ID_PROBE && len == 5 && !memcmp(body, "hello", 5))
        atomic_store(&a->probe, 1);
    att_leave(a);
    return 0;
}

static void cli_disconnected(cp_session *s, cp_reason reason, int err)
{
    (void)err;
    attempt *a = att_enter(s);
    if (!atomic_load(&a->connected))
        fail("on_disconnected of a client session never connected", reason, err);
    att_leave(a);
    atomic_store(&a->disconnected, 1);
}

static void cli_connect_error(cp_service *svc, void *data, int err)
{
    (void)svc;
    attempt *a = data;
    if (!a)
        fail("on_connect_error without its connect's data", err, 0);
    if (atomic_load(&a->connected) || atomic_fetch_add(&a->failed, 1) != 0)
        fail("a connect reported twice", err, 0);
    atomic_store(&a->err, err);
}

/* ------------------------------------------------------------------ I/O */

static uint32_t g_rnd;

static uint32_t rnd_next(void)
{
    uint32_t v = g_rnd ? g_rnd : 0x9e3779b9u;
    v ^= v << 13;
    v ^= v >> 17;
    v ^= v << 5;
    return g_rnd = v;
}

/* Writes all of p by the deadline (absolute); the bytes written. */
static size_t send_all(int fd, const uint8_t *p, size_t n, uint64_t deadline)
{
    size_t done = 0;
    while (done < n) {
        ssize_t r = send(fd, p + done, n - done, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r > 0) {
            done += (size_t)r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            uint64_t now = now_us();
            if (now >= deadline)
                break;
            struct pollfd pf = { .fd = fd, .events = POLLOUT };
            poll(&pf, 1, (int)((deadline - now + 999) / 1000));
            continue;
        }
        break; /* the peer is gone */
    }
    return done;
}

/* p cut into writes as bits 2-4 and 7 of the mode say, within a second (and
 * the pause); the bytes written. */
static size_t send_cut(int fd, const uint8_t *p, size_t n, uint8_t mode, unsigned deadline_ms)
{
    size_t cuts[80], nc = 0;
    int how = (mode >> 2) & 7;
    static const size_t chunk[8] = { 0, 1, 3, 16, 100, 1000, 0, 0 };
    if (how >= 1 && how <= 5)
        for (size_t i = chunk[how]; i < n && nc < 64; i += chunk[how])
            cuts[nc++] = i;
    if (how == 6 && n > 1)
        for (int i = 0; i < 3; i++)
            cuts[nc++] = 1 + rnd_next() % (n - 1);
    if (how == 7 && n > 1)
        cuts[nc++] = n / 2;
    for (size_t i = 0; i < nc; i++) /* sorted */
        for (size_t j = i + 1; j < nc; j++)
            if (cuts[j] < cuts[i]) {
                size_t t = cuts[i];
                cuts[i] = cuts[j];
                cuts[j] = t;
            }
    if ((mode & 0x80) && n > 1) { /* the last piece after the deadline */
        size_t last = nc ? cuts[nc - 1] : n - 1;
        cuts[nc++] = last; /* a second cut at the same place marks the pause */
    }
    cuts[nc++] = n;
    size_t pos = 0;
    uint64_t deadline = now_us() + 1000000;
    for (size_t k = 0; k < nc; k++) {
        if (k + 1 < nc && cuts[k] == cuts[k + 1] && (mode & 0x80)) {
            sleep_us((uint64_t)(deadline_ms + 30) * 1000);
            deadline += (uint64_t)(deadline_ms + 30) * 1000;
        }
        if (cuts[k] <= pos)
            continue;
        size_t len = cuts[k] - pos;
        size_t w = send_all(fd, p + pos, len, deadline);
        pos += w;
        if (w < len)
            break;
        if (pos < n)
            sched_yield();
    }
    return pos;
}

/* What a socket's reading ended with. */
enum { RD_OPEN, RD_EOF, RD_RESET };

/* Reads into buf (appending at *len, at most cap) until stop(buf, len)
 * holds, the stream ends, or the patience after the deadline runs out. */
static int read_until(int fd, uint8_t *buf, size_t *len, size_t cap, uint64_t deadline,
                      bool (*stop)(const uint8_t *, size_t))
{
    patience p = patience_start(deadline > now_us() ? deadline - now_us() : 0);
    for (;;) {
        if (stop && stop(buf, *len))
            return RD_OPEN;
        uint8_t scratch[4096];
        bool full = *len >= cap;
        ssize_t r = recv(fd, full ? scratch : buf + *len, full ? sizeof scratch : cap - *len, MSG_DONTWAIT);
        if (r > 0) {
            if (!full)
                *len += (size_t)r;
            continue;
        }
        if (r == 0)
            return RD_EOF;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return RD_RESET;
        if (patience_out(&p))
            return RD_OPEN;
        struct pollfd pf = { .fd = fd, .events = POLLIN };
        poll(&pf, 1, 10);
    }
}

static int connect_to(uint16_t port, uint16_t *lport)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET,
                             .sin_port = htons(port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (connect_retry(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    struct sockaddr_in l;
    socklen_t ll = sizeof l;
    getsockname(fd, (struct sockaddr *)&l, &ll);
    *lport = ntohs(l.sin_port);
    return fd;
}

static void close_reset(int fd)
{
    struct linger lg = { .l_onoff = 1, .l_linger = 0 };
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

/* ------------------------------------------------------------------ HTTP, read by the harness */

static const uint8_t *find(const uint8_t *p, size_t n, const char *s)
{
    size_t sl = strlen(s);
    return sl <= n ? memmem(p, n, s, sl) : NULL;
}

static bool find_ci(const uint8_t *p, size_t n, const char *s)
{
    size_t sl = strlen(s);
    for (size_t i = 0; i + sl <= n; i++)
        if (!strncasecmp((const char *)p + i, s, sl))
            return true;
    return false;
}

/* Where the head ends by the loosest reading (CRLF or bare LF lines): the
 * offset after its blank line, or 0 if there is none in p. The blank line
 * may also be a bare CR and any byte: llhttp 8.1.0 (Debian 12's) takes that
 * byte for the LF (the leniency of CVE-2023-30589, strict from 8.1.1). */
static size_t head_end_loose(const uint8_t *p, size_t n)
{
    static const char *const ends[] = { "\r\n\r\n", "\n\n", "\r\n\n", "\n\r\n", "\r\n\r", "\n\r" };
    size_t best = 0;
    for (int i = 0; i < 6; i++) {
        const uint8_t *e = find(p, n, ends[i]);
        size_t at = e ? (size_t)(e - p) + strlen(ends[i]) : 0;
        if (at && ends[i][strlen(ends[i]) - 1] == '\r')
            at = at < n ? at + 1 : 0; /* the byte taken for the LF */
        if (at && (!best || at < best))
            best = at;
    }
    return best;
}

static bool head_done(const uint8_t *p, size_t n) { return find(p, n, "\r\n\r\n") != NULL; }

/* A header's value in a strict head (lines "Name: value\r\n"), copied to
 * out; the number of times the header appears. */
static int header_get(const char *head, const char *name, char *out, size_t cap)
{
    int count = 0;
    size_t nl = strlen(name);
    for (const char *l = strstr(head, "\r\n"); l && l[2] != '\r'; l = strstr(l + 2, "\r\n")) {
        const char *line = l + 2;
        if (strncasecmp(line, name, nl) != 0 || line[nl] != ':')
            continue;
        const char *v = line + nl + 1;
        while (*v == ' ')
            v++;
        const char *e = strstr(v, "\r\n");
        size_t vl = (size_t)(e - v);
        if (out && !count) {
            if (vl >= cap)
                vl = cap - 1;
            memcpy(out, v, vl);
            out[vl] = '\0';
        }
        count++;
    }
    return count;
}

/* True if the comma-separated list has the token (case-insensitive). */
static bool list_has(const char *list, const char *token)
{
    size_t tl = strlen(token);
    for (const char *p = list; *p;) {
        while (*p == ' ' || *p == ',')
            p++;
        const char *e = p;
        while (*e && *e != ',')
            e++;
        const char *t = e;
        while (t > p && t[-1] == ' ')
            t--;
        if ((size_t)(t - p) == tl && !strncasecmp(p, token, tl))
            return true;
        p = e;
    }
    return false;
}

/* ------------------------------------------------------------------ server mode */

static bool status_allowed(int code)
{
    switch (code) {
    case 101:
    case 200:
    case 400:
    case 403:
    case 404:
    case 405:
    case 426:
    case 431:
    case 503: return true;
    default: return false;
    }
}

/* The accept key of some Sec-WebSocket-Key line of the request (read loosely). */
static bool accept_of_request_key(const uint8_t *req, size_t n, const char *acc)
{
    static const char name[] = "sec-websocket-key:";
    for (size_t i = 0; i + sizeof name - 1 <= n; i++) {
        if (strncasecmp((const char *)req + i, name, sizeof name - 1) != 0)
            continue;
        size_t v = i + sizeof name - 1;
        while (v < n && (req[v] == ' ' || req[v] == '\t'))
            v++;
        size_t e = v;
        while (e < n && req[e] != '\r' && req[e] != '\n' && req[e] != ',')
            e++;
        while (e > v && (req[e - 1] == ' ' || req[e - 1] == '\t'))
            e--;
        char a[29];
        ws_accept_of((const char *)req + v, e - v, a);
        if (!strcmp(a, acc))
            return true;
    }
    return false;
}

typedef struct probe_state {
    size_t rx_len;
    uint8_t rx[2 * (4 + MAX_PACKET)];
    bool echo, closed;
    unsigned code;
} probe_state;

static void probe_binary(void *u, const uint8_t *p, size_t n)
{
    probe_state *ps = u;
    for (size_t i = 0; i < n; i++) {
        if (ps->rx_len < sizeof ps->rx)
            ps->rx[ps->rx_len++] = p[i];
        if (ps->rx_len >= 4) {
            size_t size = (size_t)ps->rx[0] | (size_t)ps->rx[1] << 8;
            if (size < 4 || size > MAX_PACKET)
                fail("the server sent a badly framed packet", (long)size, 0);
            if (ps->rx_len == size) {
                uint16_t id = (uint16_t)(ps->rx[2] | ps->rx[3] << 8);
                if (id == ID_PROBE && size == 9 && !memcmp(ps->rx + 4, "hello", 5))
                    ps->echo = true;
                ps->rx_len = 0;
            }
        }
    }
}

static void probe_binary_end(void *u)
{
    probe_state *ps = u;
    if (ps->rx_len)
        fail("a binary message of the server's ended inside a packet", (long)ps->rx_len, 0);
}

static void probe_control(void *u, uint8_t op, const uint8_t *p, size_t n)
{
    probe_state *ps = u;
    if (op == WS_CLOSE) {
        ps->closed = true;
        ps->code = ws_close_code(p, n);
    }
}

/* After a 101: the rest is frames. The harness sends a packet and a Close;
 * a Close must come back, after the echo if the request ended at its head. */
static void after_101(int fd, const uint8_t *rest, size_t rest_len, bool clean, bool probe)
{
    ws_reader rd = { 0 };
    probe_state ps = { 0 };
    ws_reader_cb cb = { .u = &ps,
                        .binary = probe_binary,
                        .binary_end = probe_binary_end,
                        .control = probe_control };
    ws_reader_feed(&rd, rest, rest_len, &cb);
    if (!probe)
        return;
    uint8_t out[64];
    static const uint8_t mask[4] = { 0x12, 0x34, 0x56, 0x78 };
    uint8_t pk[9] = { 9, 0, (uint8_t)ID_PROBE, (uint8_t)(ID_PROBE >> 8), 'h', 'e', 'l', 'l', 'o' };
    size_t n = ws_frame(out, WS_BINARY, pk, sizeof pk, mask);
    static const uint8_t bye[2] = { 0x03, 0xe8 };
    n += ws_frame(out + n, WS_CLOSE, bye, 2, mask);
    send_all(fd, out, n, now_us() + 300000);
    patience p = patience_start(PATIENCE_US);
    int end = RD_OPEN;
    while (!ps.closed) {
        uint8_t buf[8192];
        ssize_t r = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (r > 0) {
            ws_reader_feed(&rd, buf, (size_t)r, &cb);
            continue;
        }
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
            end = r == 0 ? RD_EOF : RD_RESET;
            break;
        }
        if (patience_out(&p))
            break;
        struct pollfd pf = { .fd = fd, .events = POLLIN };
        poll(&pf, 1, 10);
    }
    if (!ps.closed && end != RD_RESET)
        fail("no Close after the client's Close on an upgraded session", end, 0);
    if (ps.closed && clean && (ps.code != 1000 || !ps.echo))
        fail("an upgraded session did not echo, then answer the Close with 1000", (long)ps.code, ps.echo);
}

static void server_mode(uint8_t mode, const uint8_t *req, size_t n)
{
    int which = (mode >> 1) & 1;
    unsigned cap = which ? CAP_B : CAP_A;
    unsigned deadline_ms = which ? DEADLINE_B_MS : DEADLINE_A_MS;
    uint16_t lport;
    int fd = connect_to(cp_service_listen_port(g_srv[which]), &lport);
    if (fd < 0)
        return;
    uint64_t t0 = now_us();
    size_t sent = send_cut(fd, req, n, mode, deadline_ms);
    bool shut = mode & 0x20;
    if (shut)
        shutdown(fd, SHUT_WR);
    static uint8_t ans[16384];
    size_t len = 0;
    uint64_t deadline = t0 + (uint64_t)deadline_ms * 1000 + PATIENCE_US;
    int end = read_until(fd, ans, &len, sizeof ans, deadline, head_done);
    uint64_t t_end = now_us();
    if (g_trace)
        fprintf(stderr, "fuzz_ws_upgrade: server %c: sent %zu of %zu, got %zu (%s) after %llu ms: %.*s\n",
                "AB"[which], sent, n, len,
                end == RD_OPEN  ? "open"
                : end == RD_EOF ? "EOF"
                                : "reset",
                (unsigned long long)((t_end - t0) / 1000), (int)(len < 200 ? len : 200), (const char *)ans);
    if (!len) {
        if (end == RD_OPEN)
            fail("no answer and no end within the upgrade deadline (and 1.5 s)", (long)n, deadline_ms);
        bool timed_out = t_end - t0 + 2000 >= (uint64_t)deadline_ms * 1000;
        if (end == RD_EOF && !shut && !timed_out)
            fail("the server ended the stream before the deadline without an answer", (long)n,
                 (long)((t_end - t0) / 1000));
        if (end == RD_EOF && !shut && sent == n && n > cap)
            fail("the server read past the request cap and answered nothing", (long)n, cap);
        close(fd);
        return;
    }
    const uint8_t *he = find(ans, len, "\r\n\r\n");
    if (!he)
        fail("an answer whose head does not end (or ends past 16 KiB)", (long)len, end);
    size_t hl = (size_t)(he - ans) + 4;
    if (hl > 4096)
        fail("an answer head over 4 KiB", (long)hl, 0);
    char head[4097];
    memcpy(head, ans, hl);
    head[hl] = '\0';
    int code = 0;
    if (strncmp(head, "HTTP/1.1 ", 9) != 0 || !isdigit((unsigned char)head[9]) ||
        !isdigit((unsigned char)head[10]) || !isdigit((unsigned char)head[11]) || head[12] != ' ')
        fail("a malformed status line", (long)len, 0);
    code = atoi(head + 9);
    if (!status_allowed(code))
        fail("a status the options cannot produce", code, 0);
    for (const char *l = strstr(head, "\r\n"); l && l[2] != '\r'; l = strstr(l + 2, "\r\n")) {
        const char *c = strchr(l + 2, ':');
        const char *e = strstr(l + 2, "\r\n");
        if (!c || c > e || c == l + 2)
            fail("a header line without a name", code, 0);
    }
    rec *r = rec_by_port(lport);
    if (code == 101) {
        char v[128];
        if (header_get(head, "Upgrade", v, sizeof v) != 1 || strcasecmp(v, "websocket") != 0 ||
            header_get(head, "Connection", v, sizeof v) != 1 || !list_has(v, "upgrade"))
            fail("a 101 without Upgrade: websocket and Connection: Upgrade", 0, 0);
        if (header_get(head, "Sec-WebSocket-Accept", v, sizeof v) != 1 || !accept_of_request_key(req, n, v))
            fail("a 101 whose accept key answers no key of the request", 0, 0);
        if (which == S_A &&
            (header_get(head, "Sec-WebSocket-Protocol", v, sizeof v) != 1 || strcmp(v, "game") != 0))
            fail("a 101 of server A without its subprotocol", 0, 0);
        size_t start = 0;
        while (start < n && (req[start] == '\r' || req[start] == '\n'))
            start++;
        if (n - start < 4 || memcmp(req + start, "GET ", 4) != 0)
            fail("a 101 for a request that is no GET", 0, 0);
        size_t rh = head_end_loose(req, n);
        if (!rh || rh > cap)
            fail("a 101 for a request whose head ends past the cap", (long)rh, cap);
        if (!r)
            fail("a 101 came before on_connected", lport, 0);
        /* The request held nothing after its head: the session reads only our frames. */
        bool clean = rh == n && sent == n && find(req, n, "\r\n\r\n") == req + n - 4 &&
                     !find_ci(req, n, "content-length") && !find_ci(req, n, "transfer-encoding") && !shut;
        after_101(fd, ans + hl, len - hl, clean, !(mode & 0x40) && !shut);
        close(fd);
        return;
    }
    if (r)
        fail("a session answered with an HTTP refusal was reported connected", code, lport);
    char v[64];
    if (header_get(head, "Connection", v, sizeof v) != 1 || strcasecmp(v, "close") != 0)
        fail("an HTTP refusal without Connection: close", code, 0);
    if (header_get(head, "Content-Length", v, sizeof v) != 1)
        fail("an HTTP refusal without Content-Length", code, 0);
    size_t cl = (size_t)strtoul(v, NULL, 10);
    if (end == RD_OPEN) {
        /* Done with the answer: our FIN ends the server's graceful refusal
         * (which else waits a second for it) as a browser's would. */
        shutdown(fd, SHUT_WR);
        end = read_until(fd, ans, &len, sizeof ans, now_us() + PATIENCE_US, NULL);
    }
    if (end == RD_OPEN)
        fail("the server kept the stream open after an HTTP refusal", code, 0);
    size_t body = len - hl;
    if (body > cl || (end == RD_EOF && body != cl))
        fail("an HTTP answer whose body is not its Content-Length", code, (long)body);
    if (code == 200 && (cl != sizeof PAGE - 1 || memcmp(ans + hl, PAGE, body) != 0))
        fail("the page is not the options' page", (long)cl, (long)body);
    close(fd);
}

/* ------------------------------------------------------------------ client mode */

/* The client's request, read by the harness: checked; the accept key it
 * asks for into acc. */
static void request_check(const char *req, int which, char acc[29])
{
    char v[128];
    if (strncmp(req, "GET /c HTTP/1.1\r\n", 17) != 0)
        fail("the client's request line is not GET of its path", 0, 0);
    if (header_get(req, "Host", v, sizeof v) != 1 || !v[0])
        fail("the client's request has no Host", 0, 0);
    if (header_get(req, "Upgrade", v, sizeof v) != 1 || strcasecmp(v, "websocket") != 0 ||
        header_get(req, "Connection", v, sizeof v) != 1 || !list_has(v, "upgrade"))
        fail("the client's request lacks Upgrade: websocket or Connection: Upgrade", 0, 0);
    if (header_get(req, "Sec-WebSocket-Version", v, sizeof v) != 1 || strcmp(v, "13") != 0)
        fail("the client's request is not version 13", 0, 0);
    char proto[64] = "";
    int np = header_get(req, "Sec-WebSocket-Protocol", proto, sizeof proto);
    if (which == C_2 ? np != 1 || strcmp(proto, "game") != 0 : np != 0)
        fail("the client's request offers another subprotocol than its options", np, 0);
    if (header_get(req, "Sec-WebSocket-Key", v, sizeof v) != 1 || strlen(v) != 24 || v[22] != '=' ||
        v[23] != '=')
        fail("the client's key is not 16 bytes of base64", 0, 0);
    unsigned char raw[24];
    if (EVP_DecodeBlock(raw, (const unsigned char *)v, 24) != 18)
        fail("the client's key is not base64", 0, 0);
    ws_accept_of(v, 24, acc);
}

enum { J_UNSURE, J_VALID, J_INVALID };

static bool name_char(char c) { return isalnum((unsigned char)c) || c == '-'; }

/* A strictly well-formed valid 101 for this client: every client must
 * connect on it. */
static bool strictly_valid(const uint8_t *a, size_t n, int which, const char *acc, size_t cap)
{
    const uint8_t *he = find(a, n, "\r\n\r\n");
    if (!he)
        return false;
    size_t hl = (size_t)(he - a) + 4;
    if (hl > cap || hl > 4096)
        return false;
    char head[4097];
    memcpy(head, a, hl);
    head[hl] = '\0';
    if (strlen(head) != hl || strncmp(head, "HTTP/1.1 101 ", 13) != 0)
        return false;
    const char *e = strstr(head, "\r\n");
    if (e == head + 13 || head[13] == ' ')
        return false;
    for (const char *p = head + 13; p < e; p++)
        if (*p < 0x20 || *p > 0x7e)
            return false; /* the reason: printable */
    int up = 0, conn = 0, accept = 0, proto = 0;
    const char *l = e + 2;
    for (; *l != '\r'; l = strstr(l, "\r\n") + 2) {
        const char *c = l;
        while (name_char(*c))
            c++;
        if (c == l || c - l > 64 || c[0] != ':' || c[1] != ' ')
            return false;
        const char *v = c + 2, *ve = strstr(v, "\r\n");
        if (ve == v || v[0] == ' ' || ve[-1] == ' ')
            return false;
        for (const char *q = v; q < ve; q++)
            if (*q < 0x20 || *q > 0x7e)
                return false;
        size_t nl = (size_t)(c - l), vl = (size_t)(ve - v);
        char val[256];
        if (vl >= sizeof val)
            return false;
        memcpy(val, v, vl);
        val[vl] = '\0';
#define IS(name) (nl == sizeof name - 1 && !strncasecmp(l, name, nl))
        if (IS("Upgrade"))
            up += !strcasecmp(val, "websocket") ? 1 : 2;
        else if (IS("Connection"))
            conn += list_has(val, "upgrade") ? 1 : 2;
        else if (IS("Sec-WebSocket-Accept"))
            accept += !strcmp(val, acc) ? 1 : 2;
        else if (IS("Sec-WebSocket-Protocol"))
            proto += which == C_2 && !strcmp(val, "game") ? 1 : 2;
        else if (IS("Sec-WebSocket-Extensions") || IS("Content-Length") || IS("Transfer-Encoding"))
            return false;
#undef IS
    }
    if (l != head + hl - 2)
        return false; /* a line began with a lone CR */
    return up == 1 && conn == 1 && accept == 1 && proto == (which == C_2 ? 1 : 0);
}

/* A line of the head that starts (at its first column) with name,
 * case-insensitively; its rest in *rest. */
static bool line_starts(const uint8_t *line, size_t len, const char *name)
{
    size_t nl = strlen(name);
    return len >= nl && !strncasecmp((const char *)line, name, nl);
}

/* Surely no valid 101, by the loosest reading: no client may connect. */
static bool surely_invalid(const uint8_t *a, size_t n, int which, const char *acc, size_t cap)
{
    size_t lim = n < cap ? n : cap;
    if (!head_end_loose(a, lim))
        return true; /* no head within the cap */
    /* The status line: the first one that is not empty. */
    size_t i = 0;
    while (i < lim && (a[i] == '\r' || a[i] == '\n'))
        i++;
    const uint8_t *nl = memchr(a + i, '\n', lim - i);
    size_t sl = nl ? (size_t)(nl - (a + i)) : lim - i;
    if (!find(a + i, sl, "101"))
        return true;
    if (!find(a, lim, acc) || !find_ci(a, lim, "websocket"))
        return true;
    if (which == C_2 && !find(a, lim, "game"))
        return true;
    bool folded = false, conn_upgrade = false;
    for (size_t p = (size_t)(nl ? nl - a + 1 : lim); p < lim;) {
        const uint8_t *e = memchr(a + p, '\n', lim - p);
        size_t ll = e ? (size_t)(e - (a + p)) : lim - p;
        const uint8_t *line = a + p;
        if (ll && (line[0] == ' ' || line[0] == '\t'))
            folded = true;
        if (line_starts(line, ll, "connection") && find_ci(line + 10, ll - 10, "upgrade"))
            conn_upgrade = true;
        /* A header the client did not ask for, with a value. */
        static const char ext[] = "sec-websocket-extensions:", proto[] = "sec-websocket-protocol:";
        const char *bad = line_starts(line, ll, ext)                     ? ext
                          : which == C_1 && line_starts(line, ll, proto) ? proto
                                                                         : NULL;
        if (bad)
            for (size_t k = strlen(bad); k < ll; k++)
                if (line[k] != ' ' && line[k] != '\t' && line[k] != '\r')
                    return true;
        p += ll + 1;
    }
    return !conn_upgrade && !folded; /* RFC 6455 4.1: no Connection: Upgrade, the client fails */
}

/* Takes what connects to the raw listener within the deadline; -1 if none. */
static int raw_accept(uint64_t us)
{
    patience p = patience_start(us);
    for (;;) {
        int fd = accept4(g_raw, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0)
            return fd;
        if (patience_out(&p))
            return -1;
        struct pollfd pf = { .fd = g_raw, .events = POLLIN };
        poll(&pf, 1, 10);
    }
}

static void client_mode(uint8_t mode, const uint8_t *in, size_t n)
{
    int which = (mode >> 1) & 1;
    size_t cap = which ? CAP_B : CAP_A;
    unsigned deadline_ms = which ? DEADLINE_B_MS : DEADLINE_A_MS;
    static attempt a;
    memset(&a, 0, sizeof a);
    if (cp_client_connect_data(g_cli[which], &a) != 0)
        fail("cp_client_connect_data failed", 0, 0);
    int fd = raw_accept(PATIENCE_US);
    if (fd < 0)
        fail("the client did not connect to the harness within 1.5 s", 0, 0);
    uint8_t rq[2048];
    size_t rl = 0;
    read_until(fd, rq, &rl, sizeof rq - 1, now_us() + PATIENCE_US, head_done);
    rq[rl] = '\0';
    if (!find(rq, rl, "\r\n\r\n"))
        fail("the client's request did not come whole", (long)rl, 0);
    char acc[29];
    request_check((const char *)rq, which, acc);
    /* The answer: the input, 0x01 standing for the accept key. */
    static uint8_t ansb[IN_MAX * 28 / 8 + 64];
    size_t an = 0;
    for (size_t i = 0; i < n && an + 28 < sizeof ansb; i++) {
        if (in[i] == 0x01) {
            memcpy(ansb + an, acc, 28);
            an += 28;
        } else {
            ansb[an++] = in[i];
        }
    }
    size_t total = an;
    if (mode & 0x20) { /* a frame behind the answer, in the same write */
        static const uint8_t fr[] = { 0x82, 9,   9,   0,  (uint8_t)ID_PROBE, (uint8_t)(ID_PROBE >> 8), 'h',
                                      'e',  'l', 'l', 'o' };
        memcpy(ansb + total, fr, sizeof fr);
        total += sizeof fr;
    }
    uint64_t t0 = now_us();
    size_t sent = send_cut(fd, ansb, total, mode, deadline_ms);
    if (mode & 0x40) {
        close(fd);
        fd = -1;
    }
    patience p = patience_start((uint64_t)deadline_ms * 1000 + PATIENCE_US);
    while (!atomic_load(&a.connected) && !atomic_load(&a.failed)) {
        if (patience_out(&p))
            fail("the client's connect neither connected nor failed within its deadline", (long)an,
                 deadline_ms);
        if (fd >= 0) { /* what the client sends meanwhile is read and dropped */
            uint8_t junk[512];
            while (recv(fd, junk, sizeof junk, MSG_DONTWAIT) > 0)
                ;
        }
        sleep_us(1000);
    }
    bool connected = atomic_load(&a.connected);
    int verdict = strictly_valid(ansb, an, which, acc, cap)   ? J_VALID
                  : surely_invalid(ansb, an, which, acc, cap) ? J_INVALID
                                                              : J_UNSURE;
    if (g_trace)
        fprintf(stderr,
                "fuzz_ws_upgrade: client C%d: answer %zu bytes (%zu sent), %s (%s) after %llu ms, verdict "
                "%s: %.*s\n",
                which + 1, an, sent, connected ? "connected" : "failed",
                connected ? "" : cp_strerror(atomic_load(&a.err)),
                (unsigned long long)((now_us() - t0) / 1000),
                verdict == J_VALID     ? "valid"
                : verdict == J_INVALID ? "invalid"
                                       : "unsure",
                (int)(an < 200 ? an : 200), (const char *)ansb);
    if (connected && verdict == J_INVALID)
        fail("the client connected on an answer that is no valid 101", (long)an, 0);
    if (!connected && verdict == J_VALID && sent == total)
        fail("the client refused a valid 101", (long)an, 0);
    /* A frame right behind a valid answer (nothing else after its head) must arrive. */
    const uint8_t *he = find(ansb, an, "\r\n\r\n");
    if (connected && (mode & 0x20) && sent == total && verdict == J_VALID && he == ansb + an - 4) {
        patience q = patience_start(PATIENCE_US);
        while (!atomic_load(&a.probe))
            if (patience_out(&q))
                fail("a frame that came with the 101 did not reach on_packet", 0, 0);
            else
                sleep_us(1000);
    }
    if (fd >= 0)
        close_reset(fd);
    if (connected) {
        patience q = patience_start(END_WAIT_US);
        while (!atomic_load(&a.disconnected))
            if (patience_out(&q))
                fail("a client session did not end after the server's socket closed", 0, 0);
            else
                sleep_us(1000);
    }
    while (atomic_load(&a.inside))
        sched_yield();
}

/* ------------------------------------------------------------------ libFuzzer */

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static cp_ws *ws_make(const cp_ws_opts *wo)
{
    cp_ws *ws;
    int rc = cp_ws_create(&ws, wo);
    if (rc != 0) {
        fprintf(stderr, "fuzz_ws_upgrade: cp_ws_create: %s\n", cp_strerror(rc));
        exit(1);
    }
    return ws;
}

static void servers_start(void)
{
    static const char *const origins[] = { "http://ok.example", NULL };
    cp_ws_opts wo[S_COUNT] = { { .path = "/ws",
                                 .origins = origins,
                                 .subprotocol = "game",
                                 .page = PAGE,
                                 .on_upgrade = on_upgrade,
                                 .upgrade_timeout_ms = DEADLINE_A_MS },
                               { .max_request = CAP_B, .upgrade_timeout_ms = DEADLINE_B_MS } };
    cp_handlers h = { .on_connected = srv_connected,
                      .on_packet = srv_packet,
                      .on_disconnected = srv_disconnected };
    for (int i = 0; i < S_COUNT; i++) {
        cp_server_opts o = { .host = "127.0.0.1", .port = 0 };
        o.session.framing = CP_FRAMING_PACKET;
        o.session.max_packet = MAX_PACKET;
        o.session.ws = ws_make(&wo[i]);
        int rc = cp_server_start(&g_srv[i], g_port, &o, &h, NULL);
        cp_ws_unref(o.session.ws);
        if (rc != 0) {
            fprintf(stderr, "fuzz_ws_upgrade: cp_server_start: %s\n", cp_strerror(rc));
            exit(1);
        }
        g_srv_listen[i] = listener_fd_of(cp_service_listen_port(g_srv[i]));
    }
}

static void clients_start(void)
{
    g_raw = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t al = sizeof a;
    if (g_raw < 0 || bind(g_raw, (struct sockaddr *)&a, sizeof a) != 0 || listen(g_raw, 16) != 0 ||
        getsockname(g_raw, (struct sockaddr *)&a, &al) != 0) {
        perror("fuzz_ws_upgrade: the raw listener");
        exit(1);
    }
    g_raw_port = ntohs(a.sin_port);
    cp_ws_opts wo[C_COUNT] = {
        { .path = "/c", .upgrade_timeout_ms = DEADLINE_A_MS },
        { .path = "/c", .subprotocol = "game", .max_request = CAP_B, .upgrade_timeout_ms = DEADLINE_B_MS }
    };
    cp_handlers h = { .on_connected = cli_connected,
                      .on_packet = cli_packet,
                      .on_disconnected = cli_disconnected,
                      .on_connect_error = cli_connect_error };
    for (int i = 0; i < C_COUNT; i++) {
        cp_client_opts o = { .host = "127.0.0.1", .port = g_raw_port, .sessions = 0 };
        o.session.framing = CP_FRAMING_PACKET;
        o.session.max_packet = MAX_PACKET;
        o.session.ws = ws_make(&wo[i]);
        int rc = cp_client_start(&g_cli[i], g_port, &o, &h, NULL);
        cp_ws_unref(o.session.ws);
        if (rc != 0) {
            fprintf(stderr, "fuzz_ws_upgrade: cp_client_start: %s\n", cp_strerror(rc));
            exit(1);
        }
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    signal(SIGPIPE, SIG_IGN);
    g_trace = getenv("FUZZ_WS_TRACE") != NULL;
    cp_port_opts po = { .workers = 2 };
    int rc = cp_port_create(&g_port, &po);
    if (rc != 0) {
        fprintf(stderr, "fuzz_ws_upgrade: cp_port_create: %s\n", cp_strerror(rc));
        exit(1);
    }
    servers_start();
    clients_start();
    fprintf(stderr, "fuzz_ws_upgrade: backend %s, servers on ports %u (A) and %u (B), clients to port %u\n",
            cp_port_backend_name(g_port), cp_service_listen_port(g_srv[S_A]),
            cp_service_listen_port(g_srv[S_B]), g_raw_port);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || size > IN_MAX)
        return 0;
    g_rnd = (uint32_t)size * 0x01000193u;
    uint8_t mode = data[0];
    if (mode & 1)
        client_mode(mode, data + 1, size - 1);
    else
        server_mode(mode, data + 1, size - 1);
    cp_service *all[S_COUNT + C_COUNT] = { g_srv[S_A], g_srv[S_B], g_cli[C_1], g_cli[C_2] };
    int fds[S_COUNT + C_COUNT] = { g_srv_listen[S_A], g_srv_listen[S_B], -1, -1 };
    recs_wait_ended(all, fds, S_COUNT + C_COUNT, END_WAIT_US);
    recs_release();
    return 0;
}
