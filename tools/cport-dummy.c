/* SPDX-License-Identifier: MIT */
/*
 * cport-dummy — the stress client: N sessions on one cport client service
 * that talk to a cport-server and check every byte that comes back.
 *
 *   echo    raw bytes; each session sends S-byte messages and verifies the echo
 *   packet  the same with {u16 size, u16 id} packets (S = body bytes)
 *   chat    each session sends R packets/s into the server's one room; every
 *           session verifies every packet of every sender (content, per-sender
 *           order, no gap, no duplicate) and measures delivery latency
 *
 * Exit status: 0 only if nothing was lost, corrupted, reordered, refused or
 * disconnected; 1 otherwise; 2 for a bad command line.
 *
 * Who sends. Rated sends come from the main thread, which ticks every
 * millisecond and calls cp_session_send on session references it keeps
 * (cp_session_send is safe from any thread). A single scheduler thread makes
 * the offered load independent of how busy the workers are: if the library
 * falls behind, that shows up as latency instead of silently lowering the
 * send rate. cp_port_post would add a hop and run on an arbitrary worker, so it
 * would buy no serialization either. Only ping-pong (--rate 0) sends from the
 * workers, because there the next message depends on the previous echo.
 *
 * Joining (chat). A client sees its connect complete before the server has
 * accepted it and put it into the room, so "all connected" is not "all in the
 * room". Each session therefore sends one hello packet (id 1000) on connect;
 * the server broadcasts it like any packet, and a session counts as ready when
 * its own hello comes back. Chat packets (id 1004) start once all are ready.
 *
 * One room over several dummies (chat, --room-size T). When servers share a
 * room through a message bus, each dummy drives only some of its members:
 * this one's sessions are the room's senders F..F+N-1 (--first-index F) of T.
 * Every session still verifies every packet of all T senders. A hello that
 * comes back only proves membership of our own server, and a server's bus
 * link comes up on its own time, so until the start every session repeats
 * its hello twice a second; the room is complete for this dummy once it has
 * heard every one of the T senders (then every server's packets reach ours).
 * All dummies start sending at the same wall-clock instant (--start-at), on
 * one schedule over the whole room, so each knows how many packets every
 * other dummy's senders send without being told.
 */
#include "common.h"

#include <stdalign.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>

static const char *const prog = "cport-dummy";

/* Packet ids (chosen after the reference game's LOGIN and CHAT ids). */
enum { PKT_ECHO = 1, PKT_HELLO = 1000, PKT_CHAT = 1004 };

/* Chat body layout: u32 sender index, u32 sequence, u64 send time (ns), filler.
 * The send time is CLOCK_MONOTONIC, which is one clock for every process of a
 * host: latency across dummies is measured right only when they share one. */
#define CHAT_FIXED 16u

/* Echo/packet modes keep at most this many messages in flight per session;
 * their send times live in a ring of this size to measure round trips. */
#define ECHO_WINDOW 256u

/* All sessions must be connected (chat: confirmed in the room) within this. */
#define CONNECT_TIMEOUT_NS (10ull * 1000000000ull)
/* After the last send, how long owed packets may take to arrive. */
#define DRAIN_TIMEOUT_NS (2ull * 1000000000ull)
#define TICK_NS 1000000ull      /* scheduler tick: 1 ms */
#define REPORT_NS 1000000000ull /* progress line period */
/* How often a session repeats its hello while a room of several dummies
 * assembles: every server must hear it once its bus link is up. */
#define HELLO_REPEAT_NS (500ull * 1000000ull)
/* --start-at is at most this far ahead (a value in seconds, not milliseconds,
 * is in the past and refused too). */
#define START_AT_MAX_AHEAD_MS (3600ull * 1000ull)

/* One process stays below 20,000 open files: sessions plus the port's own. */
#define MAX_SESSIONS 19000u
/* chat keeps one u32 per (receiver, sender) pair: N × room × 4 bytes. */
#define MAX_CHAT_SESSIONS 10000u
/* Log at most this many individual disconnects / corruptions. */
#define MAX_ERROR_LOGS 10

typedef enum dummy_mode { MODE_ECHO, MODE_PACKET, MODE_CHAT } dummy_mode;
static const char *const mode_names[] = { "echo", "packet", "chat" };

typedef struct dummy_config {
    const char *host;
    uint16_t port;
    uint32_t sessions;
    dummy_mode mode;
    uint32_t size;   /* echo: message bytes; packet/chat: body bytes */
    double rate;     /* messages per second per session; 0 = ping-pong */
    double duration; /* seconds of sending */
    cp_backend backend;
    int workers;
    long server_pid; /* 0 = none */
    bool quiet;
    /* chat: the room's senders are 0..room_size-1, ours first_index.. on. */
    uint32_t room_size; /* = sessions unless --room-size */
    uint32_t first_index;
    bool room_given;      /* --room-size: report how much of the room we heard */
    uint64_t start_at_ms; /* wall clock (Unix ms) to start sending at; 0 = when ready */
    bool tls;             /* --tls: every session speaks TLS */
    const char *tls_ca;   /* --tls-ca: verify the server against these CAs */
    bool ws;              /* --ws: every session is a WebSocket client */
    const char *ws_path;  /* --ws-path: the path asked for (default /) */
} dummy_config;

/* ------------------------------------------------------------------ latency histogram */

/* Log-linear buckets (like HdrHistogram): values below 32 ns exactly, above
 * that 32 sub-buckets per power of two, so a reported percentile is within
 * about 3 % of the true value. */
#define HIST_SUB_BITS 5u
#define HIST_SUB (1u << HIST_SUB_BITS)
#define HIST_BUCKETS ((64u - HIST_SUB_BITS + 1u) * HIST_SUB)
/* Worker threads record into their own histogram (no shared cache line on the
 * hot path); threads beyond this many share the last one, still correctly. */
#define HIST_THREADS 32u

typedef struct latency_hist {
    atomic_uint_fast64_t bucket[HIST_BUCKETS];
} latency_hist;

static unsigned hist_index(uint64_t v)
{
    if (v < HIST_SUB)
        return (unsigned)v;
    unsigned msb = 63u - (unsigned)__builtin_clzll(v);
    return (msb - HIST_SUB_BITS + 1u) * HIST_SUB + (unsigned)((v >> (msb - HIST_SUB_BITS)) & (HIST_SUB - 1u));
}

/* The middle of a bucket's value range: what a percentile reports. */
static uint64_t hist_value(unsigned idx)
{
    if (idx < HIST_SUB)
        return idx;
    unsigned msb = idx / HIST_SUB + HIST_SUB_BITS - 1u;
    uint64_t width = (uint64_t)1 << (msb - HIST_SUB_BITS);
    uint64_t low = ((uint64_t)1 << msb) | ((uint64_t)(idx % HIST_SUB) * width);
    return low + width / 2;
}

/* The value below which a fraction q of the samples lie, in ns (0 if none). */
static uint64_t hist_percentile(const uint64_t *buckets, double q)
{
    uint64_t total = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++)
        total += buckets[i];
    if (total == 0)
        return 0;
    uint64_t rank = (uint64_t)(q * (double)total);
    if (rank >= total)
        rank = total - 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        seen += buckets[i];
        if (seen > rank)
            return hist_value(i);
    }
    return hist_value(HIST_BUCKETS - 1);
}

static uint64_t hist_max(const uint64_t *buckets)
{
    for (unsigned i = HIST_BUCKETS; i-- > 0;)
        if (buckets[i] != 0)
            return hist_value(i);
    return 0;
}

/* ------------------------------------------------------------------ state */

/* One per session, indexed by the order in which sessions connected. Fields
 * marked (cb) are touched only by the session's own callbacks, which cport
 * serializes, so they are plain; the rest are read by the main thread. */
