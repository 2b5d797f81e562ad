/* SPDX-License-Identifier: MIT */
/*
 * fuzz_ws_frames: real cport WebSocket server sessions fed scripts of
 * frames by raw TCP clients, under libFuzzer (+ ASan + UBSan).
 *
 * The process runs two cport WebSocket servers on 127.0.0.1, created once
 * in LLVMFuzzerInitialize, both CP_FRAMING_PACKET with max_packet 1024 and
 * a send queue limit of 512 KiB, echoing packets of an odd id:
 *   listener 0 "ping": binary messages only (text closes with 1003),
 *     max_message = max_packet (1024), and the library's pings every 60 ms
 *     (no pong by the next one closes with 1008);
 *   listener 1 "text": text messages allowed (valid UTF-8, else 1007),
 *     max_message 3000, no pings.
 * The clients are raw sockets, non-blocking, driven with poll and
 * deadlines, so no operation can hang. Each connects and completes a valid
 * upgrade (RFC 6455's example key; the 101 and its accept key are checked),
 * then follows the input's script: at most 96 operations on up to 4
 * connections:
 *
 *   op byte: bits 5-6 the connection, bits 0-4 the operation (mod OP_COUNT);
 *   most take the next byte as their argument (arg)
 *    0 connect and upgrade (arg bit 0: listener 1, else 0; bit 1: SO_RCVBUF
 *      4096, so server sends back up; bit 2: the request in two writes;
 *      bit 3: in two writes three ping intervals apart, a slow upgrade)
 *    1 a message of packets, valid unless the stream makes it otherwise (arg:
 *      bits 0-2 packets - 1, bits 3-5 frames - 1, bit 6 a ping between two
 *      of its frames, bit 7 text), then a byte: bits 0-5 how its bytes are
 *      cut into writes (below), bits 6-7 the length form of its frames (0
 *      shortest, 1 16-bit, 2 64-bit, 3 mixed: longer forms than needed are
 *      accepted, as most servers do)
 *    2 a frame of the input's choosing: three bytes, b0 (FIN, RSV, opcode as
 *      sent), spec, len; spec bits 0-1 the length form (7-bit, 16-bit,
 *      64-bit, 64-bit with its top bit set), bit 2 unmasked, bits 3-4 the
 *      payload (0 the packet stream, UTF-8 when the frame is text; 1 input
 *      bytes; 2 the packet stream with one invalid UTF-8 sequence at byte
 *      len/2; 3 zeros), bit 5 partial (the frame's last part waits for the
 *      next write of this connection), bits 6-7 how it is cut into writes
 *      (0 whole, 1 the header byte by byte, 2 chunks of 1-16 bytes, 3 three
 *      random cuts); len: 0-199 as is, 200-254 (len - 199) * 1200, 255 in
 *      the 64-bit forms 2^32 (past any limit); the 7-bit form clips to 125
 *    3 arg bytes of the input, as they are
 *    4 ping with an arg-byte payload (126-255: over the control limit)
 *    5 unsolicited pong with an (arg % 126)-byte payload
 *    6 Close: arg bits 0-4 the code (a table of valid, invalid and reserved
 *      codes, no body, a 1-byte body), bits 5-7 the reason (none, ASCII,
 *      multi-byte, invalid UTF-8, a truncated sequence, over 125 bytes in all,
 *      exactly 125 in all, a surrogate)
 *    7 read for arg % 8 ms
 *    8 sync (below)
 *    9 sleep arg * 4 us (arg 255: 250 ms, past the ping listener's pong limit)
 *   10 shutdown(SHUT_WR)                 11 close with SO_LINGER 0 (reset)
 *   12 close                             13 cp_session_disconnect (arg bit 0:
 *                                           cp_service_disconnect_id)
 *   14 cp_session_shutdown, 100 ms       15 server sends as in fuzz_tls: arg
 *                                           bits 0-1 8 KiB, 20 KiB, (arg >> 4)
 *                                           + 1 KiB of packet-shaped junk, or a
 *                                           small cp_service_send_to; bits 2-3
 *                                           how many (1-4)
 *   16 cp_service_broadcast of a small packet on both listeners
 *   17 send the part of a partial frame that waits
 *   18 wait for the server's ping: on the ping listener, while the stream is
 *      healthy, reading (and answering pings) for four intervals must bring
 *      one, or the stream's end
 *
 * Write cuts (message and frame operations, 6 bits): bits 0-1 the mode as
 * for frames above, bits 2-5 the chunk size of mode 2. Between the pieces
 * the client yields, so the server mostly reads them apart.
 *
 * The packet stream: the data payloads a connection sends form one stream
 * of packets ({u16 size, u16 id}, a body) made by a generator seeded at
 * connect, so that packets span frames and messages; in text frames the
 * packets it begins are valid UTF-8 (ids and sizes below 128, bodies with
 * 2-, 3- and 4-byte sequences that frames may cut).
 *
 * A model of the server's reading, independent of src/ws/ws.c, is fed the
 * exact bytes each client sent: RFC 6455's rules for a server (masking,
 * reserved bits and opcodes, fragmentation and control frames in between,
 * continuation of nothing, control frames over 125 bytes or fragmented,
 * Close bodies: their length, code and UTF-8 reason, UTF-8 of text
 * messages, max_message) and the packet framer (size < 4, size > max_packet,
 * the handler that fails on id 0xdead). It knows which echoes the server
 * owes, which pongs, and how the stream ends: with which Close codes (the
 * set of every rule a frame breaks, so either order of checks passes), and
 * whether that Close is ws's own (after the echoes of everything before
 * the bad frame) or a hard close's (best effort, echoes dropped). Where the
 * server's reads decide (a text frame whose invalid UTF-8 may have been
 * read with bytes before it, which are then dropped), the model allows each
 * outcome.
 *
 * Checked (abort() on a violation, which libFuzzer reports with the input):
 * before each operation, every client's descriptor still is its socket
 * (the library shares our descriptor table); every session's callbacks
 * never overlap, no callback after
 * on_disconnected, on_disconnected exactly once per on_connected (which
 * runs before the 101 is written), its reason one a WebSocket session can
 * have; what a client reads is strictly well-formed (server frames
 * unmasked, whole, shortest lengths, known opcodes, nothing after a Close,
 * each binary message whole packets); echoes come back byte-identical and
 * in order, and pongs carry their ping's payload; a sync, and the end of
 * each input for every connection still open, waits (2 s, not counting
 * stalls of this thread) until: a healthy stream has had every echo and
 * pong owed; a stream the model ended has had its Close (for ws's own
 * Close: with a code of the model's set, after every echo owed before it,
 * and never an end of the stream without it), or for a hard close its
 * Close or its end. Excused: what server-side operations, the ping
 * listener's 1008 and a backed-up connection (the server's queue may pause
 * its reading, or overflow) explain. After the input (every client socket
 * closed) both servers reach on_connected == on_disconnected and no live
 * session, with nothing left to accept, within 5 s; a stream that ended
 * with ws's own Close ended its session with CP_REASON_WEBSOCKET (a
 * violation) or CP_REASON_PEER_CLOSED (the client's Close).
 *
 * FUZZ_WS_TRACE=1 in the environment prints each operation with its
 * connection's state and the server's sessions as they come and go, and
 * FUZZ_WS_DUMP=1 writes what each connection read after its 101 to
 * /tmp/fuzz_ws_dump_<connection>:
 *   FUZZ_WS_TRACE=1 build-fuzz/fuzz_ws_frames -runs=1 tests/fuzz/corpus/fuzz_ws_frames/echo
 */
#define FUZZ_NAME "fuzz_ws_frames"
#include "fuzz_ws.h"

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
#include <unistd.h>

