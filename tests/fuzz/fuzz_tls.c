/* SPDX-License-Identifier: MIT */
/*
 * fuzz_tls: a real cport TLS server session fed arbitrary ciphertext and
 * handshake bytes, mixed with real TLS 1.3 and 1.2 clients, under libFuzzer
 * (+ ASan + UBSan).
 *
 * The process runs one cport TLS server on 127.0.0.1 (CP_FRAMING_PACKET,
 * max_packet 1024, send queue limit 64 KiB so overflows happen, a 30 ms
 * partial-packet timeout, a 200 ms handshake timeout, one new handshake per
 * worker per round so hellos wait their turn), created once in
 * LLVMFuzzerInitialize with a self-signed P-256 certificate made there (and
 * a second one for cp_tls_reload), written to a mkdtemp directory that is
 * removed at exit. The clients are OpenSSL's, on non-blocking sockets driven
 * with poll and deadlines, so no operation can hang. Each input is a script
 * of at most 96 operations on up to 4 client connections:
 *
 *   op byte: bits 5-6 the connection, bits 0-4 the operation (mod OP_COUNT)
 *    0 connect (arg bit 0: SO_RCVBUF 4096, so server sends back up)
 *    1 send arg bytes of the input, raw (garbage hellos, junk in the record stream)
 *    2 send one raw record: type arg, a 2-byte length, body from the input (zero-padded)
 *    3 send a real ClientHello only (arg: the handshake's flags, below)
 *    4 a whole real client handshake, or the rest of one begun by 3 (arg: flags)
 *    5 a valid packet through TLS (id arg, body arg*4; arg 255: id 0xdead, whose
 *      handler returns -1)
 *    6 arg%16+1 packets through TLS in one SSL_write (the server echoes a burst)
 *    7 read through TLS for up to arg%8 ms, checking what comes back
 *    8 close_notify                               9 KeyUpdate (arg bit 0: update requested)
 *   10 renegotiation (TLS 1.2; the server refuses it)
 *   11 shutdown(SHUT_WR)                         12 close with SO_LINGER 0 (reset)
 *   13 close                                     14 sleep arg*4 us (arg 255: 250 ms,
 *                                                   past the handshake timeout)
 *   15 cp_session_disconnect (arg bit 0: cp_service_disconnect_id)
 *   16 cp_session_shutdown (graceful: close_notify after the queue), 100 ms
 *   17 server sends, (arg bits 2-3) + 1 of them back to back; arg bits 0-1 what:
 *      packet-shaped junk of 8 KiB, of 20 KiB (one buffer larger than a record),
 *      of (arg >> 4) + 1 KiB (cp_session_send_copy), or cp_service_send_to of a
 *      small packet
 *   18 cp_service_broadcast of a small packet (TLS members encrypt it each)
 *   19 cp_tls_reload with the other certificate
 *   20 part of a packet through TLS (its header and half its body, arg as in 5):
 *      the server's framer waits, then the packet timeout ends the session
 *   21 a ClientHello on every connection that has none, all made first and then
 *      written back to back, so that hellos meet the handshake budget (arg: flags;
 *      bit 7: then reset the last of them at once)
 *   22 sync: read until every echo owed has come; while the client's stream is
 *      whole (no raw bytes in it) and its server session connected (not shut down
 *      or disconnected by an operation), they must come within 2 s
 *
 *   handshake flags: bit 0 TLS 1.2 (else 1.3), bits 1-2 the cipher suite, bit 3 resume
 *   the session the server's ticket gave in this input, bit 4 512-byte records, bit 5
 *   no SNI, bit 6 TLS 1.3 record padding, bit 7 refuse tickets.
 *
 * The server's on_packet echoes packets with an odd id. Checked (abort() on a
 * violation, which libFuzzer reports with the input): every session's
 * callbacks never overlap, no callback after on_disconnected, on_disconnected
 * exactly once per on_connected (a session whose handshake failed gets
 * neither), a connected session reports its TLS version, what a client reads
 * is well-framed and its echoes are byte-identical and in order (while its
 * own writes all went out whole), and after the input (every client socket
 * closed) the server reaches on_connected == on_disconnected and
 * stats.sessions == 0, with nothing left in its accept queue, within 5 s. ASan/UBSan catch memory errors.
 *
 * FUZZ_TLS_TRACE=1 in the environment prints each operation with its
 * client's state, and the server's disconnect reasons after each input:
 *   FUZZ_TLS_TRACE=1 build-fuzz/fuzz_tls -runs=1 tests/fuzz/corpus/fuzz_tls/resume
 */
#include <cport.h>

#include "fuzz_common.h"

#include <arpa/inet.h>
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
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#define NCONN 4
#define MAX_OPS 96
#define MAX_RECS 512
#define MAX_PACKET 1024
/* Ids the server sends by itself: even, so the client never takes them for echoes. */
#define ID_JUNK 0x8000
#define ID_BCAST 0x8002
#define ID_SENDTO 0x8004
#define ID_HANDLER_FAILS 0xdead
/* A script stops taking operations after this long, so that one input stays
 * far below libFuzzer's -timeout however many slow operations it holds. */
#define SCRIPT_BUDGET_US 3000000u
#define END_WAIT_US 5000000u
#define IO_DEADLINE_US 400000u /* a client handshake, write or renegotiation */