typedef struct session_slot {
    alignas(64) _Atomic(cp_session *) session; /* reference kept for the sender */
    uint32_t index;
    atomic_bool alive; /* on_connected ran, on_disconnected not yet */
    atomic_bool ready; /* may be sent to (chat: own hello came back) */
    /* Messages handed to cp_session_send. echo/packet count before sending
     * (and take it back if the send fails), so an echo can never outrun the
     * count; chat, sent by the main thread only, counts after success. */
    atomic_uint_fast32_t sent;
    atomic_uint_fast64_t received; /* verified echoes / chat deliveries */
    uint32_t echo_seq;             /* (cb) echo/packet: next message expected back */
    uint32_t echo_off;             /* (cb) echo: bytes of it verified so far */
    uint32_t *next_seq;            /* (cb) chat: next sequence expected from each room sender */
    atomic_uint_fast64_t *send_ns; /* echo/packet: ECHO_WINDOW send times */
    bool survived;                 /* (main) ready and still connected when we began to stop */
} session_slot;

typedef struct dummy_state {
    dummy_config cfg;
    session_slot *slots;
    uint32_t *chat_matrix;           /* backing store of every slot's next_seq */
    atomic_uint_fast64_t *send_ring; /* backing store of every slot's send_ns */

    atomic_uint next_index;  /* slot handed to the next on_connected */
    atomic_uint ready;       /* slots marked ready */
    atomic_bool *heard;      /* chat: a hello came from this room sender */
    atomic_uint heard_count; /* chat: room senders heard from */
    uint64_t room_sends;     /* chat: sends the whole room's schedule holds */
    uint64_t others_sends;   /* chat: of those, the other dummies' senders' */
    atomic_bool sending;     /* ping-pong may send its next message */
    atomic_bool stopping;    /* we are stopping: disconnects are expected */

    /* Errors. Rare by definition, so shared counters are fine. */
    atomic_uint_fast64_t connect_failed;
    atomic_int last_connect_error;
    atomic_uint_fast64_t disconnects; /* before we began to stop */
    atomic_uint_fast64_t by_reason[CP_REASON_COUNT_];
    atomic_uint_fast64_t corrupt;
    atomic_uint_fast64_t out_of_order; /* duplicates and gaps */
    atomic_uint_fast64_t gap_lost;     /* packets skipped over by a gap */
    atomic_uint_fast64_t send_errors;
    atomic_uint_fast64_t window_full; /* sends skipped: ECHO_WINDOW in flight */
    atomic_int error_logs;

    latency_hist *hists; /* HIST_THREADS of them */
    atomic_uint nhists;
} dummy_state;

static _Thread_local latency_hist *tls_hist;

static void record_latency(dummy_state *st, uint64_t ns)
{
    if (tls_hist == NULL) {
        unsigned i = atomic_fetch_add(&st->nhists, 1);
        tls_hist = &st->hists[i < HIST_THREADS ? i : HIST_THREADS - 1];
    }
    atomic_fetch_add_explicit(&tls_hist->bucket[hist_index(ns)], 1, memory_order_relaxed);
}

/* Sums every thread's histogram into out[HIST_BUCKETS]. */
static void hist_snapshot(dummy_state *st, uint64_t *out)
{
    memset(out, 0, HIST_BUCKETS * sizeof *out);
    unsigned n = atomic_load(&st->nhists);
    if (n > HIST_THREADS)
        n = HIST_THREADS;
    for (unsigned t = 0; t < n; t++)
        for (unsigned i = 0; i < HIST_BUCKETS; i++)
            out[i] += atomic_load_explicit(&st->hists[t].bucket[i], memory_order_relaxed);
}

static void count(atomic_uint_fast64_t *c) { atomic_fetch_add_explicit(c, 1, memory_order_relaxed); }

static uint64_t get(atomic_uint_fast64_t *c) { return atomic_load_explicit(c, memory_order_relaxed); }

/* Logs one error line, but only the first MAX_ERROR_LOGS of them: with
 * thousands of sessions one failure tends to come in thousands. */
static void log_error(dummy_state *st, const char *fmt, ...) __attribute__((format(TOOL_PRINTF, 2, 3)));
static void log_error(dummy_state *st, const char *fmt, ...)
{
    int n = atomic_fetch_add(&st->error_logs, 1);
    if (n < MAX_ERROR_LOGS) {
        char line[256];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(line, sizeof line, fmt, ap);
        va_end(ap);
        fprintf(stderr, "%s: %s\n", prog, line);
    } else if (n == MAX_ERROR_LOGS) {
        fprintf(stderr, "%s: (further errors are counted but not logged)\n", prog);
    }
}

/* ------------------------------------------------------------------ payload */