#define NCONN 4
#define MAX_OPS 96
#define MAX_PACKET 1024
#define TEXT_MAX_MESSAGE 3000
#define PING_MS 60
#define SEND_QUEUE_LIMIT (512u * 1024u)
/* Ids the server sends by itself: even, so the client never takes them for echoes. */
#define ID_JUNK 0x8000
#define ID_BCAST 0x8002
#define ID_SENDTO 0x8004
#define ID_HANDLER_FAILS 0xdead
#define SCRIPT_BUDGET_US 3000000u
#define END_WAIT_US 5000000u
#define IO_DEADLINE_US 200000u /* one write */
#define SYNC_US 2000000u
#define UPGRADE_US 1000000u
/* The server may have queued this much for a client that does not read:
 * past it, its reading may pause (send_queue_high) ... */
#define BACKED_UP 32768
/* ... and past this its queue may overflow. */
#define OVERFLOW_RISK (SEND_QUEUE_LIMIT / 4)
#define FRAME_MAX (14 + 70000)
#define EXP_MAX 512 /* echoes owed, at most */
#define PONG_MAX 64

enum { L_PING, L_TEXT, L_COUNT };

enum {
    OP_CONNECT,
    OP_MESSAGE,
    OP_FRAME,
    OP_RAW,
    OP_PING,
    OP_PONG,
    OP_CLOSE,
    OP_READ,
    OP_SYNC,
    OP_SLEEP,
    OP_SHUT_WR,
    OP_RESET,
    OP_CLOSE_SOCKET,
    OP_SRV_DISCONNECT,
    OP_SRV_SHUTDOWN,
    OP_SRV_SEND,
    OP_BROADCAST,
    OP_FLUSH,
    OP_PING_WAIT,
    OP_COUNT
};

static const char *const op_names[OP_COUNT] = { "connect",   "message",        "frame",        "raw",
                                                "ping",      "pong",           "close",        "read",
                                                "sync",      "sleep",          "shut-wr",      "reset",
                                                "close-fd",  "srv-disconnect", "srv-shutdown", "srv-send",
                                                "broadcast", "flush",          "ping-wait" };

static int g_trace, g_dump;

/* ------------------------------------------------------------------ the servers */

static cp_port *g_port;
static cp_service *g_svc[L_COUNT];
static int g_listen_fd[L_COUNT];
static uint8_t g_junk[20 * 1024];

static void on_connected(cp_session *s)
{
    rec_connected(s);
    if (g_trace) {
        char peer[64] = "";
        cp_session_peer(s, peer, sizeof peer);
        fprintf(stderr, "fuzz_ws_frames: server: session %llu of %s connected\n",
                (unsigned long long)cp_session_id(s), peer);
    }
}

static int on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    rec *r;
    rec_enter(s, &r);
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
    rec_leave(r);
    return rc;
}

static void on_sent(cp_session *s, size_t bytes)
{
    (void)bytes;
    rec *r;
    rec_enter(s, &r);
    rec_leave(r);
}

static void on_disconnected(cp_session *s, cp_reason reason, int err)
{
    if (g_trace)
        fprintf(stderr, "fuzz_ws_frames: server: session %llu ends: %s (%d)\n",
                (unsigned long long)cp_session_id(s), cp_reason_str(reason), err);
    rec_disconnected(s, reason, err);
}

/* ------------------------------------------------------------------ UTF-8 (RFC 3629) */

/* One byte at a time; false at the first byte no valid text can have there. */
typedef struct u8check {
    uint8_t need;   /* continuation bytes still due */
    uint8_t lo, hi; /* the range of the next one */
} u8check;

static bool u8_step(u8check *v, uint8_t c)
{
    if (v->need) {
        if (c < v->lo || c > v->hi)
            return false;
        v->need--;
        v->lo = 0x80;
        v->hi = 0xbf;
        return true;
    }
    if (c < 0x80)
        return true;
    uint8_t need = 0, lo = 0x80, hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf)
        need = 1;
    else if (c == 0xe0)
        need = 2, lo = 0xa0; /* no overlong forms */
    else if (c == 0xed)
        need = 2, hi = 0x9f; /* no surrogates */
    else if (c >= 0xe1 && c <= 0xef)
        need = 2;
    else if (c == 0xf0)
        need = 3, lo = 0x90;
    else if (c >= 0xf1 && c <= 0xf3)
        need = 3;
    else if (c == 0xf4)
        need = 3, hi = 0x8f; /* not past U+10FFFF */
    else
        return false;
    *v = (u8check){ need, lo, hi };
    return true;
}

/* ------------------------------------------------------------------ the clients */

/* A small PRNG of the input's: an input replays the same. */
static uint32_t rnd_next(uint32_t *x)
{
    uint32_t v = *x ? *x : 0x9e3779b9u;
    v ^= v << 13;
    v ^= v >> 17;
    v ^= v << 5;
    return *x = v;
}

enum { CODE_NONE = 0 }; /* a Close without a code */

typedef struct codeset {
    uint16_t c[8];
    int n;
} codeset;

static void codes_add(codeset *s, uint16_t code)
{
    for (int i = 0; i < s->n; i++)
        if (s->c[i] == code)
            return;
    if (s->n < 8)
        s->c[s->n++] = code;
}

static bool codes_has(const codeset *s, unsigned code)
{
    for (int i = 0; i < s->n; i++)
        if (s->c[i] == code)
            return true;
    return false;
}

/* The model of the server's reading of one connection's bytes. */
typedef struct model {
    bool allow_text;
    uint64_t max_msg;
    /* How the server's reading of the stream ends, once it does. */
    bool over;     /* it reads no more frames */
    bool graceful; /* with ws's own Close after the echoes owed; else a hard close's */
    codeset codes; /* what that Close may say */
    int answer;    /* over by our valid Close: the code it is answered with (CODE_NONE too); else -1 */
    bool stopped;  /* nothing after this can matter */
    /* Over by a framer error: what the rest could end with instead, had
     * the server's queue paused the framer (its bytes then wait, unread,
     * while frames are still read). */
    codeset late;
    bool fr_in_frame; /* the framer error came in the text frame being read */
    /* The frame being read. */
    uint8_t hdr[14];
    uint8_t hlen;
    bool in_payload;
    uint8_t op, fin;
    uint64_t left;
    uint8_t mask[4];
    uint64_t mpos;
    uint8_t msg_op; /* WS_TEXT or WS_BINARY while a message is unfinished */
    uint64_t msg_len;
    u8check u8;
    uint8_t ctl[125];
    uint8_t ctl_len;
    uint64_t frame_first_echo; /* the first echo the frame being read made */
    /* The packet framer. */
    bool fr_dead;
    uint8_t pk[4 + MAX_PACKET];
    size_t pk_len;
} model;

typedef struct owed_echo {
    uint16_t len;
    bool certain;
    uint8_t bytes[4 + MAX_PACKET];
} owed_echo;

typedef struct owed_pong {
    uint8_t len;
    bool certain;
    uint8_t bytes[125];
} owed_pong;

typedef struct conn {
    int fd;
    uint16_t lport;
    int lis;
    uint32_t rnd;
    bool up;         /* the 101 was read */
    bool ended;      /* the stream ended for the client (EOF, reset) */
    bool wr_shut;    /* shutdown(SHUT_WR), or writes fail */
    bool eof_sent;   /* our FIN reached a server that was still reading: it closes, with no Close */
    bool srv_closed; /* an operation disconnected or shut down its server session */
    bool backed_up;  /* the server may have paused its reading: we did not read enough */
    bool overflow;   /* its send queue may have overflowed */
    bool sent_after_over;
    bool sending;  /* inside a write: no pong now */
    bool verify;   /* echoes are tracked (false once too many were owed) */
    size_t unread; /* what the server may have queued for us and we have not read */
    model m;
    /* What the client reads. */
    ws_reader rd;
    bool got_close;
    unsigned close_code;
    unsigned pings;    /* the server's pings read */
    int strict_reason; /* ws's own Close read as the model said: the reason its session must end with; or -1 */
    uint8_t rx[2 * (4 + MAX_PACKET)];
    size_t rx_len;
    uint64_t ehead, etail; /* echoes owed: [ehead, etail) in g_echo[conn] */
    uint32_t phead, ptail; /* pongs owed */
    bool pong_due;         /* the server pinged while we could not answer */
    uint8_t pong_len, pong_buf[125];
    /* The packet stream's generator. */
    uint8_t gen[4 + MAX_PACKET];
    size_t gen_len, gen_pos;
    /* A partial frame's rest (op 2 bit 5). */
    uint8_t tail[FRAME_MAX];
    size_t tail_len;
} conn;