enum {
    OP_CONNECT,
    OP_RAW,
    OP_RAW_RECORD,
    OP_HELLO,
    OP_HANDSHAKE,
    OP_PACKET,
    OP_BURST,
    OP_READ,
    OP_CLOSE_NOTIFY,
    OP_KEY_UPDATE,
    OP_RENEGOTIATE,
    OP_SHUT_WR,
    OP_RESET,
    OP_CLOSE,
    OP_SLEEP,
    OP_SRV_DISCONNECT,
    OP_SRV_SHUTDOWN,
    OP_SRV_SEND,
    OP_BROADCAST,
    OP_RELOAD,
    OP_PARTIAL,
    OP_HELLO_ALL,
    OP_SYNC,
    OP_COUNT
};

static const char *const op_names[OP_COUNT] = { "connect",      "raw",        "raw-record",  "hello",
                                                "handshake",    "packet",     "burst",       "read",
                                                "close-notify", "key-update", "renegotiate", "shut-wr",
                                                "reset",        "close",      "sleep",       "srv-disconnect",
                                                "srv-shutdown", "srv-send",   "broadcast",   "reload",
                                                "partial",      "hello-all",  "sync" };

/* FUZZ_TLS_TRACE=1: each operation and its client's state, and how the
 * input's sessions ended, on stderr (to see what a seed or a finding does). */
static int g_trace;

static void fail(const char *what, long a, long b)
{
    fprintf(stderr, "fuzz_tls: VIOLATION: %s (%ld, %ld)\n", what, a, b);
    abort();
}

/* ------------------------------------------------------------------ the server */

typedef struct rec {
    cp_session *s; /* referenced in on_connected, unref'd after the input */
    uint64_t id;
    atomic_int state;  /* 0 connected, 1 disconnected */
    atomic_int inside; /* a callback of this session is running */
} rec;

static cp_port *g_port;
static cp_service *g_svc;
static cp_tls *g_tls;
static _Atomic(rec *) g_by_port[65536];
static rec *g_recs[MAX_RECS];
static atomic_int g_nrecs;
static atomic_long g_connected, g_disconnected;
static uint8_t g_junk[20 * 1024];

static void enter(cp_session *s, rec **out)
{
    rec *r = cp_session_data(s);
    if (!r)
        fail("callback of a session without a record (never connected?)", 0, 0);
    if (atomic_load(&r->state) != 0)
        fail("callback after on_disconnected", 0, 0);
    if (atomic_fetch_add(&r->inside, 1) != 0)
        fail("callbacks of one session overlap", 0, 0);
    *out = r;
}

static void leave(rec *r) { atomic_fetch_sub(&r->inside, 1); }

static void on_connected(cp_session *s)
{
    if (cp_session_data(s))
        fail("on_connected twice", 0, 0);
    cp_tls_info ti;
    int rc = cp_session_tls_info(s, &ti);
    if (rc != 0 || (strcmp(ti.version, "TLSv1.3") != 0 && strcmp(ti.version, "TLSv1.2") != 0))
        fail("a connected session does not report its TLS version", rc, 0);
    rec *r = calloc(1, sizeof *r);
    if (!r)
        abort();
    r->s = s;
    r->id = cp_session_id(s);
    cp_session_ref(s);
    cp_session_set_data(s, r);
    int i = atomic_fetch_add(&g_nrecs, 1);
    if (i >= MAX_RECS)
        fail("too many sessions in one input", i, MAX_RECS);
    g_recs[i] = r;
    char peer[64];
    if (cp_session_peer(s, peer, sizeof peer) > 0) {
        char *c = strrchr(peer, ':');
        if (c)
            atomic_store(&g_by_port[atoi(c + 1) & 0xffff], r);
    }
    atomic_fetch_add(&g_connected, 1);
}

static int on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    rec *r;
    enter(s, &r);
    int rc = 0;
    if (id == ID_HANDLER_FAILS) {
        rc = -1;
    } else if (id & 1) {
        cp_sendbuf *b = cp_packet_make(id, body, len);
        if (b) {
            cp_session_send(s, b);
            cp_sendbuf_unref(b);
        }
    }
    leave(r);
    return rc;
}

static void on_sent(cp_session *s, size_t bytes)
{
    (void)bytes;
    rec *r;
    enter(s, &r);
    leave(r);
}

static void on_disconnected(cp_session *s, cp_reason reason, int err)
{
    rec *r;
    enter(s, &r);
    if (reason <= CP_REASON_NONE || reason >= CP_REASON_COUNT_)
        fail("reason out of range", reason, err);
    if (reason == CP_REASON_HANDSHAKE_TIMEOUT)
        fail("a connected session ended by the handshake timeout", reason, err);
    if (cp_session_send_copy(s, "x", 1) != -ENOTCONN)
        fail("send inside on_disconnected did not return -ENOTCONN", 0, 0);
    leave(r);
    atomic_store(&r->state, 1);
    atomic_fetch_add(&g_disconnected, 1);
}

/* ------------------------------------------------------------------ certificates */

static char g_dir[64];
static char g_cert[2][128], g_key[2][128];