static void put_u16le(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void put_u32le(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put_u64le(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_u32le(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get_u64le(const uint8_t *p)
{
    return (uint64_t)get_u32le(p) | (uint64_t)get_u32le(p + 4) << 32;
}

/* splitmix64's finalizer: a cheap, well-mixed 64-bit hash. */
static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

/* Message content is a pure function of (session index, sequence) and the
 * byte offset, so a receiver can check any byte, at any split of the stream,
 * without keeping a copy of what was sent. */
static uint64_t message_seed(uint32_t index, uint32_t seq)
{
    return mix64(((uint64_t)index << 32 | seq) ^ 0x9e3779b97f4a7c15ull);
}

static void pattern_fill(uint64_t seed, size_t off, uint8_t *p, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint64_t word = mix64(seed + (off + i) / 8);
        for (unsigned shift = (unsigned)((off + i) % 8) * 8; shift < 64 && i < n; shift += 8)
            p[i++] = (uint8_t)(word >> shift);
    }
}

/* Returns n if p[0..n) is the pattern at offset off, else the first bad index. */
static size_t pattern_check(uint64_t seed, size_t off, const uint8_t *p, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint64_t word = mix64(seed + (off + i) / 8);
        for (unsigned shift = (unsigned)((off + i) % 8) * 8; shift < 64 && i < n; shift += 8, i++)
            if (p[i] != (uint8_t)(word >> shift))
                return i;
    }
    return n;
}

/* Opens a send buffer for a packet of body_len bytes and writes its header;
 * the caller writes the body at the returned pointer and closes the buffer. */
static cp_sendbuf *packet_open(uint16_t id, size_t body_len, uint8_t **body)
{
    cp_sendbuf *b = cp_sendbuf_open(CP_PACKET_HEADER + body_len);
    if (b == NULL)
        return NULL;
    uint8_t *p = cp_sendbuf_data(b);
    put_u16le(p, (uint16_t)(CP_PACKET_HEADER + body_len));
    put_u16le(p + 2, id);
    *body = p + CP_PACKET_HEADER;
    return b;
}

/* ------------------------------------------------------------------ sending */

/* Sends the next echo/packet message of a slot. Any thread (main for rated
 * sends, the session's worker for ping-pong). Returns 0, 1 if skipped
 * because the window is full, or a negative error. */
static int send_echo(dummy_state *st, session_slot *slot, cp_session *s)
{
    uint32_t size = st->cfg.size;
    uint32_t seq = (uint32_t)atomic_load_explicit(&slot->sent, memory_order_relaxed);
    if (seq - (uint32_t)get(&slot->received) >= ECHO_WINDOW) {
        count(&st->window_full);
        return 1;
    }
    uint8_t *payload;
    cp_sendbuf *b;
    if (st->cfg.mode == MODE_ECHO) {
        b = cp_sendbuf_open(size);
        payload = b ? cp_sendbuf_data(b) : NULL;
    } else {
        b = packet_open(PKT_ECHO, size, &payload);
    }
    if (b == NULL)
        return -ENOMEM;
    pattern_fill(message_seed(slot->index, seq), 0, payload, size);
    cp_sendbuf_close(b, (st->cfg.mode == MODE_ECHO ? 0 : CP_PACKET_HEADER) + size);

    /* Publish the sequence before the bytes leave: the echo may be verified
     * on a worker before cp_session_send even returns. */
    atomic_store_explicit(&slot->send_ns[seq % ECHO_WINDOW], tool_now_ns(), memory_order_relaxed);
    atomic_fetch_add(&slot->sent, 1);
    int rc = cp_session_send(s, b);
    if (rc != 0)
        atomic_fetch_sub(&slot->sent, 1);
    cp_sendbuf_unref(b);
    return rc;
}

/* Sends the next chat packet of a slot. Main thread only, so the sequence
 * needs no read-modify-write. */
static int send_chat(dummy_state *st, session_slot *slot, cp_session *s)
{
    uint32_t size = st->cfg.size;
    uint32_t seq = (uint32_t)atomic_load_explicit(&slot->sent, memory_order_relaxed);
    uint8_t *body;
    cp_sendbuf *b = packet_open(PKT_CHAT, size, &body);
    if (b == NULL)
        return -ENOMEM;
    put_u32le(body, slot->index);
    put_u32le(body + 4, seq);
    pattern_fill(message_seed(slot->index, seq), CHAT_FIXED, body + CHAT_FIXED, size - CHAT_FIXED);
    put_u64le(body + 8, tool_now_ns()); /* last, as close to the send as possible */
    cp_sendbuf_close(b, CP_PACKET_HEADER + size);
    int rc = cp_session_send(s, b);
    if (rc == 0)
        atomic_store_explicit(&slot->sent, seq + 1, memory_order_release);
    cp_sendbuf_unref(b);
    return rc;
}

/* Sends a slot's hello (its room sender index). Any thread. */
static int send_hello(session_slot *slot, cp_session *s)
{
    uint8_t *body;
    cp_sendbuf *b = packet_open(PKT_HELLO, 4, &body);
    if (b == NULL)
        return -ENOMEM;
    put_u32le(body, slot->index);
    cp_sendbuf_close(b, CP_PACKET_HEADER + 4);
    int rc = cp_session_send(s, b);
    cp_sendbuf_unref(b);
    return rc;
}

/* One scheduled send from the main thread; failures are counted. */
static void send_scheduled(dummy_state *st, session_slot *slot)
{
    cp_session *s = atomic_load_explicit(&slot->session, memory_order_acquire);
    if (s == NULL || !atomic_load(&slot->alive))
        return; /* its disconnect is already counted as the error */
    int rc = st->cfg.mode == MODE_CHAT ? send_chat(st, slot, s) : send_echo(st, slot, s);
    if (rc < 0 && atomic_load(&slot->alive)) {
        count(&st->send_errors);
        log_error(st, "session %u: send failed: %s", slot->index, cp_strerror(rc));
    }
}

/* ------------------------------------------------------------------ callbacks */

static void on_connected(cp_session *s)
{
    dummy_state *st = cp_session_ctx(s);
    unsigned idx = atomic_fetch_add(&st->next_index, 1);
    if (idx >= st->cfg.sessions) { /* more sessions than asked for: not ours to use */
        cp_session_disconnect(s);
        return;
    }
    session_slot *slot = &st->slots[idx];
    cp_session_set_data(s, slot);
    atomic_store(&slot->alive, true);
    cp_session_ref(s); /* released by main after the run */
    atomic_store_explicit(&slot->session, s, memory_order_release);

    if (st->cfg.mode != MODE_CHAT) {
        atomic_store(&slot->ready, true);
        atomic_fetch_add(&st->ready, 1);
        return;
    }
    /* chat: the server adds a session to the room in its on_connected, before
     * it can handle any packet of that session. So once our hello comes back
     * through the room we know we are a member and will miss nothing. */
    int rc = send_hello(slot, s);
    if (rc != 0) {
        count(&st->send_errors);
        log_error(st, "session %u: hello failed: %s", slot->index, cp_strerror(rc));
    }
}

static void on_connect_failed(cp_service *svc, int err)
{
    dummy_state *st = cp_service_ctx(svc);
    count(&st->connect_failed);
    atomic_store(&st->last_connect_error, err);
}

static void on_disconnected(cp_session *s, cp_reason reason, int err)
{
    dummy_state *st = cp_session_ctx(s);
    session_slot *slot = cp_session_data(s);
    if (slot != NULL)
        atomic_store(&slot->alive, false);
    if (atomic_load(&st->stopping))
        return;
    count(&st->disconnects);
    if ((unsigned)reason < CP_REASON_COUNT_)
        count(&st->by_reason[reason]);
    char what[96];
    snprintf(what, sizeof what, "%s%s%s", cp_reason_str(reason), reason == CP_REASON_IO_ERROR ? ": " : "",
             reason == CP_REASON_IO_ERROR ? cp_strerror(err) : "");
    log_error(st, "session %u disconnected unexpectedly: %s", slot ? slot->index : 0u, what);
}

/* A message came back whole and correct: latency, counters, and for
 * ping-pong the next message. */
static void echo_complete(dummy_state *st, session_slot *slot, cp_session *s)
{
    uint64_t sent_at = atomic_load_explicit(&slot->send_ns[slot->echo_seq % ECHO_WINDOW],
                                            memory_order_relaxed);
    record_latency(st, tool_now_ns() - sent_at);
    slot->echo_seq++;
    slot->echo_off = 0;
    atomic_fetch_add_explicit(&slot->received, 1, memory_order_release);
    if (st->cfg.rate == 0 && atomic_load_explicit(&st->sending, memory_order_relaxed)) {
        int rc = send_echo(st, slot, s);
        if (rc < 0 && rc != -ENOTCONN) {
            count(&st->send_errors);
            log_error(st, "session %u: send failed: %s", slot->index, cp_strerror(rc));
        }
    }
}

/* Corrupt or unsolicited data: the stream can no longer be trusted, so count
 * it once and drop the session rather than report every later byte (the
 * disconnect is counted as well; either makes the run fail). */
static void stream_broken(dummy_state *st, session_slot *slot, cp_session *s, const char *why)
{
    count(&st->corrupt);
    log_error(st, "session %u: %s (message %u)", slot->index, why, slot->echo_seq);
    cp_session_disconnect(s);
}

/* echo mode (raw): the bytes arrive split anywhere; check them in place. */
static size_t echo_on_recv(cp_session *s, const uint8_t *data, size_t len)
{
    dummy_state *st = cp_session_ctx(s);
    session_slot *slot = cp_session_data(s);
    if (slot == NULL)
        return len;
    size_t pos = 0;
    while (pos < len) {
        if (slot->echo_seq >= (uint32_t)atomic_load(&slot->sent)) {
            stream_broken(st, slot, s, "bytes that were never sent");
            return len;
        }
        size_t want = st->cfg.size - slot->echo_off;
        size_t n = len - pos < want ? len - pos : want;
        uint64_t seed = message_seed(slot->index, slot->echo_seq);
        if (pattern_check(seed, slot->echo_off, data + pos, n) != n) {
            stream_broken(st, slot, s, "echoed bytes differ");
            return len;
        }
        pos += n;
        slot->echo_off += (uint32_t)n;
        if (slot->echo_off == st->cfg.size)
            echo_complete(st, slot, s);
    }
    return len;
}

static int packet_on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    dummy_state *st = cp_session_ctx(s);
    session_slot *slot = cp_session_data(s);
    if (slot == NULL)
        return 0;
    if (slot->echo_seq >= (uint32_t)atomic_load(&slot->sent)) {
        stream_broken(st, slot, s, "a packet that was never sent");
        return 0;
    }
    if (id != PKT_ECHO || len != st->cfg.size ||
        pattern_check(message_seed(slot->index, slot->echo_seq), 0, body, len) != len) {
        stream_broken(st, slot, s, "echoed packet differs");
        return 0;
    }
    echo_complete(st, slot, s);
    return 0;
}

static int chat_on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    dummy_state *st = cp_session_ctx(s);
    session_slot *slot = cp_session_data(s);
    if (slot == NULL)
        return 0;
    uint32_t room = st->cfg.room_size;

    if (id == PKT_HELLO) {
        uint32_t who = len == 4 ? get_u32le(body) : UINT32_MAX;
        if (who >= room) {
            count(&st->corrupt);
            log_error(st, "session %u: bad hello from %u", slot->index, who);
            return 0;
        }
        if (!atomic_exchange(&st->heard[who], true))
            atomic_fetch_add(&st->heard_count, 1);
        if (who == slot->index && !atomic_load(&slot->ready)) {
            atomic_store(&slot->ready, true);
            atomic_fetch_add(&st->ready, 1);
        }
        return 0;
    }
    uint32_t sender = len >= CHAT_FIXED ? get_u32le(body) : UINT32_MAX;
    if (id != PKT_CHAT || len != st->cfg.size || sender >= room) {
        count(&st->corrupt);
        log_error(st, "session %u: malformed chat packet (id %u, %zu bytes)", slot->index, id, len);
        return 0;
    }
    uint32_t seq = get_u32le(body + 4);
    uint64_t sent_at = get_u64le(body + 8);
    if (pattern_check(message_seed(sender, seq), CHAT_FIXED, body + CHAT_FIXED, len - CHAT_FIXED) !=
        len - CHAT_FIXED) {
        count(&st->corrupt);
        log_error(st, "session %u: corrupt chat packet from %u, seq %u", slot->index, sender, seq);
        return 0;
    }
    uint32_t *expect = &slot->next_seq[sender];
    if (seq != *expect) {
        count(&st->out_of_order);
        log_error(st, "session %u: from %u got seq %u, expected %u", slot->index, sender, seq, *expect);
        if (seq > *expect) { /* a gap: the skipped packets will never come */
            atomic_fetch_add_explicit(&st->gap_lost, seq - *expect, memory_order_relaxed);
            *expect = seq + 1;
        }
        /* seq < expected: a duplicate or a late packet, already accounted for. */
    } else {
        *expect = seq + 1;
    }
    uint64_t now = tool_now_ns();
    record_latency(st, now > sent_at ? now - sent_at : 0);
    atomic_fetch_add_explicit(&slot->received, 1, memory_order_relaxed);
    return 0;
}