static conn g_cs[NCONN];
static owed_echo g_echo[NCONN][EXP_MAX];
static owed_pong g_pong[NCONN][PONG_MAX];

static int conn_index(const conn *c) { return (int)(c - g_cs); }

static rec *rec_of(const conn *c) { return rec_by_port(c->lport); }

/* ------------------------------------------------------------------ the model */

static void unread_add(conn *c, size_t bytes)
{
    c->unread += bytes + 256; /* a buffer's overhead in the queue, roughly */
    if (c->unread > BACKED_UP)
        c->backed_up = true;
    if (c->unread > OVERFLOW_RISK)
        c->overflow = true;
}

static void echo_push(conn *c, const uint8_t *pk, size_t len)
{
    if (!c->verify)
        return;
    if (c->etail - c->ehead == EXP_MAX) {
        c->verify = false; /* too many owed to track: stop checking this client */
        return;
    }
    owed_echo *e = &g_echo[conn_index(c)][c->etail++ % EXP_MAX];
    e->len = (uint16_t)len;
    e->certain = true;
    memcpy(e->bytes, pk, len);
}

/* Echoes from the abs-th owed on may not come. */
static void echoes_uncertain_from(conn *c, uint64_t abs)
{
    for (uint64_t i = abs > c->ehead ? abs : c->ehead; i < c->etail; i++)
        g_echo[conn_index(c)][i % EXP_MAX].certain = false;
}

static void pong_push(conn *c, const uint8_t *p, size_t n, bool certain)
{
    if (c->ptail - c->phead == PONG_MAX)
        c->phead++; /* the oldest is no longer required */
    owed_pong *o = &g_pong[conn_index(c)][c->ptail++ % PONG_MAX];
    o->len = (uint8_t)n;
    o->certain = certain;
    memcpy(o->bytes, p, n);
}

/* The stream breaks a rule: the server ends it with one of codes. */
static void m_violation(conn *c, const codeset *codes, bool graceful)
{
    model *m = &c->m;
    if (m->over) {
        for (int i = 0; i < codes->n; i++)
            codes_add(&m->late, codes->c[i]);
    } else {
        m->over = true;
        m->graceful = graceful;
        m->codes = *codes;
    }
    m->stopped = true;
}

static void m_violation1(conn *c, uint16_t code)
{
    codeset s = { { code }, 1 };
    m_violation(c, &s, true);
}

/* The framer fails: a hard close (handler refusal or bad header: 1011,
 * too big: 1009), whose Close is best effort and which drops queued echoes. */
static void fr_error(conn *c, uint16_t code)
{
    model *m = &c->m;
    m->fr_dead = true;
    if (m->over) {
        codes_add(&m->late, code);
        m->stopped = true;
        return;
    }
    m->over = true;
    m->graceful = false;
    m->codes = (codeset){ { code }, 1 };
    echoes_uncertain_from(c, 0);
    m->fr_in_frame = m->msg_op == WS_TEXT;
}

static void fr_byte(conn *c, uint8_t b)
{
    model *m = &c->m;
    m->pk[m->pk_len++] = b;
    if (m->pk_len < 4)
        return;
    size_t size = (size_t)m->pk[0] | (size_t)m->pk[1] << 8;
    if (m->pk_len == 4) {
        if (size < 4) {
            fr_error(c, 1011);
            return;
        }
        if (size > MAX_PACKET) {
            fr_error(c, 1009);
            return;
        }
    }
    if (m->pk_len < size)
        return;
    uint16_t id = (uint16_t)(m->pk[2] | m->pk[3] << 8);
    m->pk_len = 0;
    if (id == ID_HANDLER_FAILS) {
        fr_error(c, 1011);
    } else if (id & 1) {
        echo_push(c, m->pk, size);
        unread_add(c, size + 4);
    }
}

static bool close_code_valid(unsigned code)
{
    return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1011) || (code >= 3000 && code <= 4999);
}

/* A control frame is whole. */
static void m_control_end(conn *c)
{
    model *m = &c->m;
    if (m->op == WS_PING) {
        pong_push(c, m->ctl, m->ctl_len, !m->over);
        unread_add(c, m->ctl_len);
        return;
    }
    if (m->op != WS_CLOSE)
        return;
    codeset s = { { 0 }, 0 };
    if (m->ctl_len == 1) {
        codes_add(&s, 1002);
    } else if (m->ctl_len >= 2) {
        unsigned code = (unsigned)(m->ctl[0] << 8 | m->ctl[1]);
        /* 1012-1014 (registered after RFC 6455) may be taken either way. */
        if (code >= 1012 && code <= 1014)
            codes_add(&s, 1002);
        else if (!close_code_valid(code))
            codes_add(&s, 1002);
        u8check v = { 0 };
        bool ok = true;
        for (size_t i = 2; i < m->ctl_len && ok; i++)
            ok = u8_step(&v, m->ctl[i]);
        if (!ok || v.need)
            codes_add(&s, 1007);
        if (!s.n || (code >= 1012 && code <= 1014)) {
            codes_add(&s, (uint16_t)code); /* answered with the same code */
            if (!m->over)
                m->answer = (int)code;
        }
    } else {
        codes_add(&s, CODE_NONE);
        if (!m->over)
            m->answer = CODE_NONE;
    }
    m_violation(c, &s, true);
}

/* A data frame is whole. */
static void m_data_end(conn *c)
{
    model *m = &c->m;
    m->fr_in_frame = false;
    if (!m->fin)
        return;
    if (m->msg_op == WS_TEXT && m->u8.need)
        m_violation1(c, 1007); /* a truncated sequence at the message's end */
    m->msg_op = 0;
    m->msg_len = 0;
}

/* The header in m->hdr is whole (len its payload's length): the rules a
 * frame's header can break, all of them. */
static void m_header(conn *c, uint64_t len)
{
    model *m = &c->m;
    uint8_t b0 = m->hdr[0];
    m->fin = b0 >> 7;
    m->op = b0 & 0x0f;
    codeset s = { { 0 }, 0 };
    if (b0 & 0x70)
        codes_add(&s, 1002);
    if (m->op >= WS_CLOSE) {
        if (m->op > WS_PONG || !m->fin || len > 125)
            codes_add(&s, 1002);
    } else if (m->op > WS_BINARY) {
        codes_add(&s, 1002);
    } else {
        if ((m->op == WS_CONT) != (m->msg_op != 0))
            codes_add(&s, 1002);
        if (m->op == WS_TEXT && !m->allow_text)
            codes_add(&s, 1003);
        uint64_t total = (m->op == WS_CONT ? m->msg_len : 0) + len;
        if (total > m->max_msg)
            codes_add(&s, 1009);
    }
    if (s.n) {
        m_violation(c, &s, true);
        return;
    }
    if (m->op < WS_CLOSE) {
        if (m->op != WS_CONT) {
            m->msg_op = m->op;
            m->msg_len = 0;
            m->u8 = (u8check){ 0 };
        }
        m->msg_len += len;
        m->frame_first_echo = c->etail;
    }
    memcpy(m->mask, m->hdr + m->hlen - 4, 4);
    m->mpos = 0;
    m->left = len;
    m->ctl_len = 0;
    m->in_payload = true;
    m->hlen = 0;
    if (!len) {
        m->in_payload = false;
        if (m->op >= WS_CLOSE)
            m_control_end(c);
        else
            m_data_end(c);
    }
}