/* A self-signed P-256 certificate for "localhost" and its key, as PEM files. */
static int make_cert(const char *cert_path, const char *key_path, long serial)
{
    EVP_PKEY *pk = EVP_EC_gen("P-256");
    X509 *x = X509_new();
    int ok = pk && x && X509_set_version(x, 2) && ASN1_INTEGER_set(X509_get_serialNumber(x), serial) &&
             X509_gmtime_adj(X509_getm_notBefore(x), -3600) &&
             X509_gmtime_adj(X509_getm_notAfter(x), 30L * 24 * 3600) && X509_set_pubkey(x, pk) &&
             X509_NAME_add_entry_by_txt(X509_get_subject_name(x), "CN", MBSTRING_ASC,
                                        (const unsigned char *)"localhost", -1, -1, 0) &&
             X509_set_issuer_name(x, X509_get_subject_name(x)) && X509_sign(x, pk, EVP_sha256()) > 0;
    FILE *cf = ok ? fopen(cert_path, "w") : NULL;
    FILE *kf = ok ? fopen(key_path, "w") : NULL;
    ok = cf && kf && PEM_write_X509(cf, x) && PEM_write_PrivateKey(kf, pk, NULL, NULL, 0, NULL, NULL);
    if (cf)
        ok = (fclose(cf) == 0) && ok;
    if (kf)
        ok = (fclose(kf) == 0) && ok;
    X509_free(x);
    EVP_PKEY_free(pk);
    return ok ? 0 : -1;
}

static void certs_remove(void)
{
    for (int i = 0; i < 2; i++) {
        unlink(g_cert[i]);
        unlink(g_key[i]);
    }
    rmdir(g_dir);
}

static void certs_make(void)
{
    snprintf(g_dir, sizeof g_dir, "/tmp/fuzz_tls.XXXXXX");
    if (!mkdtemp(g_dir)) {
        perror("fuzz_tls: mkdtemp");
        exit(1);
    }
    for (int i = 0; i < 2; i++) {
        snprintf(g_cert[i], sizeof g_cert[i], "%s/cert%d.pem", g_dir, i);
        snprintf(g_key[i], sizeof g_key[i], "%s/key%d.pem", g_dir, i);
    }
    atexit(certs_remove);
    if (make_cert(g_cert[0], g_key[0], 1) != 0 || make_cert(g_cert[1], g_key[1], 2) != 0) {
        fprintf(stderr, "fuzz_tls: cannot make the test certificates\n");
        exit(1);
    }
}

/* ------------------------------------------------------------------ the clients' OpenSSL */

static SSL_CTX *g_cctx;
/* The sessions the server's tickets gave in this input, by version (0: 1.3, 1: 1.2):
 * cleared before each input, so an input replays the same. */
static SSL_SESSION *g_resume[2];

/* A copy: OpenSSL marks the connection's own session not resumable when
 * the connection is freed without a shutdown, as these clients' are. */
static int on_new_session(SSL *ssl, SSL_SESSION *sess)
{
    int v = SSL_version(ssl) == TLS1_2_VERSION;
    SSL_SESSION *copy = SSL_SESSION_dup(sess);
    if (copy) {
        SSL_SESSION_free(g_resume[v]);
        g_resume[v] = copy;
    }
    return 0; /* the connection keeps its own */
}

static void resume_clear(void)
{
    for (int v = 0; v < 2; v++) {
        SSL_SESSION_free(g_resume[v]);
        g_resume[v] = NULL;
    }
}