/* ------------------------------------------------------------------ arguments */

static void usage(FILE *out)
{
    fprintf(out,
            "usage: %s [options]\n"
            "  --host H          server address (default 127.0.0.1)\n"
            "  --port P          server port (default 7777)\n"
            "  --sessions N      sessions to connect, 1..%u (default 100; chat at most %u)\n"
            "  --mode M          echo | packet | chat (default echo)\n"
            "  --size S          echo: message bytes; packet/chat: body bytes\n"
            "                    (default 64; chat needs at least 16)\n"
            "  --rate R          messages per second per session (default 1);\n"
            "                    0 = ping-pong, one message in flight (echo/packet)\n"
            "  --duration D      seconds of sending (default 10)\n"
            "  --backend B       " TOOL_BACKEND_CHOICES " (default auto)\n"
            "  --workers N       worker threads, 0 = one per CPU (default 0)\n"
            "  --server-pid PID  report that process's resident memory each second\n"
            "  --tls             speak TLS (the server's certificate is not checked...)\n"
            "  --tls-ca FILE     ...unless given the CAs to check it with (PEM)\n"
            "  --ws              speak WebSocket (over TLS with --tls: wss)\n"
            "  --ws-path PATH    the path the upgrade asks for (default /)\n"
            "  --quiet           no progress lines, only the summary\n"
            "  --help            show this text\n"
            "One chat room over several dummies (each to its own server of one bus room):\n"
            "  --room-size T     the room's senders over every dummy, N..%u (default N);\n"
            "                    every session verifies every packet of all T\n"
            "  --first-index F   this dummy's sessions are senders F..F+N-1 (default 0)\n"
            "  --start-at MS     start sending at this Unix time in milliseconds (wall\n"
            "                    clock), once the whole room is heard; give every dummy\n"
            "                    the same; needed when T > N\n"
            "Prints a progress line each second on stderr and a final RESULT line on\n"
            "stdout. Exit status: 0 no errors, 1 errors, 2 bad arguments.\n",
            prog, MAX_SESSIONS, MAX_CHAT_SESSIONS, MAX_CHAT_SESSIONS);
}

/* Prints what was wrong, then the usage, and exits with status 2. */
static void usage_error(const char *fmt, ...) __attribute__((format(TOOL_PRINTF, 1, 2), noreturn));
static void usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    tool_usage_vexit(prog, usage, fmt, ap);
    /* cppcheck-suppress va_end_missing ; tool_usage_vexit does not return (noreturn) */
}

/* The wall clock (CLOCK_REALTIME), which --start-at is given in: the one
 * clock that dummies on different hosts roughly share. */
static uint64_t wall_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t wall_now_ms(void) { return wall_now_ns() / 1000000u; }

/* The room options, once every option is read: they only make sense in chat
 * mode, and this dummy's senders must lie inside the room. */
static void check_room_args(dummy_config *cfg)
{
    bool any = cfg->room_given || cfg->first_index != 0 || cfg->start_at_ms != 0;
    if (any && cfg->mode != MODE_CHAT)
        usage_error("--room-size, --first-index and --start-at are for --mode chat");
    if (!cfg->room_given)
        cfg->room_size = cfg->sessions;
    if ((uint64_t)cfg->first_index + cfg->sessions > cfg->room_size)
        usage_error("senders %u..%llu are outside the room of %u (--first-index, --sessions, "
                    "--room-size)",
                    cfg->first_index, (unsigned long long)cfg->first_index + cfg->sessions - 1,
                    cfg->room_size);
    if (cfg->room_size > cfg->sessions && cfg->start_at_ms == 0)
        usage_error("--room-size above --sessions needs --start-at: every dummy of the room "
                    "must start at the same moment");
    if (cfg->start_at_ms != 0) {
        uint64_t now = wall_now_ms();
        if (cfg->start_at_ms <= now)
            usage_error("--start-at %llu is in the past (now is %llu)", (unsigned long long)cfg->start_at_ms,
                        (unsigned long long)now);
        if (cfg->start_at_ms - now > START_AT_MAX_AHEAD_MS)
            usage_error("--start-at %llu is more than an hour ahead", (unsigned long long)cfg->start_at_ms);
    }
}