static void m_payload_byte(conn *c, uint8_t b)
{
    model *m = &c->m;
    b ^= m->mask[m->mpos++ & 3];
    m->left--;
    if (m->op >= WS_CLOSE) {
        m->ctl[m->ctl_len++] = b;
    } else if (m->msg_op == WS_TEXT && !u8_step(&m->u8, b)) {
        /* The server drops the whole read this byte came in, which may
         * hold bytes of this frame before it: what they made may not be. */
        if (!m->over) {
            echoes_uncertain_from(c, m->frame_first_echo);
            m_violation1(c, 1007);
        } else if (m->fr_in_frame) {
            codes_add(&m->codes, 1007); /* the framer may never have read its error */
            m->stopped = true;
        } else {
            codes_add(&m->late, 1007);
            m->stopped = true;
        }
        return;
    } else if (!m->fr_dead) {
        fr_byte(c, b);
    }
    if (!m->left) {
        m->in_payload = false;
        if (m->op >= WS_CLOSE)
            m_control_end(c);
        else
            m_data_end(c);
    }
}

static void m_byte(conn *c, uint8_t b)
{
    model *m = &c->m;
    if (m->stopped)
        return;
    if (m->in_payload) {
        m_payload_byte(c, b);
        return;
    }
    m->hdr[m->hlen++] = b;
    if (m->hlen == 2 && !(b & 0x80)) {
        m_violation1(c, 1002); /* a client's frames are masked */
        return;
    }
    if (m->hlen < 2)
        return;
    uint8_t l7 = m->hdr[1] & 0x7f;
    size_t need = 2 + (l7 == 126 ? 2 : l7 == 127 ? 8 : 0) + 4;
    if (m->hlen < need)
        return;
    uint64_t len = l7;
    if (l7 == 126) {
        len = (uint64_t)m->hdr[2] << 8 | m->hdr[3];
    } else if (l7 == 127) {
        len = 0;
        for (int i = 0; i < 8; i++)
            len = len << 8 | m->hdr[2 + i];
        if (len >> 63) {
            m_violation1(c, 1002);
            return;
        }
    }
    m_header(c, len);
}

static void model_feed(conn *c, const uint8_t *p, size_t n)
{
    if (c->m.over)
        c->sent_after_over = true;
    for (size_t i = 0; i < n; i++)
        m_byte(c, p[i]);
}

/* ------------------------------------------------------------------ what the client reads */

static void conn_send_frame(conn *c, uint8_t op, const uint8_t *p, size_t n);

/* A packet read: the server's own are skipped, an echo must be the next one owed. */
static void packet_read(conn *c, const uint8_t *pk, size_t size)
{
    uint16_t id = (uint16_t)(pk[2] | pk[3] << 8);
    if (id == ID_JUNK || id == ID_BCAST || id == ID_SENDTO)
        return;
    if (!(id & 1) || id == ID_HANDLER_FAILS)
        fail("the client read a packet nobody sent", id, (long)size);
    if (!c->verify)
        return;
    if (c->ehead == c->etail)
        fail("an echo of a packet never sent (or sent after the stream ended)", id, (long)size);
    owed_echo *e = &g_echo[conn_index(c)][c->ehead % EXP_MAX];
    if (e->len != size || memcmp(e->bytes, pk, size) != 0)
        fail("an echo differs from the next packet owed", id, (long)size);
    c->ehead++;
}

static void on_binary(void *u, const uint8_t *p, size_t n)
{
    conn *c = u;
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
            if (size < 4 || size > MAX_PACKET + 4)
                fail("the server sent a badly framed packet", (long)size, 0);
            if (c->rx_len - off < size)
                break;
            packet_read(c, c->rx + off, size);
            off += size;
        }
        memmove(c->rx, c->rx + off, c->rx_len - off);
        c->rx_len -= off;
    }
}

static void on_binary_end(void *u)
{
    conn *c = u;
    if (c->rx_len)
        fail("a binary message of the server's ended inside a packet", (long)c->rx_len, 0);
}

static bool echoes_certain_owed(const conn *c)
{
    if (!c->verify)
        return false;
    for (uint64_t i = c->ehead; i < c->etail; i++)
        if (g_echo[conn_index(c)][i % EXP_MAX].certain)
            return true;
    return false;
}

static bool pongs_certain_owed(const conn *c)
{
    for (uint32_t i = c->phead; i < c->ptail; i++)
        if (g_pong[conn_index(c)][i % PONG_MAX].certain)
            return true;
    return false;
}

static void pong_read(conn *c, const uint8_t *p, size_t n)
{
    /* Pongs answer pings in order; a server may skip some (RFC 6455 5.5.3). */
    while (c->phead != c->ptail) {
        owed_pong *o = &g_pong[conn_index(c)][c->phead++ % PONG_MAX];
        if (o->len == n && !memcmp(o->bytes, p, n))
            return;
    }
    fail("a pong that answers no ping", (long)n, 0);
}

/* Codes a server-side cause explains, and whether one may have ended the stream. */
static bool excused_code(const conn *c, unsigned code)
{
    return (c->srv_closed && code == 1000) || (c->lis == L_PING && code == 1008) ||
           (c->overflow && code == 1011) || (c->m.over && c->backed_up && codes_has(&c->m.late, code));
}

static void close_read(conn *c, const uint8_t *p, size_t n)
{
    unsigned code = ws_close_code(p, n);
    u8check v = { 0 };
    for (size_t i = 2; i < n; i++)
        if (!u8_step(&v, p[i]))
            fail("the server's Close reason is not UTF-8", (long)code, 0);
    c->got_close = true;
    c->close_code = code;
    bool modelled = c->m.over && codes_has(&c->m.codes, code);
    bool excused = excused_code(c, code);
    if (!modelled && !excused)
        fail(c->m.over ? "the server's Close code is none the stream's end allows"
                       : "the server closed a valid stream with a Close nothing explains",
             (long)code, c->m.over ? c->m.codes.c[0] : 0);
    if (modelled && !excused && c->m.graceful && !c->backed_up) {
        if (echoes_certain_owed(c))
            fail("ws's Close came before echoes owed from before the bad frame", (long)code,
                 (long)(c->etail - c->ehead));
        if (!c->srv_closed && !c->overflow)
            c->strict_reason = (int)code == c->m.answer ? CP_REASON_PEER_CLOSED : CP_REASON_WEBSOCKET;
    }
}

static void on_control(void *u, uint8_t op, const uint8_t *p, size_t n)
{
    conn *c = u;
    if (op == WS_PING) {
        c->pings++;
        if (c->sending || c->tail_len || c->wr_shut) {
            c->pong_due = true; /* answered when the stream is at a frame's end again */
            c->pong_len = (uint8_t)n;
            memcpy(c->pong_buf, p, n);
        } else {
            conn_send_frame(c, WS_PONG, p, n);
        }
    } else if (op == WS_PONG) {
        pong_read(c, p, n);
    } else if (op == WS_CLOSE) {
        close_read(c, p, n);
    }
}

/* The stream ended for the client (the server's FIN or reset). */
static void stream_ended(conn *c, bool reset)
{
    c->ended = true;
    if (c->got_close)
        return;
    bool excused = c->srv_closed || c->overflow || c->backed_up || c->eof_sent ||
                   (reset && c->sent_after_over);
    if (excused)
        return;
    if (!c->m.over)
        fail(reset ? "the server reset a valid stream" : "the server ended a valid stream", 0, 0);
    if (c->m.graceful)
        fail("the server ended the stream without its Close", c->m.codes.c[0], reset);
}

static void conn_feed(conn *c, const uint8_t *p, size_t n)
{
    ws_reader_cb cb = { .u = c, .binary = on_binary, .binary_end = on_binary_end, .control = on_control };
    c->unread = c->unread > n ? c->unread - n : 0;
    if (g_dump) {
        char path[64];
        snprintf(path, sizeof path, "/tmp/fuzz_ws_dump_%d", conn_index(c));
        FILE *f = fopen(path, "ab");
        if (f) {
            fwrite(p, 1, n, f);
            fclose(f);
        }
    }
    ws_reader_feed(&c->rd, p, n, &cb);
}

/* Reads what is there; false once the stream ended. */
static bool conn_read_now(conn *c)
{
    uint8_t buf[65536];
    for (;;) {
        ssize_t r = recv(c->fd, buf, sizeof buf, MSG_DONTWAIT);
        if (r > 0) {
            conn_feed(c, buf, (size_t)r);
            continue;
        }
        if (r == 0) {
            stream_ended(c, false);
            return false;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            c->unread = 0; /* all of it came */
            return true;
        }
        stream_ended(c, true);
        return false;
    }
}

