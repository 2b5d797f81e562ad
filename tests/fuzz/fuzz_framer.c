/* SPDX-License-Identifier: MIT */
/*
 * fuzz_framer: cport's real {u16 size, u16 id} framing (src/net/packet.c,
 * cp__session_input) under libFuzzer, through a real server on 127.0.0.1.
 *
 * The process runs two cport servers (CP_FRAMING_PACKET, max_packet 1024 and
 * 65535), created once in LLVMFuzzerInitialize. Each input is one TCP
 * connection:
 *
 *   byte 0      bit 0: which server (0: max_packet 1024, 1: 65535)
 *               bits 1-3: number of split points k (0..7)
 *   bytes 1..k  chunk lengths: b < 0x80 -> b + 1 bytes, else ((b & 0x7f) + 1) * 64
 *   the rest    the byte stream; cut into the k chunks, the remainder last
 *
 * Each chunk is sent with its own send(), and the next one only after the
 * server has received every byte so far (its stats.bytes_in, which is counted
 * just before the bytes are parsed), so the server parses exactly these
 * chunks (or finer ones). Then the client half-closes and waits for
 * on_disconnected.
 *
 * An independent reference parser computes the expected packets and the
 * expected end: CP_REASON_BAD_HEADER (size < 4) or CP_REASON_TOO_BIG (size >
 * max_packet) at the first bad header found at a packet boundary, else
 * CP_REASON_PEER_CLOSED. on_packet checks every packet against the list (id,
 * length = size - 4, body bytes) and the end checks the count and the reason;
 * any difference abort()s, which libFuzzer reports as a crash with the input.
 */
#include <cport.h>

#include "fuzz_common.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_PKTS 70000

typedef struct ref_pkt {
    uint16_t id;
    uint32_t off; /* body offset in the stream */
    uint32_t len; /* body length */
} ref_pkt;

static cp_port *g_port;
static cp_service *g_svc[2];
static const uint32_t g_max[2] = { 1024, 65535 };

/* The current input's expectations and what the server reported. */
static struct {
    const uint8_t *stream;
    size_t stream_len;
    ref_pkt *pkts;
    size_t npkts;
    cp_reason reason;
    _Atomic(cp_session *) s;
    atomic_size_t got; /* packets handed out */
    atomic_int connected, disconnected;
    atomic_int got_reason;
    sem_t done;
} cur;

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void fail(const char *what, long a, long b)
{
    fprintf(stderr, "fuzz_framer: MISMATCH: %s (%ld vs %ld)\n", what, a, b);
    abort();
}

static void on_connected(cp_session *s)
{
    if (atomic_fetch_add(&cur.connected, 1) != 0)
        fail("second on_connected within one input", 1, 0);
    atomic_store(&cur.s, s);
}

static int on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    if (s != atomic_load(&cur.s))
        fail("packet for a session that is not the current one", 0, 0);
    if (atomic_load(&cur.disconnected))
        fail("on_packet after on_disconnected", 0, 0);
    size_t i = atomic_fetch_add(&cur.got, 1);
    if (i >= cur.npkts)
        fail("more packets than the reference parser found", (long)i + 1, (long)cur.npkts);
    const ref_pkt *r = &cur.pkts[i];
    if (id != r->id)
        fail("packet id", id, r->id);
    if (len != r->len)
        fail("packet body length", (long)len, (long)r->len);
    if (len && memcmp(body, cur.stream + r->off, len) != 0)
        fail("packet body bytes", (long)i, 0);
    return 0;
}

static void on_disconnected(cp_session *s, cp_reason reason, int err)
{
    (void)err;
    if (s != atomic_load(&cur.s))
        fail("on_disconnected for a session that is not the current one", 0, 0);
    if (atomic_fetch_add(&cur.disconnected, 1) != 0)
        fail("second on_disconnected", 2, 1);
    atomic_store(&cur.got_reason, (int)reason);
    sem_post(&cur.done);
}


int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    sem_init(&cur.done, 0, 0);
    cur.pkts = malloc(sizeof(ref_pkt) * MAX_PKTS);
    cp_port_opts po = { .workers = 2 };
    int rc = cp_port_create(&g_port, &po);
    if (rc != 0) {
        fprintf(stderr, "fuzz_framer: cp_port_create: %s\n", cp_strerror(rc));
        exit(1);
    }
    cp_handlers h = { .on_connected = on_connected,
                      .on_packet = on_packet,
                      .on_disconnected = on_disconnected };
    for (int i = 0; i < 2; i++) {
        cp_server_opts o = { .host = "127.0.0.1", .port = 0 };
        o.session.framing = CP_FRAMING_PACKET;
        o.session.max_packet = g_max[i];
        rc = cp_server_start(&g_svc[i], g_port, &o, &h, NULL);
        if (rc != 0) {
            fprintf(stderr, "fuzz_framer: cp_server_start: %s\n", cp_strerror(rc));
            exit(1);
        }
    }
    fprintf(stderr, "fuzz_framer: backend %s, servers on ports %u (max 1024) and %u (max 65535)\n",
            cp_port_backend_name(g_port), cp_service_listen_port(g_svc[0]), cp_service_listen_port(g_svc[1]));
    return 0;
}