static void parse_args(int argc, char **argv, dummy_config *cfg)
{
    *cfg = (dummy_config){
        .host = "127.0.0.1",
        .port = 7777,
        .sessions = 100,
        .mode = MODE_ECHO,
        .size = 64,
        .rate = 1,
        .duration = 10,
        .backend = CP_BACKEND_AUTO,
    };
    static const char *const value_options[] = { "--host",     "--port",       "--sessions",  "--mode",
                                                 "--size",     "--rate",       "--duration",  "--backend",
                                                 "--workers",  "--server-pid", "--room-size", "--first-index",
                                                 "--start-at", "--tls-ca",     "--ws-path",   NULL };
    for (int i = 1; i < argc; i++) {
        const char *opt = argv[i];
        if (strcmp(opt, "--help") == 0 || strcmp(opt, "-h") == 0) {
            usage(stdout);
            /* NOLINTNEXTLINE(concurrency-mt-unsafe): option parsing, before any other thread starts */
            exit(0);
        }
        if (strcmp(opt, "--quiet") == 0 || strcmp(opt, "--tls") == 0 || strcmp(opt, "--ws") == 0) {
            *(opt[2] == 'q' ? &cfg->quiet : opt[2] == 't' ? &cfg->tls : &cfg->ws) = true;
            continue;
        }
        if (!tool_is_option(opt, value_options))
            usage_error(strncmp(opt, "-", 1) == 0 ? "unknown option '%s'" : "unexpected argument '%s'", opt);
        if (i + 1 >= argc)
            usage_error("option %s needs a value", opt);
        const char *val = argv[++i];
        uint64_t n;
        if (strcmp(opt, "--host") == 0) {
            if (*val == '\0')
                usage_error("empty --host");
            cfg->host = val;
        } else if (strcmp(opt, "--port") == 0) {
            if (tool_parse_u64(val, 1, 65535, 0, &n) != 0)
                usage_error("bad --port '%s' (1..65535)", val);
            cfg->port = (uint16_t)n;
        } else if (strcmp(opt, "--sessions") == 0) {
            if (tool_parse_u64(val, 1, MAX_SESSIONS, 0, &n) != 0)
                usage_error("bad --sessions '%s' (1..19000: one process stays below 20000 "
                            "open files)",
                            val);
            cfg->sessions = (uint32_t)n;
        } else if (strcmp(opt, "--mode") == 0) {
            if (strcmp(val, "echo") == 0)
                cfg->mode = MODE_ECHO;
            else if (strcmp(val, "packet") == 0)
                cfg->mode = MODE_PACKET;
            else if (strcmp(val, "chat") == 0)
                cfg->mode = MODE_CHAT;
            else
                usage_error("bad --mode '%s' (echo, packet or chat)", val);
        } else if (strcmp(opt, "--size") == 0) {
            if (tool_parse_u64(val, 1, 1u << 20, 1, &n) != 0)
                usage_error("bad --size '%s' (1..1M)", val);
            cfg->size = (uint32_t)n;
        } else if (strcmp(opt, "--rate") == 0) {
            if (tool_parse_double(val, 0, 1e6, &cfg->rate) != 0)
                usage_error("bad --rate '%s' (0..1000000 per second)", val);
        } else if (strcmp(opt, "--duration") == 0) {
            if (tool_parse_double(val, 0.001, 86400, &cfg->duration) != 0)
                usage_error("bad --duration '%s' (seconds, up to 86400)", val);
        } else if (strcmp(opt, "--backend") == 0) {
            if (tool_parse_backend(val, &cfg->backend) != 0)
                usage_error("bad --backend '%s' (" TOOL_BACKEND_LIST ")", val);
        } else if (strcmp(opt, "--workers") == 0) {
            if (tool_parse_u64(val, 0, 1024, 0, &n) != 0)
                usage_error("bad --workers '%s' (0..1024)", val);
            cfg->workers = (int)n;
        } else if (strcmp(opt, "--server-pid") == 0) {
            if (tool_parse_u64(val, 1, 0x7fffffff, 0, &n) != 0)
                usage_error("bad --server-pid '%s'", val);
            cfg->server_pid = (long)n;
        } else if (strcmp(opt, "--room-size") == 0) {
            if (tool_parse_u64(val, 1, MAX_CHAT_SESSIONS, 0, &n) != 0)
                usage_error("bad --room-size '%s' (1..%u)", val, MAX_CHAT_SESSIONS);
            cfg->room_size = (uint32_t)n;
            cfg->room_given = true;
        } else if (strcmp(opt, "--first-index") == 0) {
            if (tool_parse_u64(val, 0, MAX_CHAT_SESSIONS - 1, 0, &n) != 0)
                usage_error("bad --first-index '%s' (0..%u)", val, MAX_CHAT_SESSIONS - 1);
            cfg->first_index = (uint32_t)n;
        } else if (strcmp(opt, "--ws-path") == 0) {
            if (val[0] != '/')
                usage_error("bad --ws-path '%s' (a path, from /)", val);
            cfg->ws_path = val;
            cfg->ws = true;
        } else if (strcmp(opt, "--tls-ca") == 0) {
            if (*val == '\0')
                usage_error("empty --tls-ca");
            cfg->tls_ca = val;
            cfg->tls = true;
        } else if (strcmp(opt, "--start-at") == 0) {
            if (tool_parse_u64(val, 1, UINT64_MAX / 1000000u, 0, &n) != 0)
                usage_error("bad --start-at '%s' (Unix time in milliseconds)", val);
            cfg->start_at_ms = n;
        } else {
            usage_error("unknown option '%s'", opt);
        }
    }
    /* Constraints between options. */
    if (cfg->mode != MODE_ECHO && cfg->size > CP_PACKET_MAX - CP_PACKET_HEADER)
        usage_error("--size %u is too big: a packet body holds at most 65531 bytes", cfg->size);
    if (cfg->mode == MODE_CHAT) {
        if (cfg->size < CHAT_FIXED)
            usage_error("--size must be at least 16 in chat mode");
        if (cfg->rate <= 0)
            usage_error("--rate must be above 0 in chat mode");
        if (cfg->sessions > MAX_CHAT_SESSIONS)
            usage_error("chat mode supports at most %u sessions", MAX_CHAT_SESSIONS);
    }
    check_room_args(cfg);
}

/* ------------------------------------------------------------------ progress */

static uint64_t total_sent(dummy_state *st)
{
    uint64_t n = 0;
    for (uint32_t i = 0; i < st->cfg.sessions; i++)
        n += atomic_load_explicit(&st->slots[i].sent, memory_order_relaxed);
    return n;
}

static uint64_t total_received(dummy_state *st)
{
    uint64_t n = 0;
    for (uint32_t i = 0; i < st->cfg.sessions; i++)
        n += get(&st->slots[i].received);
    return n;
}

static uint32_t count_alive(dummy_state *st)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < st->cfg.sessions; i++)
        n += atomic_load(&st->slots[i].alive);
    return n;
}

static uint64_t error_count(dummy_state *st)
{
    return get(&st->connect_failed) + get(&st->disconnects) + get(&st->corrupt) + get(&st->out_of_order) +
           get(&st->gap_lost) + get(&st->send_errors);
}

/* What the progress line compares against: the previous line's totals. */
typedef struct progress {
    uint64_t started_ns;
    uint64_t last_ns;
    uint64_t sent, received;
    uint64_t *hist_prev, *hist_now, *hist_delta;
} progress;

static void print_progress(dummy_state *st, progress *p, uint64_t now, const char *phase)
{
    uint64_t sent = total_sent(st), received = total_received(st);
    double dt = (double)(now - p->last_ns) / 1e9;
    if (dt <= 0)
        dt = 1;
    hist_snapshot(st, p->hist_now);
    for (unsigned i = 0; i < HIST_BUCKETS; i++)
        p->hist_delta[i] = p->hist_now[i] - p->hist_prev[i];
    uint64_t *swap = p->hist_prev;
    p->hist_prev = p->hist_now;
    p->hist_now = swap;

    if (!st->cfg.quiet) {
        char rss[32] = "";
        if (st->cfg.server_pid > 0) {
            long kib = tool_process_rss_kib(st->cfg.server_pid);
            if (kib >= 0)
                snprintf(rss, sizeof rss, " server_rss=%.1fMiB", (double)kib / 1024.0);
            else
                snprintf(rss, sizeof rss, " server_rss=gone");
        }
        char heard[48] = "";
        if (st->cfg.room_given)
            snprintf(heard, sizeof heard, " heard=%u/%u", atomic_load(&st->heard_count), st->cfg.room_size);
        fprintf(stderr, "[%6.1fs] %-7s sessions=%u/%u out/s=%.0f in/s=%.0f p99=%.2fms errors=%llu%s%s\n",
                (double)(now - p->started_ns) / 1e9, phase, count_alive(st), st->cfg.sessions,
                (double)(sent - p->sent) / dt, (double)(received - p->received) / dt,
                (double)hist_percentile(p->hist_delta, 0.99) / 1e6, (unsigned long long)error_count(st), rss,
                heard);
    }
    p->sent = sent;
    p->received = received;
    p->last_ns = now;
}