static void conn_send_due_pong(conn *c);

/* Reads what is there, then waits for more until the deadline, and no
 * longer than that once something came; false once the stream ended. */
static bool conn_read_step(conn *c, uint64_t deadline)
{
    if (c->fd < 0 || !c->up || c->ended || !conn_read_now(c))
        return false;
    conn_send_due_pong(c);
    uint64_t now = now_us();
    if (now < deadline) {
        struct pollfd pf = { .fd = c->fd, .events = POLLIN };
        if (poll(&pf, 1, (int)((deadline - now + 999) / 1000)) > 0 && !conn_read_now(c))
            return false;
        conn_send_due_pong(c);
    }
    return true;
}

/* Reads until the deadline; false once the stream ended. */
static bool conn_read_until(conn *c, uint64_t deadline)
{
    if (c->fd < 0 || !c->up || c->ended)
        return false;
    for (;;) {
        if (!conn_read_now(c))
            return false;
        conn_send_due_pong(c);
        uint64_t now = now_us();
        if (now >= deadline)
            return true;
        struct pollfd pf = { .fd = c->fd, .events = POLLIN };
        poll(&pf, 1, (int)((deadline - now + 999) / 1000));
    }
}

/* ------------------------------------------------------------------ what the client writes */

/* Writes all of p, or what goes within the deadline (reading meanwhile, so
 * that a server waiting for us to read does not hold us up); the model is
 * fed exactly what went. */
static size_t conn_send(conn *c, const uint8_t *p, size_t n)
{
    if (c->fd < 0 || c->wr_shut || !n)
        return 0;
    size_t done = 0;
    uint64_t deadline = now_us() + IO_DEADLINE_US;
    c->sending = true;
    while (done < n) {
        ssize_t r = send(c->fd, p + done, n - done, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r > 0) {
            model_feed(c, p + done, (size_t)r);
            done += (size_t)r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            uint64_t now = now_us();
            if (now >= deadline)
                break;
            struct pollfd pf = { .fd = c->fd, .events = POLLOUT | POLLIN };
            poll(&pf, 1, (int)((deadline - now + 999) / 1000));
            if ((pf.revents & POLLIN) && c->up && !c->ended)
                conn_read_now(c);
            continue;
        }
        c->wr_shut = true; /* the server is gone: nothing more goes out */
        break;
    }
    c->sending = false;
    return done;
}

/* p cut into writes as the 6-bit cut spec says: 0 whole; 1 its first 14
 * bytes (a header) one by one; 2 its first 256 bytes in chunks of (bits
 * 2-5) + 1; 3 three random cuts. */
static void conn_write(conn *c, const uint8_t *p, size_t n, uint8_t cut)
{
    size_t cuts[80], nc = 0;
    int mode = cut & 3;
    size_t chunk = (size_t)((cut >> 2) & 15) + 1;
    if (mode == 1)
        for (size_t i = 1; i < 14 && i < n; i++)
            cuts[nc++] = i;
    if (mode == 2)
        for (size_t i = chunk; i < 256 && i < n && nc < 64; i += chunk)
            cuts[nc++] = i;
    if (mode == 3 && n > 1) {
        for (int i = 0; i < 3; i++)
            cuts[nc++] = 1 + rnd_next(&c->rnd) % (n - 1);
        for (size_t i = 0; i < nc; i++) /* sorted */
            for (size_t j = i + 1; j < nc; j++)
                if (cuts[j] < cuts[i]) {
                    size_t t = cuts[i];
                    cuts[i] = cuts[j];
                    cuts[j] = t;
                }
    }
    cuts[nc++] = n;
    size_t pos = 0;
    for (size_t k = 0; k < nc; k++) {
        if (cuts[k] <= pos)
            continue;
        size_t len = cuts[k] - pos;
        if (conn_send(c, p + pos, len) < len)
            return; /* cut short: the rest is not sent */
        pos = cuts[k];
        if (pos < n) {
            sched_yield(); /* let the server read this piece on its own */
            sched_yield();
        }
    }
}

static void conn_flush_tail(conn *c)
{
    if (!c->tail_len)
        return;
    size_t n = c->tail_len;
    c->tail_len = 0;
    conn_send(c, c->tail, n);
}

static void mask_make(conn *c, uint8_t mask[4])
{
    uint32_t r = rnd_next(&c->rnd);
    if ((r & 15) == 0)
        r = 0; /* sometimes a mask of zeros */
    memcpy(mask, &r, 4);
}

/* A whole frame of ours, written at once (pongs, pings, Close). */
static void conn_send_frame(conn *c, uint8_t op, const uint8_t *p, size_t n)
{
    uint8_t f[14 + 255], mask[4];
    mask_make(c, mask);
    size_t h = ws_head(f, (uint8_t)(0x80 | op), n, n < 126 ? 0 : 1, mask);
    memcpy(f + h, p, n);
    ws_mask(f + h, n, mask);
    conn_send(c, f, h + n);
}

static void conn_send_due_pong(conn *c)
{
    if (!c->pong_due || c->sending || c->tail_len || c->wr_shut || c->fd < 0)
        return;
    c->pong_due = false;
    conn_send_frame(c, WS_PONG, c->pong_buf, c->pong_len);
}

/* ------------------------------------------------------------------ the packet stream */

/* A code point's UTF-8 of n bytes (2-4), random within that length's range. */
static size_t utf8_char(conn *c, uint8_t *o, size_t n)
{
    uint32_t r = rnd_next(&c->rnd), cp;
    if (n == 2) {
        cp = 0x80 + r % (0x800 - 0x80);
        o[0] = (uint8_t)(0xc0 | cp >> 6);
        o[1] = (uint8_t)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (n == 3) {
        cp = 0x800 + r % (0x10000 - 0x800 - 0x800);
        if (cp >= 0xd800)
            cp += 0x800; /* past the surrogates */
        o[0] = (uint8_t)(0xe0 | cp >> 12);
        o[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3f));
        o[2] = (uint8_t)(0x80 | (cp & 0x3f));
        return 3;
    }
    cp = 0x10000 + r % (0x110000 - 0x10000);
    o[0] = (uint8_t)(0xf0 | cp >> 18);
    o[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3f));
    o[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3f));
    o[3] = (uint8_t)(0x80 | (cp & 0x3f));
    return 4;
}

/* The generator's next packet: an odd id (echoed) three times in four; in
 * text, valid UTF-8 with its size and id below 128. */
static void gen_packet(conn *c, bool text)
{
    uint32_t r = rnd_next(&c->rnd);
    uint16_t id = (uint16_t)((r >> 8) & (text ? 0x7f : 0xff));
    if (r & 3)
        id |= 1;
    else
        id &= (uint16_t)~1u;
    size_t body = (r >> 16) & 31;
    if (!text && (r & 0x1c0) == 0)
        body = (r >> 16) % (MAX_PACKET - 3); /* now and then a big one */
    else if (text)
        body = (r >> 16) % 124;
    uint8_t *p = c->gen;
    size_t size = body + 4;
    p[0] = (uint8_t)size;
    p[1] = (uint8_t)(size >> 8);
    p[2] = (uint8_t)id;
    p[3] = (uint8_t)(id >> 8);
    for (size_t i = 4; i < size;) {
        uint32_t k = rnd_next(&c->rnd);
        size_t room = size - i;
        size_t w = text ? 1 + k % 4 : 1;
        if (w > room)
            w = 1;
        if (w == 1)
            p[i++] = text ? (uint8_t)(0x20 + k % 95) : (uint8_t)k;
        else
            i += utf8_char(c, p + i, w);
    }
    c->gen_len = size;
    c->gen_pos = 0;
}