static void client_ctx_make(void)
{
    g_cctx = SSL_CTX_new(TLS_client_method());
    if (!g_cctx)
        exit(1);
    SSL_CTX_set_verify(g_cctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(g_cctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(g_cctx, on_new_session);
}

static const char *const suites13[4] = { "TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                                         "TLS_CHACHA20_POLY1305_SHA256",
                                         /* not enabled on the server: no common suite */
                                         "TLS_AES_128_CCM_SHA256" };
static const char *const ciphers12[4] = { "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                                          "ECDHE-ECDSA-CHACHA20-POLY1305",
                                          /* CBC, MAC-then-encrypt or encrypt-then-MAC */
                                          "ECDHE-ECDSA-AES128-SHA" };

/* ------------------------------------------------------------------ client connections */

#define EXPECT_MAX 256

typedef struct conn {
    int fd;
    uint16_t lport;
    SSL *ssl;
    bool up;         /* the client's handshake finished */
    bool dead;       /* the TLS stream is broken or closed for the client: no more SSL calls */
    bool hello_only; /* op 3 sent the ClientHello; the client does not read yet */
    bool srv_closed; /* an operation disconnected or shut down its server session */
    /* Raw bytes went out: the server may wait for the rest of a record they
     * began, with nothing to time it out, so its silence is no failure. */
    bool raw_sent;
    bool verify; /* what this client wrote went out whole: its echoes must come back */
    uint32_t seq;
    /* Echoes owed: id, body length, the body's seed. */
    struct {
        uint16_t id, len;
        uint8_t seed;
    } exp[EXPECT_MAX];
    uint32_t ehead, elen;
    /* The client's framer: plaintext not yet a whole packet. */
    uint8_t rx[2 * (MAX_PACKET + 4)];
    size_t rx_len;
} conn;

static conn g_cs[NCONN];

static rec *rec_of(const conn *c)
{
    if (c->lport == 0)
        return NULL;
    return atomic_load(&g_by_port[c->lport]);
}

static void conn_connect(conn *c, int small_rcvbuf)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (small_rcvbuf) {
        int sz = 4096;
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
    }
    struct sockaddr_in a = { .sin_family = AF_INET,
                             .sin_port = htons(cp_service_listen_port(g_svc)),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (connect_retry(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return;
    }
    /* Non-blocking from here: every wait is a poll with a deadline. */
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    struct sockaddr_in l;
    socklen_t ll = sizeof l;
    getsockname(fd, (struct sockaddr *)&l, &ll);
    *c = (conn){ .fd = fd, .lport = ntohs(l.sin_port) };
}

static void conn_close(conn *c, int reset)
{
    if (c->fd < 0)
        return;
    SSL_free(c->ssl); /* sends nothing */
    c->ssl = NULL;
    if (reset) {
        struct linger lg = { .l_onoff = 1, .l_linger = 0 };
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    close(c->fd);
    c->fd = -1;
}

/* The client's TLS stream is over for it (an error, a timeout, close_notify):
 * what it wrote may have been cut, so its echoes are no longer owed. */
static void conn_broken(conn *c)
{
    c->dead = true;
    c->verify = false;
    ERR_clear_error();
}

/* After an SSL call returned r: wait for what it wants, until deadline;
 * false when it failed or the time is up. */
static bool io_wait(conn *c, int r, uint64_t deadline)
{
    int e = SSL_get_error(c->ssl, r);
    short ev = e == SSL_ERROR_WANT_READ ? POLLIN : e == SSL_ERROR_WANT_WRITE ? POLLOUT : 0;
    uint64_t now = now_us();
    if (!ev || now >= deadline)
        return false;
    struct pollfd pf = { .fd = c->fd, .events = ev };
    poll(&pf, 1, (int)((deadline - now + 999) / 1000)); /* EINTR: the caller retries */
    return true;
}

static bool usable(const conn *c) { return c->fd >= 0 && c->ssl && c->up && !c->dead; }

/* One SSL_write of the whole buffer, within the deadline. */
static bool tls_write(conn *c, const void *p, size_t n)
{
    uint64_t deadline = now_us() + IO_DEADLINE_US;
    for (;;) {
        ERR_clear_error();
        size_t done = 0;
        int r = SSL_write_ex(c->ssl, p, n, &done);
        if (r == 1)
            return true;
        if (!io_wait(c, r, deadline)) {
            conn_broken(c);
            return false;
        }
    }
}

/* ------------------------------------------------------------------ packets */

static size_t packet_fill(uint8_t *p, uint16_t id, size_t body, uint8_t seed)
{
    p[0] = (uint8_t)(body + 4);
    p[1] = (uint8_t)((body + 4) >> 8);
    p[2] = (uint8_t)id;
    p[3] = (uint8_t)(id >> 8);
    for (size_t i = 0; i < body; i++)
        p[4 + i] = (uint8_t)(seed + i * 7);
    return body + 4;
}

static void expect_push(conn *c, uint16_t id, size_t len, uint8_t seed)
{
    if (!(id & 1) || id == ID_HANDLER_FAILS || !c->verify)
        return;
    if (c->elen == EXPECT_MAX) {
        c->verify = false; /* too many owed to track: stop checking this client */
        return;
    }
    uint32_t i = (c->ehead + c->elen++) % EXPECT_MAX;
    c->exp[i].id = id;
    c->exp[i].len = (uint16_t)len;
    c->exp[i].seed = seed;
}

/* One packet the client read: the server's own sends are skipped, an echo
 * must be the next one owed, byte for byte. */
static void packet_check(conn *c, uint16_t id, const uint8_t *body, size_t len)
{
    if (id == ID_JUNK || id == ID_BCAST || id == ID_SENDTO)
        return;
    if (!(id & 1) || id > 0xff)
        fail("the client read a packet nobody sent", id, (long)len);
    if (!c->verify)
        return;
    if (!c->elen)
        fail("an echo of a packet never sent", id, (long)len);
    uint32_t i = c->ehead;
    if (c->exp[i].id != id || c->exp[i].len != len)
        fail("an echo's id or length differs from the next packet owed", id, (long)len);
    for (size_t k = 0; k < len; k++)
        if (body[k] != (uint8_t)(c->exp[i].seed + k * 7))
            fail("an echo's body differs from what was sent", id, (long)k);
    c->ehead = (c->ehead + 1) % EXPECT_MAX;
    c->elen--;
}

/* Plaintext the client read, through its framer. */
static void client_input(conn *c, const uint8_t *p, size_t n)
{
    while (n) {
        size_t take = sizeof c->rx - c->rx_len;
        if (take > n)
            take = n;
        memcpy(c->rx + c->rx_len, p, take);
        c->rx_len += take;
        p += take;
        n -= take;
        size_t off = 0;
        while (c->rx_len - off >= 4) {
            size_t size = (size_t)c->rx[off] | (size_t)c->rx[off + 1] << 8;
            uint16_t id = (uint16_t)(c->rx[off + 2] | c->rx[off + 3] << 8);
            if (size < 4 || size > MAX_PACKET + 4)
                fail("the server sent a badly framed packet", (long)size, id);
            if (c->rx_len - off < size)
                break;
            packet_check(c, id, c->rx + off + 4, size - 4);
            off += size;
        }
        memmove(c->rx, c->rx + off, c->rx_len - off);
        c->rx_len -= off;
    }
}

/* ------------------------------------------------------------------ operations */

static void raw_send(conn *c, const uint8_t *p, size_t n)
{
    if (c->fd >= 0 && n)
        send(c->fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
}

/* A new client SSL on the connection, set up by the handshake flags. */
static bool ssl_make(conn *c, uint8_t flags)
{
    ERR_clear_error();
    c->ssl = SSL_new(g_cctx);
    if (!c->ssl || !SSL_set_fd(c->ssl, c->fd)) {
        conn_broken(c);
        return false;
    }
    int v12 = flags & 1;
    int ver = v12 ? TLS1_2_VERSION : TLS1_3_VERSION;
    SSL_set_min_proto_version(c->ssl, ver);
    SSL_set_max_proto_version(c->ssl, ver);
    if (v12)
        SSL_set_cipher_list(c->ssl, ciphers12[(flags >> 1) & 3]);
    else
        SSL_set_ciphersuites(c->ssl, suites13[(flags >> 1) & 3]);
    if ((flags & 8) && g_resume[v12])
        SSL_set_session(c->ssl, g_resume[v12]);
    if (flags & 16)
        SSL_set_max_send_fragment(c->ssl, 512);
    if (!(flags & 32))
        SSL_set_tlsext_host_name(c->ssl, "localhost");
    if (flags & 64)
        SSL_set_block_padding(c->ssl, 256);
    if (flags & 128)
        SSL_set_options(c->ssl, SSL_OP_NO_TICKET);
    SSL_set_connect_state(c->ssl);
    ERR_clear_error();
    return true;
}

/* The ClientHello alone, made into hello (at most cap bytes): the client
 * reads from an empty memory BIO for now and writes into another, so its
 * first step makes the hello and stops there, however fast the server
 * answers; the caller sends it. Later writes go to the socket, and op 4
 * gives the client the socket to read and goes on. Returns the hello's
 * length, 0 if none was made. */
static size_t hello_make(conn *c, uint8_t flags, uint8_t *hello, size_t cap)
{
    if (c->fd < 0 || c->ssl || c->dead || !ssl_make(c, flags))
        return 0;
    BIO *empty = BIO_new(BIO_s_mem());
    BIO *made = BIO_new(BIO_s_mem());
    if (!empty || !made) {
        BIO_free(empty);
        BIO_free(made);
        conn_broken(c);
        return 0;
    }
    BIO_set_mem_eof_return(empty, -1); /* empty means "wait", not the end */
    SSL_set0_rbio(c->ssl, empty);
    SSL_set0_wbio(c->ssl, made);
    c->hello_only = true;
    ERR_clear_error();
    int r = SSL_do_handshake(c->ssl);
    size_t n = 0;
    if (SSL_get_error(c->ssl, r) == SSL_ERROR_WANT_READ) {
        int got = BIO_read(made, hello, (int)cap);
        n = got > 0 ? (size_t)got : 0;
    }
    BIO *sock = BIO_new_socket(c->fd, BIO_NOCLOSE);
    if (n == 0 || !sock) {
        BIO_free(sock);
        conn_broken(c);
        return 0;
    }
    SSL_set0_wbio(c->ssl, sock);
    ERR_clear_error();
    return n;
}

static void op_hello(conn *c, uint8_t flags)
{
    uint8_t hello[4096];
    raw_send(c, hello, hello_make(c, flags, hello, sizeof hello));
}

/* Hellos on every connection that has none, sent back to back. */
static void op_hello_all(uint8_t arg)
{
    static uint8_t hello[NCONN][4096];
    size_t len[NCONN];
    int last = -1;
    for (int i = 0; i < NCONN; i++) {
        len[i] = hello_make(&g_cs[i], arg & 127, hello[i], sizeof hello[i]);
        if (len[i])
            last = i;
    }
    for (int i = 0; i < NCONN; i++)
        raw_send(&g_cs[i], hello[i], len[i]);
    if ((arg & 128) && last >= 0)
        conn_close(&g_cs[last], 1);
}

static void op_handshake(conn *c, uint8_t flags)
{
    if (c->fd < 0 || c->dead || c->up || (!c->ssl && !ssl_make(c, flags)))
        return;
    if (c->hello_only) {
        BIO *sock = BIO_new_socket(c->fd, BIO_NOCLOSE);
        if (!sock) {
            conn_broken(c);
            return;
        }
        SSL_set0_rbio(c->ssl, sock);
        c->hello_only = false;
    }
    uint64_t deadline = now_us() + IO_DEADLINE_US;
    for (;;) {
        ERR_clear_error();
        int r = SSL_do_handshake(c->ssl);
        if (r == 1)
            break;
        if (!io_wait(c, r, deadline)) {
            conn_broken(c);
            return;
        }
    }
    ERR_clear_error();
    c->up = true;
    c->verify = true;
    /* The server's on_connected follows its read of our last flight: wait
     * for it (briefly) so that server-side operations find the session. */
    uint64_t until = now_us() + 200000;
    while (!rec_of(c) && now_us() < until)
        sched_yield();
}

static void op_packet(conn *c, uint8_t arg)
{
    if (!usable(c))
        return;
    uint8_t buf[4 + MAX_PACKET];
    uint16_t id = arg == 255 ? ID_HANDLER_FAILS : arg;
    size_t body = (size_t)arg * 4;
    uint8_t seed = (uint8_t)c->seq++;
    size_t n = packet_fill(buf, id, body, seed);
    if (tls_write(c, buf, n))
        expect_push(c, id, body, seed);
}

/* The server's framer now holds part of a packet: what this client sends
 * next completes it with other bytes, so its echoes are no longer checked. */
static void op_partial(conn *c, uint8_t arg)
{
    if (!usable(c))
        return;
    uint8_t buf[4 + MAX_PACKET];
    size_t n = packet_fill(buf, arg, (size_t)arg * 4, (uint8_t)c->seq++);
    c->verify = false;
    tls_write(c, buf, 4 + (n - 4) / 2);
}

static void op_burst(conn *c, uint8_t arg)
{
    if (!usable(c))
        return;
    static uint8_t buf[16 * (4 + 256)];
    int count = arg % 16 + 1;
    size_t n = 0;
    struct {
        uint16_t id, len;
        uint8_t seed;
    } sent[16];
    for (int k = 0; k < count; k++) {
        uint16_t id = (uint16_t)((arg + k * 3) & 0xff);
        size_t body = (size_t)((arg * 13 + k * 37) % 257);
        uint8_t seed = (uint8_t)c->seq++;
        n += packet_fill(buf + n, id, body, seed);
        sent[k].id = id;
        sent[k].len = (uint16_t)body;
        sent[k].seed = seed;
    }
    if (tls_write(c, buf, n))
        for (int k = 0; k < count; k++)
            expect_push(c, sent[k].id, sent[k].len, sent[k].seed);
}

/* Reads what comes until the deadline; false when the stream ended for the
 * client (the server's close_notify, an alert, the end of the stream). */
static bool read_until(conn *c, uint64_t deadline)
{
    uint8_t buf[16384];
    for (;;) {
        ERR_clear_error();
        size_t got = 0;
        int r = SSL_read_ex(c->ssl, buf, sizeof buf, &got);
        if (r == 1) {
            client_input(c, buf, got);
            continue;
        }
        int e = SSL_get_error(c->ssl, r);
        if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
            conn_broken(c);
            return false;
        }
        if (!io_wait(c, r, deadline)) {
            ERR_clear_error();
            return true;
        }
    }
}

static void op_read(conn *c, uint8_t arg)
{
    if (usable(c))
        read_until(c, now_us() + (uint64_t)(arg % 8) * 1000);
}

/* The echoes owed must come while nothing excuses them: a server session
 * that stays connected and was not told to stop, a client whose writes all
 * went out whole and whose stream is still open. */
static void op_sync(conn *c)
{
    if (!usable(c) || !c->verify)
        return;
    patience p = patience_start(2000000);
    while (c->elen && !patience_out(&p))
        if (!read_until(c, now_us() + 10000))
            return; /* the server ended the stream: what it still owed is excused */
    rec *r = rec_of(c);
    if (c->elen && c->verify && !c->srv_closed && !c->raw_sent && r && atomic_load(&r->state) == 0)
        fail("echoes owed to a connected session did not come within 2 s", (long)c->elen, 0);
}

static void op_close_notify(conn *c)
{
    if (!usable(c))
        return;
    ERR_clear_error();
    (void)SSL_shutdown(c->ssl); /* queues and writes close_notify; no wait for the answer */
    conn_broken(c);
}

static void op_key_update(conn *c, uint8_t arg)
{
    if (!usable(c) || SSL_version(c->ssl) != TLS1_3_VERSION)
        return;
    ERR_clear_error();
    if (!SSL_key_update(c->ssl, (arg & 1) ? SSL_KEY_UPDATE_REQUESTED : SSL_KEY_UPDATE_NOT_REQUESTED)) {
        ERR_clear_error();
        return;
    }
    /* SSL_do_handshake sends the KeyUpdate now. */
    uint64_t deadline = now_us() + IO_DEADLINE_US;
    for (;;) {
        ERR_clear_error();
        int r = SSL_do_handshake(c->ssl);
        if (r == 1)
            break;
        if (!io_wait(c, r, deadline)) {
            conn_broken(c);
            return;
        }
    }
    ERR_clear_error();
}

/* The server refuses (a no_renegotiation alert, or a fatal one): the
 * client's handshake fails or stalls; either way its stream is over for us,
 * and the server must neither crash nor stop serving the others. */
static void op_renegotiate(conn *c)
{
    if (!usable(c) || SSL_version(c->ssl) != TLS1_2_VERSION)
        return;
    ERR_clear_error();
    if (!SSL_renegotiate(c->ssl)) {
        ERR_clear_error();
        return;
    }
    c->verify = false; /* the renegotiation's reads may swallow echoes */
    uint64_t deadline = now_us() + IO_DEADLINE_US / 2;
    for (;;) {
        ERR_clear_error();
        int r = SSL_do_handshake(c->ssl);
        if (r == 1)
            break;
        if (!io_wait(c, r, deadline)) {
            conn_broken(c);
            return;
        }
    }
    ERR_clear_error();
}


/* A record header of the input's choosing, then its body from the input,
 * padded with zeros to the length the header gives. Returns the input
 * bytes used. */
static size_t op_raw_record(conn *c, const uint8_t *in, size_t avail)
{
    if (avail < 3)
        return avail;
    static uint8_t rec_buf[5 + 65535];
    size_t len = (size_t)in[1] << 8 | in[2];
    rec_buf[0] = in[0];
    rec_buf[1] = 3;
    rec_buf[2] = (in[0] & 1) ? 1 : 3; /* TLS 1.0 (a ClientHello's) or 1.2 */
    rec_buf[3] = (uint8_t)(len >> 8);
    rec_buf[4] = (uint8_t)len;
    size_t body = avail - 3 < len ? avail - 3 : len;
    memcpy(rec_buf + 5, in + 3, body);
    memset(rec_buf + 5 + body, 0, len - body);
    raw_send(c, rec_buf, 5 + len);
    return 3 + body;
}

static void server_op(conn *c, int kind, uint8_t arg)
{
    rec *r = rec_of(c);
    if (!r)
        return;
    switch (kind) {
    case OP_SRV_DISCONNECT:
        c->srv_closed = true;
        if (arg & 1)
            cp_service_disconnect_id(g_svc, r->id);
        else
            cp_session_disconnect(r->s);
        break;
    case OP_SRV_SHUTDOWN:
        c->srv_closed = true;
        cp_session_shutdown(r->s, 100);
        break;
    case OP_SRV_SEND:
        for (int k = 0; k <= ((arg >> 2) & 3); k++) {
            if ((arg & 3) == 2) {
                cp_sendbuf *pb = cp_packet_make(ID_SENDTO, "to", 2);
                cp_service_send_to(g_svc, r->id, pb);
                cp_sendbuf_unref(pb);
            } else {
                static const size_t sizes[4] = { 8192, sizeof g_junk, 0, 0 };
                size_t n = (arg & 3) == 3 ? (size_t)((arg >> 4) + 1) * 1024 : sizes[arg & 3];
                cp_session_send_copy(r->s, g_junk, n);
            }
        }
        break;
    }
}

static void do_op(int kind, conn *c, const uint8_t *data, size_t size, size_t *pos)
{
    uint8_t arg = *pos < size ? data[*pos] : 0;
    switch (kind) {
    case OP_CONNECT:
        (*pos)++;
        if (c->fd < 0)
            conn_connect(c, arg & 1);
        break;
    case OP_RAW: {
        (*pos)++;
        size_t n = arg;
        if (n > size - *pos)
            n = size - *pos;
        c->raw_sent = c->raw_sent || (c->fd >= 0 && n);
        raw_send(c, data + *pos, n);
        *pos += n;
        break;
    }
    case OP_RAW_RECORD:
        c->raw_sent = c->raw_sent || c->fd >= 0;
        *pos += op_raw_record(c, data + *pos, size - *pos);
        break;
    case OP_HELLO: (*pos)++, op_hello(c, arg); break;
    case OP_HANDSHAKE: (*pos)++, op_handshake(c, arg); break;
    case OP_PACKET: (*pos)++, op_packet(c, arg); break;
    case OP_BURST: (*pos)++, op_burst(c, arg); break;
    case OP_READ: (*pos)++, op_read(c, arg); break;
    case OP_CLOSE_NOTIFY: op_close_notify(c); break;
    case OP_KEY_UPDATE: (*pos)++, op_key_update(c, arg); break;
    case OP_RENEGOTIATE: op_renegotiate(c); break;
    case OP_SHUT_WR:
        if (c->fd >= 0)
            shutdown(c->fd, SHUT_WR);
        break;
    case OP_RESET: conn_close(c, 1); break;
    case OP_CLOSE: conn_close(c, 0); break;
    case OP_SLEEP:
        (*pos)++;
        sleep_us(arg == 255 ? 250000 : (uint64_t)arg * 4);
        break;
    case OP_SRV_DISCONNECT:
    case OP_SRV_SEND: (*pos)++, server_op(c, kind, arg); break;
    case OP_SRV_SHUTDOWN: server_op(c, kind, 0); break;
    case OP_BROADCAST: {
        cp_sendbuf *pb = cp_packet_make(ID_BCAST, "bcast", 5);
        cp_service_broadcast(g_svc, pb);
        cp_sendbuf_unref(pb);
        break;
    }
    case OP_PARTIAL: (*pos)++, op_partial(c, arg); break;
    case OP_HELLO_ALL: (*pos)++, op_hello_all(arg); break;
    case OP_SYNC: op_sync(c); break;
    case OP_RELOAD: {
        static int which;
        which ^= 1;
        if (cp_tls_reload(g_tls, g_cert[which], g_key[which]) != 0)
            fail("cp_tls_reload of a good certificate failed", which, 0);
        break;
    }
    }
}

/* The server's listening socket (fuzz_common.h), to read its accept queue:
 * a TLS session has no on_connected to wait for at connect. */
static int g_listen_fd = -1;

/* ------------------------------------------------------------------ libFuzzer */

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    /* OpenSSL's socket BIO writes with write(): a peer's reset must not
     * kill the fuzzer. */
    signal(SIGPIPE, SIG_IGN);
    g_trace = getenv("FUZZ_TLS_TRACE") != NULL;
    /* Packet-shaped junk for server sends: 64-byte packets of an even id. */
    for (size_t i = 0; i < sizeof g_junk; i += 64) {
        g_junk[i] = 64;
        g_junk[i + 1] = 0;
        g_junk[i + 2] = (uint8_t)ID_JUNK;
        g_junk[i + 3] = (uint8_t)(ID_JUNK >> 8);
        memset(g_junk + i + 4, 'j', 60);
    }
    certs_make();
    client_ctx_make();
    cp_tls_opts to = { .cert_file = g_cert[0],
                       .key_file = g_key[0],
                       .handshake_timeout_ms = 200,
                       .handshakes_per_round = 1 };
    int rc = cp_tls_create(&g_tls, &to);
    if (rc != 0) {
        fprintf(stderr, "fuzz_tls: cp_tls_create: %s\n", cp_strerror(rc));
        exit(1);
    }
    cp_port_opts po = { .workers = 2 };
    rc = cp_port_create(&g_port, &po);
    if (rc != 0) {
        fprintf(stderr, "fuzz_tls: cp_port_create: %s\n", cp_strerror(rc));
        exit(1);
    }
    cp_handlers h = { .on_connected = on_connected,
                      .on_packet = on_packet,
                      .on_sent = on_sent,
                      .on_disconnected = on_disconnected };
    cp_server_opts o = { .host = "127.0.0.1", .port = 0 };
    o.session.framing = CP_FRAMING_PACKET;
    o.session.max_packet = MAX_PACKET;
    o.session.send_queue_limit = 64 * 1024;
    o.session.packet_timeout_ms = 30;
    o.session.tls = g_tls;
    rc = cp_server_start(&g_svc, g_port, &o, &h, NULL);
    if (rc != 0) {
        fprintf(stderr, "fuzz_tls: cp_server_start: %s\n", cp_strerror(rc));
        exit(1);
    }
    g_listen_fd = listener_fd_of(cp_service_listen_port(g_svc));
    fprintf(stderr, "fuzz_tls: backend %s, TLS server on port %u (listener fd %d), certificates in %s\n",
            cp_port_backend_name(g_port), cp_service_listen_port(g_svc), g_listen_fd, g_dir);
    return 0;
}

/* Every session must end: on_connected == on_disconnected, nothing live,
 * nothing left to accept. */
static void wait_all_ended(const uint16_t *used_ports, int nused)
{
    patience p = patience_start(END_WAIT_US);
    cp_service_stats st;
    for (;;) {
        cp_service_stats_get(g_svc, &st);
        long con = atomic_load(&g_connected), dis = atomic_load(&g_disconnected);
        if (con == dis && st.sessions == 0 && st.connected == (uint64_t)con &&
            st.disconnected == (uint64_t)dis && accept_backlog(g_listen_fd) == 0) {
            /* An accept just taken may not be in the table yet (io_uring
             * posts it for the listener's worker to handle): look again. */
            sleep_us(2000);
            cp_service_stats_get(g_svc, &st);
            if (st.sessions == 0 && accept_backlog(g_listen_fd) == 0)
                return;
            continue;
        }
        if (patience_out(&p)) {
            fprintf(stderr,
                    "fuzz_tls: on_connected %ld on_disconnected %ld, stats: sessions %llu "
                    "connected %llu disconnected %llu, to accept %u (this thread stalled %llu ms "
                    "meanwhile, not counted)\n",
                    con, dis, (unsigned long long)st.sessions, (unsigned long long)st.connected,
                    (unsigned long long)st.disconnected, accept_backlog(g_listen_fd),
                    (unsigned long long)(p.stalled / 1000));
            int nr = atomic_load(&g_nrecs);
            for (int i = 0; i < nr; i++)
                for (int j = 0; j < nused; j++)
                    if (g_recs[i] && atomic_load(&g_recs[i]->state) == 0 &&
                        atomic_load(&g_by_port[used_ports[j]]) == g_recs[i])
                        fprintf(stderr,
                                "fuzz_tls: still live: the session of connect #%d of this input "
                                "(client port %u)\n",
                                j, used_ports[j]);
            fail("sessions did not all end within 5 s of the clients closing", con, dis);
        }
        sleep_us(1000);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint16_t used_ports[MAX_OPS];
    int nused = 0;
    for (int i = 0; i < NCONN; i++)
        g_cs[i] = (conn){ .fd = -1 };
    resume_clear();
    uint64_t stop = now_us() + SCRIPT_BUDGET_US;
    size_t pos = 0;
    for (int op = 0; op < MAX_OPS && pos < size && now_us() < stop; op++) {
        uint8_t b = data[pos++];
        conn *c = &g_cs[(b >> 5) & 3];
        int kind = (b & 31) % OP_COUNT;
        bool was_open = c->fd >= 0;
        do_op(kind, c, data, size, &pos);
        if (g_trace)
            fprintf(stderr,
                    "fuzz_tls: op %d %-14s conn %d: fd %d up %d%s dead %d verify %d owed %u server %s\n", op,
                    op_names[kind], (b >> 5) & 3, c->fd, c->up,
                    c->ssl && c->up && SSL_session_reused(c->ssl) ? " (resumed)" : "", c->dead, c->verify,
                    c->elen, rec_of(c) ? "connected" : "-");
        if (!was_open && c->fd >= 0)
            used_ports[nused++] = c->lport;
    }
    for (int i = 0; i < NCONN; i++)
        conn_close(&g_cs[i], 0);
    resume_clear();
    ERR_clear_error();

    wait_all_ended(used_ports, nused);
    if (g_trace) {
        cp_service_stats st;
        cp_service_stats_get(g_svc, &st);
        fprintf(stderr, "fuzz_tls: so far: connected %llu;", (unsigned long long)st.connected);
        for (int i = 1; i < CP_REASON_COUNT_; i++)
            if (st.by_reason[i])
                fprintf(stderr, " %s %llu", cp_reason_str((cp_reason)i), (unsigned long long)st.by_reason[i]);
        fprintf(stderr, "\n");
    }
    int n = atomic_load(&g_nrecs);
    for (int i = 0; i < n; i++) {
        rec *r = g_recs[i];
        if (atomic_load(&r->state) != 1)
            fail("a session ended without on_disconnected", i, 0);
        cp_session_unref(r->s);
        free(r);
        g_recs[i] = NULL;
    }
    atomic_store(&g_nrecs, 0);
    for (int i = 0; i < nused; i++)
        atomic_store(&g_by_port[used_ports[i]], NULL);
    return 0;
}