/* Waits up to timeout_ns for a stop signal (SIGINT/SIGTERM; Windows: Ctrl-C,
 * console close). Returns true if one came. */
static bool wait_for_signal(uint64_t timeout_ns)
{
    int sig = tool_stop_requested();
    if (sig == 0) {
        tool_sleep_ns(timeout_ns);
        sig = tool_stop_requested();
    }
    if (sig > 0) {
        fprintf(stderr, "%s: %s received, finishing early\n", prog, sig == SIGINT ? "SIGINT" : "SIGTERM");
        return true;
    }
    return false;
}

/* ------------------------------------------------------------------ phases */

/* Waits until every session is ready (chat: in the room). Returns true if
 * they all are; false on timeout, failures or a signal. */
static bool wait_ready(dummy_state *st, progress *p)
{
    uint64_t deadline = p->started_ns + CONNECT_TIMEOUT_NS;
    for (;;) {
        uint32_t ready = atomic_load(&st->ready);
        if (ready >= st->cfg.sessions)
            return true;
        uint64_t now = tool_now_ns();
        /* Every session has either become ready or failed: no point waiting. */
        if (ready + get(&st->connect_failed) + get(&st->disconnects) >= st->cfg.sessions)
            break;
        if (now >= deadline)
            break;
        if (now - p->last_ns >= REPORT_NS)
            print_progress(st, p, now, "connect");
        if (wait_for_signal(10 * TICK_NS))
            return false;
    }
    int err = atomic_load(&st->last_connect_error);
    fprintf(stderr,
            "%s: only %u of %u sessions %s (limit %.0f s; %llu connects failed%s%s, "
            "%llu disconnected)\n",
            prog, atomic_load(&st->ready), st->cfg.sessions,
            st->cfg.mode == MODE_CHAT ? "connected and joined the room" : "connected",
            (double)CONNECT_TIMEOUT_NS / 1e9, (unsigned long long)get(&st->connect_failed),
            err ? ", last: " : "", err ? cp_strerror(err) : "", (unsigned long long)get(&st->disconnects));
    return false;
}

/* Sends every live session's hello again (main thread, before the start). A
 * failed send means the session is going away: its disconnect is the error. */
static void repeat_hellos(dummy_state *st)
{
    for (uint32_t i = 0; i < st->cfg.sessions; i++) {
        session_slot *slot = &st->slots[i];
        cp_session *s = atomic_load_explicit(&slot->session, memory_order_acquire);
        if (s != NULL && atomic_load(&slot->alive))
            (void)send_hello(slot, s);
    }
}

/* chat, once our sessions are ready: waits until this dummy has heard every
 * sender of the room and, with --start-at, for that moment, repeating the
 * hellos meanwhile. Sets *start (CLOCK_MONOTONIC ns) to when sending begins.
 * With one dummy and no --start-at that is at once. Returns false on a
 * timeout, a start time that passed, a disconnect or a signal. */
static bool wait_room(dummy_state *st, progress *p, uint64_t *start)
{
    const dummy_config *cfg = &st->cfg;
    uint64_t now = tool_now_ns();
    uint64_t deadline = p->started_ns + CONNECT_TIMEOUT_NS;
    *start = now;
    if (cfg->mode != MODE_CHAT)
        return true;
    if (cfg->start_at_ms != 0) {
        uint64_t at_ns = cfg->start_at_ms * 1000000u, wall = wall_now_ns();
        if (at_ns <= wall) {
            fprintf(stderr, "%s: the start time (--start-at) passed before our sessions joined the room\n",
                    prog);
            return false;
        }
        *start = deadline = now + (at_ns - wall);
    }
    uint64_t next_hello = now + HELLO_REPEAT_NS;
    for (;;) {
        now = tool_now_ns();
        bool heard_all = atomic_load(&st->heard_count) >= cfg->room_size;
        if (heard_all && now >= *start)
            return true;
        if (now >= deadline || get(&st->disconnects) != 0)
            break;
        if (now >= next_hello) {
            repeat_hellos(st);
            next_hello = now + HELLO_REPEAT_NS;
        }
        if (now - p->last_ns >= REPORT_NS)
            print_progress(st, p, now, "room");
        uint64_t left = deadline - now;
        if (wait_for_signal(left < TICK_NS ? left : TICK_NS))
            return false;
    }
    fprintf(stderr, "%s: heard from %u of the room's %u senders by %s (%llu disconnected)\n", prog,
            atomic_load(&st->heard_count), cfg->room_size,
            cfg->start_at_ms != 0 ? "the start time (--start-at)" : "the connect limit",
            (unsigned long long)get(&st->disconnects));
    return false;
}

/* The send phase, from start (CLOCK_MONOTONIC ns). Send number j overall
 * (counting over all senders of the room) is due at start + j / (rate × room)
 * and belongs to sender j mod room, which is ours if it is one of our
 * sessions: each sender sends at its rate, and the sends are spread evenly
 * over every second instead of all firing on the same tick. Every dummy of a
 * room runs this same schedule from the same instant. */
static bool run_sending(dummy_state *st, progress *p, uint64_t start)
{
    uint64_t end = start + (uint64_t)(st->cfg.duration * 1e9);
    atomic_store(&st->sending, true);

    if (st->cfg.rate == 0) { /* ping-pong: one first message each, the echoes drive the rest */
        for (uint32_t i = 0; i < st->cfg.sessions; i++)
            send_scheduled(st, &st->slots[i]);
    }
    double gap_ns = st->cfg.rate > 0 ? 1e9 / (st->cfg.rate * st->cfg.room_size) : 0;
    uint64_t j = 0;
    for (;;) {
        uint64_t now = tool_now_ns();
        if (gap_ns > 0) {
            /* Everything due by now, but nothing due at or after the end:
             * a whole run sends exactly rate × sessions × duration. */
            uint64_t until = now < end ? now : end - 1;
            while (start + (uint64_t)((double)j * gap_ns) <= until) {
                /* NOLINTNEXTLINE(clang-analyzer-core.DivideZero): gap_ns > 0 needs rate > 0; room >= 1 */
                uint32_t ours = (uint32_t)(j % st->cfg.room_size) - st->cfg.first_index;
                if (ours < st->cfg.sessions)
                    send_scheduled(st, &st->slots[ours]);
                j++;
            }
        }
        if (now >= end)
            break;
        if (now - p->last_ns >= REPORT_NS) {
            print_progress(st, p, now, "send");
            if (count_alive(st) == 0) {
                fprintf(stderr, "%s: every session is gone, stopping early\n", prog);
                break;
            }
        }
        uint64_t until_end = end - now;
        if (wait_for_signal(until_end < TICK_NS ? until_end : TICK_NS)) {
            atomic_store(&st->sending, false);
            return false;
        }
    }
    atomic_store(&st->sending, false);
    return true;
}

/* True once every live session has got everything it is owed. While there
 * are disconnects the owed amount is not exact, so then we simply wait. */
static bool drained(dummy_state *st)
{
    if (count_alive(st) == 0)
        return true; /* nobody left to receive anything */
    if (get(&st->disconnects) != 0)
        return false;
    if (st->cfg.mode == MODE_CHAT)
        return total_received(st) >= (total_sent(st) + st->others_sends) * st->cfg.sessions;
    return total_received(st) >= total_sent(st);
}