/* The next n bytes of the packet stream. */
static void gen_take(conn *c, uint8_t *out, size_t n, bool text)
{
    while (n) {
        if (c->gen_pos == c->gen_len)
            gen_packet(c, text);
        size_t t = c->gen_len - c->gen_pos;
        if (t > n)
            t = n;
        memcpy(out, c->gen + c->gen_pos, t);
        c->gen_pos += t;
        out += t;
        n -= t;
    }
}

/* ------------------------------------------------------------------ operations */

static bool writable(const conn *c) { return c->fd >= 0 && c->up && !c->wr_shut; }

/* The upgrade, as a browser sends it; the 101 must come, with the key's answer. */
static void op_connect(conn *c, uint8_t arg)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (arg & 2) {
        int sz = 4096;
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
    }
    int lis = arg & 1;
    struct sockaddr_in a = { .sin_family = AF_INET,
                             .sin_port = htons(cp_service_listen_port(g_svc[lis])),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (connect_retry(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    struct sockaddr_in l;
    socklen_t ll = sizeof l;
    getsockname(fd, (struct sockaddr *)&l, &ll);
    uint32_t seed = c->rnd ^ (uint32_t)arg * 0x01000193u;
    memset(c, 0, offsetof(conn, tail));
    c->fd = fd;
    c->lport = ntohs(l.sin_port);
    c->lis = lis;
    c->rnd = seed;
    c->verify = true;
    c->strict_reason = -1;
    c->m.answer = -1;
    c->m.allow_text = lis == L_TEXT;
    c->m.max_msg = lis == L_TEXT ? TEXT_MAX_MESSAGE : MAX_PACKET;
    if (g_dump) {
        char path[64];
        snprintf(path, sizeof path, "/tmp/fuzz_ws_dump_%d", conn_index(c));
        unlink(path);
    }

    static const char req[] = "GET /game HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                              "Connection: Upgrade\r\nSec-WebSocket-Key: " WS_KEY "\r\n"
                              "Sec-WebSocket-Version: 13\r\nOrigin: http://localhost\r\n\r\n";
    size_t half = (arg & 12) ? 20 : sizeof req - 1;
    c->sending = true;
    bool ok = send(fd, req, half, MSG_NOSIGNAL) == (ssize_t)half;
    if (ok && half < sizeof req - 1) {
        if (arg & 8)
            sleep_us(3 * PING_MS * 1000);
        sched_yield();
        ok = send(fd, req + half, sizeof req - 1 - half, MSG_NOSIGNAL) == (ssize_t)(sizeof req - 1 - half);
    }
    c->sending = false;
    if (!ok)
        fail("the upgrade request could not be written", errno, 0);
    char head[1024];
    size_t got = 0;
    patience p = patience_start(UPGRADE_US);
    char *end = NULL;
    while (!end) {
        ssize_t r = recv(fd, head + got, sizeof head - 1 - got, MSG_DONTWAIT);
        if (r > 0) {
            got += (size_t)r;
            head[got] = '\0';
            end = strstr(head, "\r\n\r\n");
            if (!end && got == sizeof head - 1)
                fail("the 101 is too long", (long)got, 0);
            continue;
        }
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR))
            fail("the server closed a valid upgrade", (long)got, r < 0 ? errno : 0);
        if (patience_out(&p))
            fail("no answer to a valid upgrade within 1 s", (long)got, 0);
        struct pollfd pf = { .fd = fd, .events = POLLIN };
        poll(&pf, 1, 10);
    }
    if (strncmp(head, "HTTP/1.1 101 ", 13) != 0 ||
        !strstr(head, "\r\nSec-WebSocket-Accept: " WS_KEY_ACCEPT "\r\n"))
        fail("a valid upgrade was not answered with 101 and the key's answer", (long)got, 0);
    /* on_connected runs before the 101 is written. */
    if (!rec_of(c))
        fail("the 101 came before on_connected", c->lport, 0);
    c->up = true;
    size_t hl = (size_t)(end + 4 - head);
    if (got > hl)
        conn_feed(c, (const uint8_t *)head + hl, got - hl);
}

/* A message of packets from the stream, in frames, maybe with a ping inside. */
static void op_message(conn *c, uint8_t arg, uint8_t spec)
{
    if (!writable(c))
        return;
    conn_flush_tail(c);
    bool text = arg & 0x80;
    int npk = (arg & 7) + 1, nfr = ((arg >> 3) & 7) + 1;
    /* The payload: the rest of the packet begun, then npk whole ones. */
    static uint8_t pay[8 * (4 + MAX_PACKET) + 4 + MAX_PACKET];
    size_t len = c->gen_len - c->gen_pos;
    gen_take(c, pay, len, text);
    for (int i = 0; i < npk; i++) {
        gen_packet(c, text);
        memcpy(pay + len, c->gen, c->gen_len);
        len += c->gen_len;
        c->gen_pos = c->gen_len;
    }
    static uint8_t out[8 * (14 + 14 + 8) + sizeof pay];
    size_t n = 0, pos = 0;
    int ping_at = (arg & 0x40) && nfr > 1 ? (int)(rnd_next(&c->rnd) % (uint32_t)(nfr - 1)) : -1;
    for (int f = 0; f < nfr; f++) {
        size_t flen = f == nfr - 1 ? len - pos : (len - pos) * (size_t)(rnd_next(&c->rnd) % 100) / 100;
        uint8_t b0 = (uint8_t)((f == nfr - 1 ? 0x80 : 0) | (f ? WS_CONT : text ? WS_TEXT : WS_BINARY));
        int form = spec >> 6;
        int cls = form == 3 ? (int)(rnd_next(&c->rnd) % 3) : form;
        if (cls == 0 && flen >= 126)
            cls = flen <= 0xffff ? 1 : 2;
        uint8_t mask[4];
        mask_make(c, mask);
        size_t h = ws_head(out + n, b0, flen, cls, mask);
        memcpy(out + n + h, pay + pos, flen);
        ws_mask(out + n + h, flen, mask);
        n += h + flen;
        pos += flen;
        if (f == ping_at) {
            uint8_t pp[8];
            size_t pn = rnd_next(&c->rnd) % 9;
            for (size_t i = 0; i < pn; i++)
                pp[i] = (uint8_t)rnd_next(&c->rnd);
            mask_make(c, mask);
            n += ws_frame(out + n, WS_PING, pp, pn, mask);
        }
    }
    conn_write(c, out, n, spec & 63);
}

/* Text (or a continuation of text) gets UTF-8 packets from the stream. */
static bool frame_is_text(const conn *c, uint8_t b0)
{
    uint8_t op = b0 & 0x0f;
    return op == WS_TEXT || (op == WS_CONT && c->m.msg_op == WS_TEXT);
}

static const uint8_t bad_utf8[][3] = {
    { 0xff },       { 0xc0, 0x80 }, { 0x80 }, { 0xed, 0xa0, 0x80 }, { 0xf4, 0x90, 0x80 },
    { 0xe2, 0x28 }, { 0xc3 },       { 0xf8 }
};

static size_t op_frame(conn *c, const uint8_t *in, size_t avail)
{
    if (avail < 3)
        return avail;
    uint8_t b0 = in[0], spec = in[1], lb = in[2];
    size_t used = 3;
    if (!writable(c))
        return used;
    conn_flush_tail(c);
    int cls = spec & 3;
    uint64_t len = lb < 200 ? lb : (uint64_t)(lb - 199) * 1200;
    if (cls == 0 && len > 125)
        len = 125;
    if (cls == 1 && len > 0xffff)
        len = 0xffff;
    if (cls >= 2 && lb == 255)
        len = UINT64_C(1) << 32;
    if (cls == 3)
        len |= UINT64_C(1) << 63;
    static uint8_t f[FRAME_MAX];
    uint8_t mask[4];
    mask_make(c, mask);
    size_t h = ws_head(f, b0, len, cls > 2 ? 2 : cls, (spec & 4) ? NULL : mask);
    size_t pl = len > 70000 ? 16 : (size_t)len; /* past any limit: the header is what counts */
    uint8_t *p = f + h;
    switch ((spec >> 3) & 3) {
    case 0: gen_take(c, p, pl, frame_is_text(c, b0)); break;
    case 1: {
        size_t t = avail - used < pl ? avail - used : pl;
        memcpy(p, in + used, t);
        memset(p + t, 0, pl - t);
        used += t;
        break;
    }
    case 2: {
        gen_take(c, p, pl, true);
        const uint8_t *bad = bad_utf8[lb & 7];
        size_t bl = bad[1] == 0 ? 1 : bad[2] == 0 ? 2 : 3;
        size_t at = pl / 2;
        for (size_t i = 0; i < bl && at + i < pl; i++)
            p[at + i] = bad[i];
        break;
    }
    default: memset(p, 0, pl); break;
    }
    if (!(spec & 4))
        ws_mask(p, pl, mask);
    size_t n = h + pl;
    size_t now = n;
    if (spec & 0x20) { /* partial: the rest waits */
        now = n ? (size_t)(rnd_next(&c->rnd) % n) : 0;
        memcpy(c->tail, f + now, n - now);
        c->tail_len = n - now;
    }
    conn_write(c, f, now, (uint8_t)(spec >> 6));
    return used;
}