/* The reference parser: an independent reading of the framing rules. */
static void reference(const uint8_t *p, size_t n, uint32_t max)
{
    size_t off = 0;
    cur.npkts = 0;
    cur.reason = CP_REASON_PEER_CLOSED;
    while (n - off >= 4) {
        uint32_t size = (uint32_t)p[off] | (uint32_t)p[off + 1] << 8;
        uint16_t id = (uint16_t)(p[off + 2] | p[off + 3] << 8);
        if (size < 4) {
            cur.reason = CP_REASON_BAD_HEADER;
            return;
        }
        if (size > max) {
            cur.reason = CP_REASON_TOO_BIG;
            return;
        }
        if (n - off < size)
            return; /* unfinished packet, then EOF */
        cur.pkts[cur.npkts++] = (ref_pkt){ .id = id, .off = (uint32_t)off + 4, .len = size - 4 };
        off += size;
    }
}

static uint64_t bytes_in(cp_service *svc)
{
    cp_service_stats st;
    cp_service_stats_get(svc, &st);
    return st.bytes_in;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || size > 300000)
        return 0;
    int which = data[0] & 1;
    int k = (data[0] >> 1) & 7;
    size_t pos = 1;
    size_t chunk[9];
    int nchunks = 0;
    for (int i = 0; i < k && pos < size; i++, pos++) {
        uint8_t b = data[pos];
        chunk[nchunks++] = b < 0x80 ? (size_t)b + 1 : ((size_t)(b & 0x7f) + 1) * 64;
    }
    const uint8_t *stream = data + pos;
    size_t n = size - pos;
    if (n / 4 + 1 > MAX_PKTS)
        return 0;

    cp_service *svc = g_svc[which];
    cur.stream = stream;
    cur.stream_len = n;
    reference(stream, n, g_max[which]);
    atomic_store(&cur.s, NULL);
    atomic_store(&cur.got, 0);
    atomic_store(&cur.connected, 0);
    atomic_store(&cur.disconnected, 0);
    atomic_store(&cur.got_reason, -1);

    uint64_t base = bytes_in(svc);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        fail("socket", errno, 0);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET,
                             .sin_port = htons(cp_service_listen_port(svc)),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (connect_retry(fd, (struct sockaddr *)&a, sizeof a) != 0)
        fail("connect", errno, 0);

    size_t sent = 0;
    int ci = 0;
    while (sent < n && !atomic_load(&cur.disconnected)) {
        size_t len = ci < nchunks ? chunk[ci] : n - sent;
        ci++;
        if (len > n - sent)
            len = n - sent;
        size_t done = 0;
        while (done < len) {
            ssize_t w = send(fd, stream + sent + done, len - done, MSG_NOSIGNAL);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                break; /* the server closed on us (bad header): fine */
            }
            done += (size_t)w;
        }
        if (done < len)
            break;
        sent += len;
        /* Wait until the server has read all of it, so the next chunk arrives
         * in a later receive. */
        uint64_t deadline = now_ms() + 10000;
        while (bytes_in(svc) - base < sent && !atomic_load(&cur.disconnected)) {
            if (now_ms() > deadline)
                fail("server did not read the bytes sent within 10 s", (long)(bytes_in(svc) - base),
                     (long)sent);
            sched_yield();
        }
    }
    shutdown(fd, SHUT_WR);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 10;
    while (sem_timedwait(&cur.done, &ts) != 0) {
        if (errno != EINTR)
            fail("no on_disconnected within 10 s", 0, 0);
    }
    close(fd);

    if (atomic_load(&cur.connected) != 1)
        fail("on_connected count", atomic_load(&cur.connected), 1);
    if (atomic_load(&cur.got) != cur.npkts)
        fail("packets handed out", (long)atomic_load(&cur.got), (long)cur.npkts);
    int r = atomic_load(&cur.got_reason);
    if (r != (int)cur.reason)
        fail(cp_reason_str((cp_reason)r), r, (long)cur.reason);
    return 0;
}