static void wait_drained(dummy_state *st, progress *p)
{
    uint64_t deadline = tool_now_ns() + DRAIN_TIMEOUT_NS;
    for (;;) {
        uint64_t now = tool_now_ns();
        if (drained(st) || now >= deadline)
            return;
        if (now - p->last_ns >= REPORT_NS)
            print_progress(st, p, now, "drain");
        tool_sleep_ns(5 * TICK_NS);
    }
}

/* ------------------------------------------------------------------ verdict */

/* How many sends the room's schedule holds (run_sending's loop): every j
 * with start + (j × gap) ≤ end - 1, in the same arithmetic. */
static uint64_t schedule_total(const dummy_config *cfg)
{
    uint64_t dur = (uint64_t)(cfg->duration * 1e9);
    double gap_ns = 1e9 / (cfg->rate * cfg->room_size);
    uint64_t j = (uint64_t)((double)(dur - 1) / gap_ns);
    while (j > 0 && (uint64_t)((double)j * gap_ns) > dur - 1)
        j--;
    while ((uint64_t)((double)(j + 1) * gap_ns) <= dur - 1)
        j++;
    return j + 1; /* j = 0 is due at the start itself */
}

/* Sends the schedule gives room sender s: one in every room_size. */
static uint64_t scheduled_sends(const dummy_state *st, uint32_t s)
{
    uint64_t room = st->cfg.room_size;
    return st->room_sends / room + (s < st->room_sends % room);
}

typedef struct verdict {
    uint64_t sent, received, expected, lost;
} verdict;

/* Called after cp_service_stop: no callback runs any more, so the per-slot
 * receive state can be read without synchronization. Pairs that involve a
 * session of ours that disconnected are left out: that disconnect is the
 * error. Another dummy's sender owes what the schedule gave it: if it sent
 * less, that dummy fails, and so do its receivers here. */
static verdict judge(dummy_state *st)
{
    verdict v = { 0 };
    uint32_t n = st->cfg.sessions;
    for (uint32_t i = 0; i < n; i++) {
        session_slot *slot = &st->slots[i];
        v.sent += atomic_load(&slot->sent);
        v.received += get(&slot->received);
    }
    if (st->cfg.mode != MODE_CHAT) {
        for (uint32_t i = 0; i < n; i++) {
            session_slot *slot = &st->slots[i];
            if (!slot->survived)
                continue;
            uint64_t sent = atomic_load(&slot->sent), got = get(&slot->received);
            v.expected += sent;
            v.lost += sent > got ? sent - got : 0;
        }
        return v;
    }
    v.lost = get(&st->gap_lost);
    for (uint32_t r = 0; r < n; r++) {
        const session_slot *rx = &st->slots[r];
        if (!rx->survived)
            continue;
        for (uint32_t s = 0; s < st->cfg.room_size; s++) {
            uint32_t ours = s - st->cfg.first_index, sent;
            if (ours < n) {
                session_slot *tx = &st->slots[ours];
                if (!tx->survived)
                    continue;
                sent = (uint32_t)atomic_load(&tx->sent);
            } else {
                sent = (uint32_t)scheduled_sends(st, s);
            }
            uint32_t got = rx->next_seq[s];
            v.expected += sent;
            v.lost += got < sent ? sent - got : 0;
        }
    }
    return v;
}

/* ------------------------------------------------------------------ main */

static int setup_state(dummy_state *st)
{
    uint32_t n = st->cfg.sessions, room = st->cfg.room_size;
    st->slots = tool_aligned_alloc(64, sizeof *st->slots * n);
    st->hists = calloc(HIST_THREADS, sizeof *st->hists);
    if (st->slots == NULL || st->hists == NULL)
        return -ENOMEM;
    memset(st->slots, 0, sizeof *st->slots * n);
    if (st->cfg.mode == MODE_CHAT) {
        st->chat_matrix = calloc((size_t)n * room, sizeof *st->chat_matrix);
        st->heard = calloc(room, sizeof *st->heard);
        if (st->chat_matrix == NULL || st->heard == NULL)
            return -ENOMEM;
        st->room_sends = schedule_total(&st->cfg);
        for (uint32_t s = 0; s < room; s++)
            if (s - st->cfg.first_index >= n)
                st->others_sends += scheduled_sends(st, s);
    } else {
        st->send_ring = calloc((size_t)n * ECHO_WINDOW, sizeof *st->send_ring);
        if (st->send_ring == NULL)
            return -ENOMEM;
    }
    for (uint32_t i = 0; i < n; i++) {
        session_slot *slot = &st->slots[i];
        slot->index = st->cfg.first_index + i;
        if (st->chat_matrix != NULL)
            slot->next_seq = st->chat_matrix + (size_t)i * room;
        if (st->send_ring != NULL)
            slot->send_ns = st->send_ring + (size_t)i * ECHO_WINDOW;
    }
    return 0;
}

static void free_state(dummy_state *st)
{
    tool_aligned_free(st->slots);
    free(st->hists);
    free(st->chat_matrix);
    free(st->heard);
    free(st->send_ring);
}

static void print_reasons(dummy_state *st)
{
    for (int r = 0; r < CP_REASON_COUNT_; r++) {
        uint64_t n = get(&st->by_reason[r]);
        if (n != 0)
            fprintf(stderr, "%s:   disconnects by reason: %s=%llu\n", prog, cp_reason_str((cp_reason)r),
                    (unsigned long long)n);
    }
}

/* The client service's options for this run. */
static cp_client_opts client_options(const dummy_config *cfg)
{
    size_t packet_bytes = CP_PACKET_HEADER + (size_t)cfg->size;
    /* Room for a full echo window of our own messages, between the 1 MiB
     * default and 64 MiB: a server that cannot keep up with more than that
     * shows as a send-overflow disconnect, which fails the run. */
    size_t send_queue_limit = packet_bytes * ECHO_WINDOW;
    if (send_queue_limit < ((size_t)1 << 20))
        send_queue_limit = (size_t)1 << 20;
    if (send_queue_limit > ((size_t)64 << 20))
        send_queue_limit = (size_t)64 << 20;
    return (cp_client_opts){
        .host = cfg->host,
        .port = cfg->port,
        .sessions = cfg->sessions,
        .session = {
            .framing = cfg->mode == MODE_ECHO ? CP_FRAMING_RAW : CP_FRAMING_PACKET,
            /* Room for our own packets (raw framing ignores it; 0 = default). */
            .max_packet = cfg->mode != MODE_ECHO && packet_bytes > 4096 ? (uint32_t)packet_bytes : 0,
            .send_queue_limit = send_queue_limit,
        },
    };
}

/* Prints the human summary (stderr) and the RESULT line (stdout). Called
 * after the service stopped. Returns nonzero if the run failed. */