static void op_ping(conn *c, uint8_t arg)
{
    if (!writable(c))
        return;
    conn_flush_tail(c);
    uint8_t p[255], f[14 + 255], mask[4];
    for (size_t i = 0; i < arg; i++)
        p[i] = (uint8_t)rnd_next(&c->rnd);
    mask_make(c, mask);
    size_t h = ws_head(f, 0x80 | WS_PING, arg, arg < 126 ? 0 : 1, mask);
    memcpy(f + h, p, arg);
    ws_mask(f + h, arg, mask);
    conn_send(c, f, h + arg);
}

static void op_pong(conn *c, uint8_t arg)
{
    if (!writable(c))
        return;
    conn_flush_tail(c);
    uint8_t p[125];
    size_t n = arg % 126;
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)rnd_next(&c->rnd);
    conn_send_frame(c, WS_PONG, p, n);
}

static void op_close(conn *c, uint8_t arg)
{
    static const uint16_t codes[32] = { 0,    0,    1000, 1001, 1002, 1003,  1004, 1005, 1006, 1007, 1008,
                                        1009, 1010, 1011, 1012, 1013, 1014,  1015, 1016, 999,  0,    2999,
                                        3000, 3999, 4000, 4999, 5000, 65535, 1100, 2000, 1000, 1000 };
    if (!writable(c))
        return;
    conn_flush_tail(c);
    uint8_t body[140];
    size_t n = 0;
    int ci = arg & 31, ri = arg >> 5;
    if (ci == 1) {
        body[n++] = 3; /* a 1-byte body */
    } else if (ci != 0) {
        body[n++] = (uint8_t)(codes[ci] >> 8);
        body[n++] = (uint8_t)codes[ci];
        static const char *const reasons[8] = {
            "",         "bye",          "adi\xc3\xb3s \xe2\x98\x83 \xf0\x9f\x8e\xae",
            "bad \xff", "cut \xe2\x82", NULL,
            NULL,       "\xed\xa0\x80"
        };
        if (ri == 5 || ri == 6) {
            size_t want = ri == 5 ? 124 : 123; /* 126 bytes in all (over), or 125 */
            memset(body + n, 'r', want);
            n += want;
        } else {
            size_t rl = strlen(reasons[ri]);
            memcpy(body + n, reasons[ri], rl);
            n += rl;
        }
    }
    uint8_t f[14 + 140], mask[4];
    mask_make(c, mask);
    size_t h = ws_head(f, 0x80 | WS_CLOSE, n, n < 126 ? 0 : 1, mask);
    memcpy(f + h, body, n);
    ws_mask(f + h, n, mask);
    conn_send(c, f, h + n);
}

/* Done waiting: what the stream owes has come. */
static bool sync_done(const conn *c)
{
    if (c->ended || c->got_close)
        return true;
    if (c->m.over || c->srv_closed)
        return false; /* its Close, or its end, is due */
    return !echoes_certain_owed(c) && !pongs_certain_owed(c);
}

static void op_sync(conn *c)
{
    if (c->fd < 0 || !c->up || c->ended)
        return;
    patience p = patience_start(SYNC_US);
    while (!sync_done(c)) {
        if (!conn_read_step(c, now_us() + 10000))
            return; /* the stream ended: checked there */
        if (sync_done(c))
            return;
        if (patience_out(&p)) {
            fprintf(stderr,
                    "fuzz_ws_frames: conn %d (listener %d): over %d graceful %d code %u, echoes owed %llu, "
                    "pongs owed %u, server closed %d, backed up %d, tail %zu\n",
                    conn_index(c), c->lis, c->m.over, c->m.graceful, c->m.codes.n ? c->m.codes.c[0] : 0,
                    (unsigned long long)(c->etail - c->ehead), c->ptail - c->phead, c->srv_closed,
                    c->backed_up, c->tail_len);
            if (c->m.over || c->srv_closed)
                fail("the stream's end did not come within 2 s", c->m.codes.n ? c->m.codes.c[0] : 0, 0);
            fail("echoes or pongs owed on a valid stream did not come within 2 s",
                 (long)(c->etail - c->ehead), (long)(c->ptail - c->phead));
        }
    }
}

/* The ping listener pings every interval a session that answers: reading
 * for four of them brings one, unless the stream ends meanwhile. */
static void op_ping_wait(conn *c)
{
    if (c->fd < 0 || !c->up || c->ended || c->got_close || c->lis != L_PING || c->m.over || c->srv_closed)
        return;
    unsigned before = c->pings;
    patience p = patience_start(4 * PING_MS * 1000);
    while (c->pings == before && !c->ended && !c->got_close && !patience_out(&p))
        if (!conn_read_step(c, now_us() + 5000))
            return;
    if (c->pings == before && !c->ended && !c->got_close)
        fail("the ping listener sent no ping in four intervals", c->lport, (long)c->pings);
}