static int report(dummy_state *st, int shutdown_errors, double secs, bool completed)
{
    verdict v = judge(st);
    uint64_t lat[HIST_BUCKETS];
    hist_snapshot(st, lat);
    double p50 = (double)hist_percentile(lat, 0.50) / 1e6;
    double p99 = (double)hist_percentile(lat, 0.99) / 1e6;
    double pmax = (double)hist_max(lat) / 1e6;
    uint32_t ready = atomic_load(&st->ready);
    /* A failed connect also leaves a session not ready: count it once. */
    uint64_t not_ready = st->cfg.sessions - ready;
    uint64_t connect_errors = not_ready > get(&st->connect_failed) ? not_ready : get(&st->connect_failed);
    uint64_t errors = v.lost + get(&st->out_of_order) + get(&st->corrupt) + connect_errors +
                      get(&st->disconnects) + get(&st->send_errors) + (uint64_t)shutdown_errors;

    fprintf(stderr,
            "%s: %s %s: %u/%u sessions, %.1fs of sending, sent=%llu received=%llu "
            "expected=%llu (%.0f/s in), latency p50=%.3fms p99=%.3fms max=%.3fms, errors=%llu%s\n",
            prog, mode_names[st->cfg.mode], errors == 0 ? "PASSED" : "FAILED", ready, st->cfg.sessions, secs,
            (unsigned long long)v.sent, (unsigned long long)v.received, (unsigned long long)v.expected,
            secs > 0 ? (double)v.received / secs : 0.0, p50, p99, pmax, (unsigned long long)errors,
            completed ? "" : " (run cut short)");
    if (get(&st->disconnects) != 0)
        print_reasons(st);
    if (get(&st->window_full) != 0)
        fprintf(stderr, "%s: note: %llu sends skipped, %u messages were already in flight\n", prog,
                (unsigned long long)get(&st->window_full), ECHO_WINDOW);
    printf("RESULT mode=%s sessions=%u connected=%u sent=%llu received=%llu expected=%llu "
           "lost=%llu out_of_order=%llu corrupt=%llu p50_ms=%.3f p99_ms=%.3f max_ms=%.3f "
           "connect_failed=%llu disconnects=%llu send_errors=%llu errors=%llu status=%s\n",
           mode_names[st->cfg.mode], st->cfg.sessions, ready, (unsigned long long)v.sent,
           (unsigned long long)v.received, (unsigned long long)v.expected, (unsigned long long)v.lost,
           (unsigned long long)get(&st->out_of_order), (unsigned long long)get(&st->corrupt), p50, p99, pmax,
           (unsigned long long)get(&st->connect_failed), (unsigned long long)get(&st->disconnects),
           (unsigned long long)get(&st->send_errors), (unsigned long long)errors,
           errors == 0 ? "ok" : "fail");
    fflush(stdout);
    return errors != 0;
}

int main(int argc, char **argv)
{
    static dummy_state state; /* static: zeroed atomics */
    dummy_state *st = &state;
    parse_args(argc, argv, &st->cfg);
    const dummy_config *cfg = &st->cfg;

    /* Before any other thread exists: SIGINT/SIGTERM (Windows: Ctrl-C, console
     * close) are caught from here on, by a watcher thread, and polled below. */
    int rc = tool_stop_init();
    if (rc != 0) {
        fprintf(stderr, "%s: cannot watch for stop signals: %s\n", prog, cp_strerror(rc));
        return 1;
    }
    cp_set_log(tool_log_sink, (void *)prog);

    uint64_t want = (uint64_t)cfg->sessions + 256;
    if (tool_raise_nofile(want) < want) {
        fprintf(stderr, "%s: the open-file limit is below %llu, needed for %u sessions (ulimit -n)\n", prog,
                (unsigned long long)want, cfg->sessions);
        return 1;
    }
    if (setup_state(st) != 0) {
        fprintf(stderr, "%s: out of memory for %u sessions\n", prog, cfg->sessions);
        free_state(st);
        return 1;
    }

    cp_port *port = NULL;
    int status = tool_create_port(prog, &port,
                                  &(cp_port_opts){ .workers = cfg->workers, .backend = cfg->backend });
    if (status != 0) {
        free_state(st);
        return status;
    }

    cp_handlers handlers = {
        .on_connected = on_connected,
        .on_connect_failed = on_connect_failed,
        .on_disconnected = on_disconnected,
    };
    switch (cfg->mode) {
    case MODE_ECHO: handlers.on_recv = echo_on_recv; break;
    case MODE_PACKET: handlers.on_packet = packet_on_packet; break;
    case MODE_CHAT: handlers.on_packet = chat_on_packet; break;
    }
    cp_client_opts opts = client_options(cfg);
    if (cfg->tls) {
        /* With --tls-ca the server must prove it is the host we were given. */
        cp_tls_opts to = { .ca_file = cfg->tls_ca, .verify = cfg->tls_ca != NULL, .sni = cfg->host };
        rc = cp_tls_create(&opts.session.tls, &to);
        if (rc != 0) {
            fprintf(stderr, "%s: cannot set up TLS: %s\n", prog, cp_strerror(rc));
            cp_port_destroy(port);
            free_state(st);
            return 1;
        }
    }
    if (cfg->ws) {
        cp_ws_opts wo = { .path = cfg->ws_path };
        rc = cp_ws_create(&opts.session.ws, &wo);
        if (rc != 0) {
            fprintf(stderr, "%s: cannot set up WebSocket: %s\n", prog, cp_strerror(rc));
            cp_tls_unref(opts.session.tls);
            cp_port_destroy(port);
            free_state(st);
            return 1;
        }
    }

    uint64_t hist_bufs[3][HIST_BUCKETS];
    progress prog_state = { .started_ns = tool_now_ns(),
                            .hist_prev = hist_bufs[0],
                            .hist_now = hist_bufs[1],
                            .hist_delta = hist_bufs[2] };
    memset(hist_bufs, 0, sizeof hist_bufs);
    prog_state.last_ns = prog_state.started_ns;

    if (!cfg->quiet)
        fprintf(stderr,
                "%s: %s mode, %u sessions to %s:%u, size=%u rate=%g/s duration=%gs "
                "backend=%s workers=%d\n",
                prog, mode_names[cfg->mode], cfg->sessions, cfg->host, cfg->port, cfg->size, cfg->rate,
                cfg->duration, cp_port_backend_name(port), cp_port_workers(port));
    if (!cfg->quiet && cfg->room_given)
        fprintf(stderr,
                "%s: one room of %u senders, ours %u..%u, sending from Unix ms %llu "
                "(0: once the room is heard)\n",
                prog, cfg->room_size, cfg->first_index, cfg->first_index + cfg->sessions - 1,
                (unsigned long long)cfg->start_at_ms);

    cp_service *svc = NULL;
    rc = cp_client_start(&svc, port, &opts, &handlers, st);
    cp_tls_unref(opts.session.tls); /* the service keeps its own */
    cp_ws_unref(opts.session.ws);
    if (rc != 0) {
        fprintf(stderr, "%s: cannot start the client service: %s\n", prog, cp_strerror(rc));
        cp_port_destroy(port);
        free_state(st);
        return 1;
    }

    bool completed = false;
    uint64_t send_started = 0, send_ended = 0;
    if (wait_ready(st, &prog_state) && wait_room(st, &prog_state, &send_started)) {
        completed = run_sending(st, &prog_state, send_started);
        send_ended = tool_now_ns();
        wait_drained(st, &prog_state);
        print_progress(st, &prog_state, tool_now_ns(), "end");
    }

    /* From here on disconnects are ours. Release the kept references before
     * the stop frees the service; the main thread no longer sends. */
    for (uint32_t i = 0; i < cfg->sessions; i++)
        st->slots[i].survived = atomic_load(&st->slots[i].ready) && atomic_load(&st->slots[i].alive);
    atomic_store(&st->stopping, true);
    for (uint32_t i = 0; i < cfg->sessions; i++) {
        cp_session *s = atomic_exchange(&st->slots[i].session, NULL);
        if (s != NULL)
            cp_session_unref(s);
    }
    rc = cp_service_stop(svc);
    if (rc != 0)
        fprintf(stderr, "%s: cp_service_stop: %s\n", prog, cp_strerror(rc));
    int rc2 = rc == 0 ? cp_port_destroy(port) : 0;
    if (rc2 != 0)
        fprintf(stderr, "%s: cp_port_destroy: %s\n", prog, cp_strerror(rc2));
    cp_set_log(NULL, NULL);

    double secs = send_ended > send_started ? (double)(send_ended - send_started) / 1e9 : 0;
    int failed = report(st, (rc != 0) + (rc2 != 0), secs, completed);
    free_state(st);
    return failed ? 1 : 0;
}