static void conn_close(conn *c, int reset)
{
    if (c->fd < 0)
        return;
    if (reset) {
        struct linger lg = { .l_onoff = 1, .l_linger = 0 };
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    close(c->fd);
    c->fd = -1;
}

static void server_op(conn *c, int kind, uint8_t arg)
{
    rec *r = rec_of(c);
    if (!r || c->fd < 0)
        return;
    switch (kind) {
    case OP_SRV_DISCONNECT:
        c->srv_closed = true;
        c->strict_reason = -1; /* the session may end for this reason first */
        if (arg & 1)
            cp_service_disconnect_id(g_svc[c->lis], r->id);
        else
            cp_session_disconnect(r->s);
        break;
    case OP_SRV_SHUTDOWN:
        c->srv_closed = true;
        c->strict_reason = -1;
        cp_session_shutdown(r->s, 100);
        break;
    case OP_SRV_SEND:
        for (int k = 0; k <= ((arg >> 2) & 3); k++) {
            if ((arg & 3) == 2) {
                cp_sendbuf *pb = cp_packet_make(ID_SENDTO, "to", 2);
                cp_service_send_to(g_svc[c->lis], r->id, pb);
                cp_sendbuf_unref(pb);
                unread_add(c, 6);
            } else {
                static const size_t sizes[4] = { 8192, sizeof g_junk, 0, 0 };
                size_t n = (arg & 3) == 3 ? (size_t)((arg >> 4) + 1) * 1024 : sizes[arg & 3];
                cp_session_send_copy(r->s, g_junk, n);
                unread_add(c, n);
            }
        }
        break;
    }
}

static void op_broadcast(void)
{
    cp_sendbuf *pb = cp_packet_make(ID_BCAST, "bcast", 5);
    for (int l = 0; l < L_COUNT; l++)
        cp_service_broadcast(g_svc[l], pb);
    cp_sendbuf_unref(pb);
    for (int i = 0; i < NCONN; i++)
        if (g_cs[i].fd >= 0 && g_cs[i].up)
            unread_add(&g_cs[i], 9);
}

/* The client's socket is still its own: the library shares our descriptor
 * table, so a close of a stale descriptor number there would take it. */
static void fd_check(const conn *c)
{
    if (c->fd < 0)
        return;
    struct sockaddr_in l;
    socklen_t ll = sizeof l;
    if (getsockname(c->fd, (struct sockaddr *)&l, &ll) != 0 || l.sin_family != AF_INET ||
        ntohs(l.sin_port) != c->lport)
        fail("a client's descriptor no longer is its socket (closed behind its back?)", c->fd, c->lport);
}

static void do_op(int kind, conn *c, const uint8_t *data, size_t size, size_t *pos)
{
    for (int i = 0; i < NCONN; i++)
        fd_check(&g_cs[i]);
    uint8_t arg = *pos < size ? data[*pos] : 0;
    switch (kind) {
    case OP_CONNECT:
        (*pos)++;
        if (c->fd < 0)
            op_connect(c, arg);
        break;
    case OP_MESSAGE: {
        (*pos)++;
        uint8_t spec = *pos < size ? data[(*pos)++] : 0;
        op_message(c, arg, spec);
        break;
    }
    case OP_FRAME: *pos += op_frame(c, data + *pos, size - *pos); break;
    case OP_RAW: {
        (*pos)++;
        size_t n = arg;
        if (n > size - *pos)
            n = size - *pos;
        if (writable(c)) {
            conn_flush_tail(c);
            conn_send(c, data + *pos, n);
        }
        *pos += n;
        break;
    }
    case OP_PING: (*pos)++, op_ping(c, arg); break;
    case OP_PONG: (*pos)++, op_pong(c, arg); break;
    case OP_CLOSE: (*pos)++, op_close(c, arg); break;
    case OP_READ:
        (*pos)++;
        conn_read_until(c, now_us() + (uint64_t)(arg % 8) * 1000);
        break;
    case OP_SYNC: op_sync(c); break;
    case OP_SLEEP:
        (*pos)++;
        sleep_us(arg == 255 ? 250000 : (uint64_t)arg * 4);
        break;
    case OP_SHUT_WR:
        if (c->fd >= 0 && !c->wr_shut) {
            shutdown(c->fd, SHUT_WR);
            c->wr_shut = true;
            c->eof_sent = !c->m.over;
        }
        break;
    case OP_RESET:
        c->strict_reason = -1; /* a draining session ends with CP_REASON_RESET */
        conn_close(c, 1);
        break;
    case OP_CLOSE_SOCKET: conn_close(c, 0); break;
    case OP_SRV_DISCONNECT:
    case OP_SRV_SEND: (*pos)++, server_op(c, kind, arg); break;
    case OP_SRV_SHUTDOWN: server_op(c, kind, 0); break;
    case OP_BROADCAST: op_broadcast(); break;
    case OP_FLUSH:
        if (writable(c))
            conn_flush_tail(c);
        conn_send_due_pong(c);
        break;
    case OP_PING_WAIT: op_ping_wait(c); break;
    }
}

/* ------------------------------------------------------------------ libFuzzer */

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void server_start(int lis)
{
    cp_ws_opts wo = { 0 };
    if (lis == L_PING) {
        wo.ping_interval_ms = PING_MS;
    } else {
        wo.allow_text = 1;
        wo.max_message = TEXT_MAX_MESSAGE;
    }
    cp_ws *ws;
    int rc = cp_ws_create(&ws, &wo);
    if (rc != 0) {
        fprintf(stderr, "fuzz_ws_frames: cp_ws_create: %s\n", cp_strerror(rc));
        exit(1);
    }
    cp_handlers h = { .on_connected = on_connected,
                      .on_packet = on_packet,
                      .on_sent = on_sent,
                      .on_disconnected = on_disconnected };
    cp_server_opts o = { .host = "127.0.0.1", .port = 0 };
    o.session.framing = CP_FRAMING_PACKET;
    o.session.max_packet = MAX_PACKET;
    o.session.send_queue_limit = SEND_QUEUE_LIMIT;
    o.session.ws = ws;
    rc = cp_server_start(&g_svc[lis], g_port, &o, &h, NULL);
    cp_ws_unref(ws); /* the service keeps its own */
    if (rc != 0) {
        fprintf(stderr, "fuzz_ws_frames: cp_server_start: %s\n", cp_strerror(rc));
        exit(1);
    }
    g_listen_fd[lis] = listener_fd_of(cp_service_listen_port(g_svc[lis]));
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    signal(SIGPIPE, SIG_IGN);
    g_trace = getenv("FUZZ_WS_TRACE") != NULL;
    g_dump = getenv("FUZZ_WS_DUMP") != NULL;
    /* Packet-shaped junk for server sends: 64-byte packets of an even id. */
    for (size_t i = 0; i < sizeof g_junk; i += 64) {
        g_junk[i] = 64;
        g_junk[i + 1] = 0;
        g_junk[i + 2] = (uint8_t)ID_JUNK;
        g_junk[i + 3] = (uint8_t)(ID_JUNK >> 8);
        memset(g_junk + i + 4, 'j', 60);
    }
    cp_port_opts po = { .workers = 2 };
    int rc = cp_port_create(&g_port, &po);
    if (rc != 0) {
        fprintf(stderr, "fuzz_ws_frames: cp_port_create: %s\n", cp_strerror(rc));
        exit(1);
    }
    for (int l = 0; l < L_COUNT; l++)
        server_start(l);
    fprintf(stderr, "fuzz_ws_frames: backend %s, WebSocket servers on ports %u (pings) and %u (text)\n",
            cp_port_backend_name(g_port), cp_service_listen_port(g_svc[L_PING]),
            cp_service_listen_port(g_svc[L_TEXT]));
    for (int i = 0; i < NCONN; i++)
        g_cs[i].fd = -1;
    return 0;
}

/* A stream that ended with ws's own Close, as the model said and nothing
 * else explains, ended its session for that reason: a violation with
 * CP_REASON_WEBSOCKET, the answer to our Close with CP_REASON_PEER_CLOSED. */
static void reason_check(const conn *c)
{
    rec *r = rec_of(c);
    if (c->strict_reason < 0 || !r)
        return;
    int got = atomic_load(&r->reason);
    if (got != c->strict_reason)
        fail("a session that ws closed as the stream asked ended for another reason", got,
             (long)c->close_code);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    for (int i = 0; i < NCONN; i++) {
        memset(&g_cs[i], 0, offsetof(conn, tail));
        g_cs[i].fd = -1;
        g_cs[i].strict_reason = -1;
        g_cs[i].rnd = (uint32_t)i * 0x9e3779b9u + 1;
    }
    uint64_t stop = now_us() + SCRIPT_BUDGET_US;
    size_t pos = 0;
    for (int op = 0; op < MAX_OPS && pos < size && now_us() < stop; op++) {
        uint8_t b = data[pos++];
        conn *c = &g_cs[(b >> 5) & 3];
        int kind = (b & 31) % OP_COUNT;
        do_op(kind, c, data, size, &pos);
        if (g_trace)
            fprintf(stderr,
                    "fuzz_ws_frames: op %d %-14s conn %d: fd %d up %d lis %d over %d%s code %u ended %d "
                    "close %u "
                    "echoes owed %llu pongs owed %u tail %zu unread %zu\n",
                    op, op_names[kind], (b >> 5) & 3, c->fd, c->up, c->lis, c->m.over,
                    c->m.over ? (c->m.graceful ? " (ws)" : " (hard)") : "",
                    c->m.codes.n ? c->m.codes.c[0] : 0, c->ended, c->got_close ? c->close_code : 0,
                    (unsigned long long)(c->etail - c->ehead), c->ptail - c->phead, c->tail_len, c->unread);
    }
    /* What is owed is checked for every connection still open. */
    for (int i = 0; i < NCONN; i++)
        op_sync(&g_cs[i]);
    for (int i = 0; i < NCONN; i++)
        conn_close(&g_cs[i], 0);
    recs_wait_ended(g_svc, g_listen_fd, L_COUNT, END_WAIT_US);
    for (int i = 0; i < NCONN; i++)
        reason_check(&g_cs[i]);
    recs_release();
    return 0;
}
