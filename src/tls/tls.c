/* SPDX-License-Identifier: MIT */
/*
 * TLS for sessions: OpenSSL 3 as a byte-stream filter (net.h, cp_filter).
 *
 * Nothing here touches a socket. Ciphertext comes in from the backend's own
 * receive buffer and leaves through the session's wire queue, so TLS runs
 * the same on every backend (SSL_set_fd would only work on epoll). Each
 * session's SSL object reads and writes through one small BIO of ours:
 * reads take from the receive the backend lends for the call (in/in_len),
 * writes append to pooled send buffers (out) that go to the wire queue. A
 * session between records therefore keeps no receive memory of ours, and
 * with SSL_MODE_RELEASE_BUFFERS none of OpenSSL's either.
 *
 * Sending: what a session queued during a round is encrypted at once, small
 * buffers copied into one 16 KiB plaintext block first, so 16 small packets
 * make one record, not 16 (OpenSSL cannot encrypt a gather list); buffers
 * of a block or more are encrypted from where they are. A broadcast's
 * shared buffer is encrypted once per TLS member; plain members still share
 * it.
 *
 * Handshakes cost a quarter of a millisecond of CPU each: a worker starts at
 * most handshakes_per_round new ones per round. A hello past that waits,
 * copied aside with the session's receive paused (CP_RX_FILTER), in arrival
 * order, for the next rounds.
 *
 * OpenSSL keeps errors in a per-thread queue: every call into it here starts
 * with that queue empty and leaves it empty, so one session's error never
 * shows up as another's.
 */
#include "net/net.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#define PLAIN_BLOCK (16u * 1024u)     /* one TLS record's worth of plaintext */
#define OUT_CAP (PLAIN_BLOCK + 1024u) /* a record and its overhead */
/* A ciphertext buffer is opened for what the write in hand needs, at least
 * this much: small records are carved from the thread's chunk, whose unused
 * rest is given back at close, instead of each pinning a whole record's
 * worth while it waits to be written. */
#define OUT_MIN 2048u
#define HS_PER_ROUND_DEFAULT 8u
/* Handshake work a worker does per round once one step has run: a full
 * handshake's first step costs about 0.3 ms here, so this makes it one such
 * step a round, and a few of the cheap second steps (the client's Finished,
 * the ticket). Established sessions then wait at most about this much a
 * round for the handshakes of a reconnect storm. */
#define HS_ROUND_NS 250000u
#define HANDSHAKE_MS_DEFAULT 10000u
#define STASH_MAX (16u * 1024u) /* a waiting handshake's input at most */

struct cp_tls {
    cp_filter_kind kind; /* first: a service holds its cp_tls as this (net.h) */
    atomic_uint refs;
    pthread_mutex_t lock; /* guards ctx */
    SSL_CTX *ctx;         /* the current context; cp_tls_reload replaces it */
    uint8_t ticket_key[CP_TLS_TICKET_KEY_LEN];
    char *sni, *ca_file;
    int verify, min_version, no_tickets;
    uint32_t hs_per_round;
};

/* Bytes of wire written before the user's bytes in them count as sent. */
typedef struct tls_mark {
    uint64_t wire_end;
    uint64_t plain;
} tls_mark;

typedef struct tls_filter {
    cp_filter base; /* first (net.h); base.s is the session */
    cp_tls *tls;
    cp_sendq wire; /* the records made, in order, which the session writes */
    SSL *ssl;      /* on a server, NULL until the first handshake step (tls_attach) */
    /* What the BIO reads now: the receive being handled, or the stash. */
    const uint8_t *in;
    size_t in_len;
    /* The open ciphertext buffer the BIO appends to. */
    cp_sendbuf *out;
    size_t out_len;
    uint64_t wire_made, wire_done; /* ciphertext bytes queued and written so far */
    tls_mark *marks;               /* ring: user bytes finished at each wire end */
    uint32_t mhead, mlen, mcap;
    tls_mark marks_in[2]; /* the ring while it is this small (most of the time); a power of two */
    /* A hello that waits for its turn (the handshake budget). */
    uint8_t *stash;
    uint32_t stash_len;
    bool started; /* the handshake has had its first step */
    bool waiting; /* in the worker's queue of handshakes to start */
    bool up;      /* handshake done */
    cp_queue wait_link;
} tls_filter;

static const cp_filter_ops tls_ops;

static tls_filter *tls_of(cp_filter *f) { return (tls_filter *)(void *)f; }

/* ------------------------------------------------------------------ errors */

/* Empties this thread's error queue, logging its first entry at debug
 * level for the session (a client that speaks garbage is no operator's
 * concern at a higher level). */
static void errors_drain(const cp_session *s, const char *what)
{
    unsigned long e = ERR_get_error();
    if (e) {
        char buf[160];
        ERR_error_string_n(e, buf, sizeof buf);
        cp__log(CP_LOG_DEBUG, "tls: session %llu: %s: %s", (unsigned long long)cp_session_id(s), what, buf);
    }
    ERR_clear_error();
}

/* ------------------------------------------------------------------ the BIO */

static void out_flush(tls_filter *f)
{
    if (!f->out)
        return;
    cp_sendbuf *b = f->out;
    f->out = NULL;
    cp__sendbuf_close(b, f->out_len);
    f->wire_made += f->out_len;
    /* The wire queue takes any buffer: what it holds is bounded by the
     * user's queue it was made from (send_queue_limit counts both). */
    if (cp__sendq_push(&f->wire, b, SIZE_MAX) < 0) {
        cp_sendbuf_unref(b);
        cp__session_request_close(f->base.s, CP_REASON_NO_MEMORY);
    }
}

static int bio_write(BIO *bio, const char *data, size_t len, size_t *written)
{
    tls_filter *f = BIO_get_data(bio);
    size_t left = len;
    while (left) {
        if (f->out && f->out->cap - f->out_len < left && f->out_len)
            out_flush(f); /* a record is not split over two buffers */
        if (!f->out) {
            size_t cap = left < OUT_MIN ? OUT_MIN : left < OUT_CAP ? left : OUT_CAP;
            f->out = cp__sendbuf_open(cap);
            if (!f->out)
                return 0;
            f->out_len = 0;
        }
        size_t room = f->out->cap - f->out_len;
        size_t take = room < left ? room : left;
        memcpy(f->out->data + f->out_len, data, take);
        f->out_len += take;
        data += take;
        left -= take;
        if (f->out_len == f->out->cap)
            out_flush(f);
    }
    *written = len;
    return 1;
}

static int bio_read(BIO *bio, char *buf, size_t len, size_t *readbytes)
{
    tls_filter *f = BIO_get_data(bio);
    BIO_clear_retry_flags(bio);
    if (!f->in_len) {
        BIO_set_retry_read(bio);
        return 0;
    }
    size_t take = len < f->in_len ? len : f->in_len;
    memcpy(buf, f->in, take);
    f->in += take;
    f->in_len -= take;
    *readbytes = take;
    return 1;
}

static long bio_ctrl(BIO *bio, int cmd, long num, void *ptr)
{
    (void)bio, (void)num, (void)ptr;
    return cmd == BIO_CTRL_FLUSH ? 1 : 0;
}

static int bio_create(BIO *bio)
{
    BIO_set_init(bio, 1);
    return 1;
}

static BIO_METHOD *bio_method;
static pthread_once_t bio_once = PTHREAD_ONCE_INIT;

static void bio_method_make(void)
{
    BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "cport session");
    if (m && BIO_meth_set_write_ex(m, bio_write) && BIO_meth_set_read_ex(m, bio_read) &&
        BIO_meth_set_ctrl(m, bio_ctrl) && BIO_meth_set_create(m, bio_create))
        bio_method = m;
}

/* ------------------------------------------------------------------ sent bytes */

/* The user's bytes in the wire made so far are done once it is written. */
static int mark_push(tls_filter *f, uint64_t plain)
{
    if (!plain)
        return 0;
    if (f->mlen && f->marks[(f->mhead + f->mlen - 1) & (f->mcap - 1)].wire_end == f->wire_made) {
        f->marks[(f->mhead + f->mlen - 1) & (f->mcap - 1)].plain += plain;
        return 0;
    }
    if (f->mlen == f->mcap) {
        uint32_t cap = f->mcap * 2;
        tls_mark *m = cp__malloc(sizeof *m * cap);
        if (!m)
            return -ENOMEM;
        for (uint32_t i = 0; i < f->mlen; i++)
            m[i] = f->marks[(f->mhead + i) & (f->mcap - 1)];
        if (f->marks != f->marks_in)
            cp__free(f->marks);
        f->marks = m;
        f->mcap = cap;
        f->mhead = 0;
    }
    f->marks[(f->mhead + f->mlen++) & (f->mcap - 1)] = (tls_mark){ f->wire_made, plain };
    return 0;
}

static size_t tls_written(cp_filter *bf, size_t n)
{
    tls_filter *f = tls_of(bf);
    f->wire_done += n;
    size_t plain = 0;
    while (f->mlen && f->marks[f->mhead].wire_end <= f->wire_done) {
        plain += (size_t)f->marks[f->mhead].plain;
        f->mhead = (f->mhead + 1) & (f->mcap - 1);
        f->mlen--;
    }
    if (!f->mlen && f->marks != f->marks_in) {
        cp__free(f->marks); /* back to the small ring: an idle session keeps no more */
        f->marks = f->marks_in;
        f->mcap = 2;
        f->mhead = 0;
    }
    return plain;
}

/* ------------------------------------------------------------------ sending */

static _Thread_local uint8_t plain_block[PLAIN_BLOCK];

/* One SSL_write of len bytes; false after closing the session. Our BIO
 * takes everything, so a write never waits. */
static bool write_all(tls_filter *f, const uint8_t *p, size_t len)
{
    ERR_clear_error();
    size_t done = 0;
    if (!SSL_write_ex(f->ssl, p, len, &done) || done != len) {
        errors_drain(f->base.s, "write");
        cp__session_close(f->base.s, CP_REASON_TLS, -EPROTO);
        return false;
    }
    return true;
}

/* Encrypts the session's whole plain queue: runs of small buffers through
 * the block, each large one from where it is. */
static void tls_encode(cp_filter *bf)
{
    tls_filter *f = tls_of(bf);
    cp_session *s = bf->s;
    if (!f->up)
        return;
    size_t fill = 0, total = 0;
    cp_sendq *q = cp__filter_source(bf);
    struct iovec iov[64];
    while (q->count) {
        int n = cp__sendq_gather(q, iov, 64, SIZE_MAX);
        size_t taken = 0;
        for (int i = 0; i < n; i++) {
            const uint8_t *p = iov[i].iov_base;
            size_t len = iov[i].iov_len;
            if (len >= PLAIN_BLOCK) {
                if ((fill && !write_all(f, plain_block, fill)) || !write_all(f, p, len))
                    return;
                fill = 0;
            } else {
                if (fill + len > PLAIN_BLOCK) {
                    if (!write_all(f, plain_block, fill))
                        return;
                    fill = 0;
                }
                memcpy(plain_block + fill, p, len);
                fill += len;
            }
            taken += len;
        }
        total += cp__sendq_consume(q, taken); /* the user's bytes among them */
    }
    if (fill && !write_all(f, plain_block, fill))
        return;
    out_flush(f);
    if (mark_push(f, total) < 0)
        cp__session_request_close(s, CP_REASON_NO_MEMORY);
}

static bool tls_finish(cp_filter *bf)
{
    tls_filter *f = tls_of(bf);
    if (!f->up)
        return false;
    ERR_clear_error();
    (void)SSL_shutdown(f->ssl); /* queues close_notify; the peer's answer is not awaited */
    ERR_clear_error();
    out_flush(f);
    return f->wire.count > 0;
}

/* ------------------------------------------------------------------ handshake budget */

/* Per worker thread: handshakes started this round, and the sessions whose
 * hello waits, oldest first. */
static _Thread_local struct {
    uint32_t round;
    uint32_t steps, firsts; /* handshake steps run this round, and how many began one */
    uint64_t spent_ns;      /* the time they took */
    cp_queue waiting;
    bool init, posted;
    cp_posted at_end;
} hs;

static size_t feed(tls_filter *f, const uint8_t *data, size_t n);
static bool ssl_make(tls_filter *f);

static void hs_run_waiting(cp_worker *w, cp_posted *p);

static void hs_post(cp_worker *w)
{
    if (hs.posted)
        return;
    hs.posted = true;
    hs.at_end.fn = hs_run_waiting;
    cp__post_round_end(w, &hs.at_end);
}

static void hs_round(const cp_worker *w)
{
    if (!hs.init) {
        cp__queue_init(&hs.waiting);
        hs.init = true;
    }
    if (hs.round != w->round) {
        hs.round = w->round;
        hs.steps = hs.firsts = 0;
        hs.spent_ns = 0;
    }
}

/* f's next handshake step fits in this round's budget: the first step of a
 * round always does; after it, while the round's handshake time lasts, and
 * new handshakes only up to the context's count. */
static bool hs_room(const tls_filter *f)
{
    if (!hs.steps)
        return true;
    if (hs.spent_ns >= HS_ROUND_NS)
        return false;
    return f->started || hs.firsts < f->tls->hs_per_round;
}

/* One server handshake step, counted and timed. */
static size_t hs_step(tls_filter *f, const uint8_t *data, size_t n)
{
    hs.steps++;
    if (!f->started)
        hs.firsts++;
    f->started = true;
    uint64_t t0 = cp__now_ns();
    size_t packets = 0;
    if (f->ssl || ssl_make(f))
        packets = feed(f, data, n);
    else
        cp__session_close(f->base.s, CP_REASON_NO_MEMORY, -ENOMEM);
    hs.spent_ns += cp__now_ns() - t0;
    return packets;
}

/* At the end of a round: the waiting steps, in order, while the next
 * round's budget lasts (the round moved on before this runs). */
static void hs_run_waiting(cp_worker *w, cp_posted *p)
{
    CP_UNUSED(p);
    hs.posted = false;
    hs_round(w);
    while (!cp__queue_empty(&hs.waiting)) {
        tls_filter *f = CP_QUEUE_DATA(cp__queue_head(&hs.waiting), tls_filter, wait_link);
        if (!hs_room(f))
            break;
        cp__queue_remove(&f->wait_link);
        f->waiting = false;
        cp_session *s = f->base.s;
        uint8_t *stash = f->stash;
        uint32_t len = f->stash_len;
        f->stash = NULL;
        f->stash_len = 0;
        if (atomic_load(&s->state) == CP_S_HANDSHAKING) {
            cp__rx_unblock(s, CP_RX_FILTER);
            hs_step(f, stash, len);
        }
        cp__free(stash);
        cp__session_unref(s);
    }
    if (!cp__queue_empty(&hs.waiting))
        hs_post(w);
}

/* The hello must wait: keep its bytes, pause the receive, queue. */
static void hs_wait(tls_filter *f, const uint8_t *data, size_t n)
{
    cp_session *s = f->base.s;
    if ((size_t)f->stash_len + n > STASH_MAX) {
        cp__session_close(s, CP_REASON_TLS, -EPROTO);
        return;
    }
    uint8_t *p = cp__realloc(f->stash, (size_t)f->stash_len + n);
    if (!p) {
        cp__session_close(s, CP_REASON_NO_MEMORY, -ENOMEM);
        return;
    }
    memcpy(p + f->stash_len, data, n);
    f->stash = p;
    f->stash_len += (uint32_t)n;
    if (!f->waiting) {
        f->waiting = true;
        cp__session_ref(s);
        cp__queue_insert_tail(&hs.waiting, &f->wait_link);
        cp__rx_block(s, CP_RX_FILTER);
        hs_post(s->owner);
    }
}

/* ------------------------------------------------------------------ receiving */

/* A handshake step; false when it failed (the session is closed). */
static bool handshake_step(tls_filter *f)
{
    ERR_clear_error();
    int r = SSL_do_handshake(f->ssl);
    if (r == 1) {
        ERR_clear_error();
        f->up = true;
        out_flush(f); /* the last flight (and TLS 1.3 tickets) go out */
        cp__session_wire_ready(f->base.s);
        cp__filter_up(&f->base);
        return cp__session_reading(f->base.s);
    }
    int e = SSL_get_error(f->ssl, r);
    out_flush(f);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        ERR_clear_error();
        cp__session_wire_ready(f->base.s);
        return true;
    }
    errors_drain(f->base.s, "handshake");
    cp__session_wire_flush(&f->base); /* the alert, before the close drops it */
    cp__session_close(f->base.s, CP_REASON_TLS, -EPROTO);
    return false;
}

/* Decrypts what the BIO holds into the framer, record by record. */
static size_t read_records(tls_filter *f)
{
    cp_session *s = f->base.s;
    size_t packets = 0;
    uint8_t buf[PLAIN_BLOCK];
    for (;;) {
        size_t got = 0;
        ERR_clear_error();
        if (SSL_read_ex(f->ssl, buf, sizeof buf, &got)) {
            packets += cp__filter_pass(&f->base, buf, got);
            /* Without read-ahead OpenSSL holds no whole record beyond the
             * one it returned (and buf takes a whole record): with the input
             * used up, another call would only say WANT_READ. */
            if (!cp__session_reading(s) || !f->in_len)
                break;
            continue;
        }
        int e = SSL_get_error(f->ssl, 0);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            ERR_clear_error();
            break;
        }
        if (e == SSL_ERROR_ZERO_RETURN) { /* close_notify */
            ERR_clear_error();
            cp__session_close(s, CP_REASON_PEER_CLOSED, 0);
            break;
        }
        errors_drain(s, "read");
        out_flush(f);
        cp__session_wire_flush(&f->base); /* the alert (a bad record's), before the close drops it */
        cp__session_close(s, CP_REASON_TLS, -EPROTO);
        break;
    }
    /* A KeyUpdate or a ticket made output of its own. */
    out_flush(f);
    if (f->wire.count)
        cp__session_wire_ready(s);
    return packets;
}

static size_t feed(tls_filter *f, const uint8_t *data, size_t n)
{
    f->in = data;
    f->in_len = n;
    size_t packets = 0;
    if (f->up || handshake_step(f))
        if (f->up && cp__session_reading(f->base.s))
            packets = read_records(f);
    f->in = NULL;
    f->in_len = 0;
    return packets;
}

static size_t tls_input(cp_filter *bf, const uint8_t *data, size_t n)
{
    tls_filter *f = tls_of(bf);
    cp_session *s = bf->s;
    if (f->up || s->is_client)
        return feed(f, data, n);
    /* A server's handshake step: within the worker's budget, behind the
     * steps already waiting for it. */
    hs_round(s->owner);
    if (f->waiting || !cp__queue_empty(&hs.waiting) || !hs_room(f)) {
        hs_wait(f, data, n);
        return 0;
    }
    return hs_step(f, data, n);
}

/* ------------------------------------------------------------------ session filter */

static SSL_CTX *ctx_get(cp_tls *t)
{
    pthread_mutex_lock(&t->lock);
    SSL_CTX *c = t->ctx;
    SSL_CTX_up_ref(c);
    pthread_mutex_unlock(&t->lock);
    return c;
}

/* The session's SSL, from the context as it is now (so a reload reaches
 * every handshake that begins after it); false when OpenSSL had no memory. */
static bool ssl_make(tls_filter *f)
{
    cp_tls *t = f->tls;
    SSL_CTX *ctx = ctx_get(t);
    ERR_clear_error();
    SSL *ssl = SSL_new(ctx);
    SSL_CTX_free(ctx); /* the SSL keeps its own reference */
    BIO *bio = ssl ? BIO_new(bio_method) : NULL;
    bool ok = bio != NULL;
    if (ok) {
        BIO_set_data(bio, f);
        SSL_set_bio(ssl, bio, bio); /* one reference, for both directions */
        if (f->base.s->is_client) {
            SSL_set_connect_state(ssl);
            ok = !t->sni ||
                 (SSL_set_tlsext_host_name(ssl, t->sni) && (!t->verify || SSL_set1_host(ssl, t->sni)));
        } else {
            SSL_set_accept_state(ssl);
        }
    }
    if (!ok) {
        SSL_free(ssl);
        ERR_clear_error();
        return false;
    }
    f->ssl = ssl;
    return true;
}

/* A client's SSL is made here, as its hello goes out at once. A server's
 * waits for the client's hello and is made in the first handshake step,
 * inside the worker's handshake budget: in a burst of connections the first
 * SSL_new of each touched fresh memory and cost 40 us (against 4 us later),
 * and 128 of them in one round of accepts held established sessions back by
 * 5 ms. A connection that never says anything costs no SSL either. */
static cp_filter *tls_attach(cp_filter_kind *k, cp_session *s)
{
    pthread_once(&bio_once, bio_method_make);
    if (!bio_method)
        return NULL;
    tls_filter *f = cp__zalloc(sizeof *f);
    if (!f)
        return NULL;
    f->base.s = s;
    f->tls = (cp_tls *)(void *)k;
    f->marks = f->marks_in;
    f->mcap = 2;
    cp__queue_init(&f->wait_link);
    if (s->is_client && !ssl_make(f)) {
        cp__free(f);
        return NULL;
    }
    return &f->base;
}

static int tls_start(cp_filter *bf)
{
    tls_filter *f = tls_of(bf);
    if (!bf->s->is_client)
        return 0; /* the client speaks first */
    f->started = true;
    handshake_step(f); /* a failure closes the session itself */
    return 0;
}

static void tls_detach(cp_filter *bf)
{
    tls_filter *f = tls_of(bf);
    cp_session *s = bf->s;
    if (f->waiting) { /* closed while its hello waited */
        cp__queue_remove(&f->wait_link);
        cp__session_unref(s); /* not the last: the service table still holds one */
    }
    if (f->out)
        cp_sendbuf_unref(f->out);
    SSL_free(f->ssl); /* NULL for a server session whose hello never came */
    if (f->marks != f->marks_in)
        cp__free(f->marks);
    cp__free(f->stash);
    cp__free(f);
}

static void kind_ref(cp_filter_kind *k) { cp_tls_ref((cp_tls *)(void *)k); }
static void kind_unref(cp_filter_kind *k) { cp_tls_unref((cp_tls *)(void *)k); }

static cp_sendq *tls_wire(cp_filter *bf) { return &tls_of(bf)->wire; }

static const cp_filter_ops tls_ops = {
    .attach = tls_attach,
    .wire = tls_wire,
    .start = tls_start,
    .input = tls_input,
    .encode = tls_encode,
    .finish = tls_finish,
    .written = tls_written,
    .detach = tls_detach,
    .kind_ref = kind_ref,
    .kind_unref = kind_unref,
};

/* ------------------------------------------------------------------ contexts */

/* Session tickets sealed with the context's own key, so that servers given
 * the same key (and this context after a reload) open each other's. */
static int ticket_cb(SSL *ssl, unsigned char *name, unsigned char *iv, EVP_CIPHER_CTX *ectx,
                     EVP_MAC_CTX *hctx, int enc)
{
    cp_tls *t = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
    OSSL_PARAM params[3];
    params[0] = OSSL_PARAM_construct_octet_string("key", t->ticket_key + 16, 32);
    params[1] = OSSL_PARAM_construct_utf8_string("digest", (char *)"SHA256", 0);
    params[2] = OSSL_PARAM_construct_end();
    if (enc) {
        memcpy(name, t->ticket_key, 16);
        if (RAND_bytes(iv, EVP_MAX_IV_LENGTH) <= 0 ||
            !EVP_EncryptInit_ex(ectx, EVP_aes_256_cbc(), NULL, t->ticket_key + 48, iv) ||
            !EVP_MAC_CTX_set_params(hctx, params))
            return -1;
        return 1;
    }
    if (memcmp(name, t->ticket_key, 16) != 0)
        return 0; /* not ours: a full handshake */
    if (!EVP_DecryptInit_ex(ectx, EVP_aes_256_cbc(), NULL, t->ticket_key + 48, iv) ||
        !EVP_MAC_CTX_set_params(hctx, params))
        return -1;
    return 1;
}

/* A context with t's settings and this certificate; NULL (logged) if
 * OpenSSL refuses a file. */
static SSL_CTX *ctx_make(cp_tls *t, const char *cert, const char *key)
{
    ERR_clear_error();
    SSL_CTX *c = SSL_CTX_new(TLS_method());
    if (!c)
        goto fail;
    SSL_CTX_set_app_data(c, t);
    SSL_CTX_set_min_proto_version(c, t->min_version);
    SSL_CTX_set_options(c, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
    SSL_CTX_set_mode(c, SSL_MODE_RELEASE_BUFFERS);
    /* Resumption is stateless (tickets): no per-session cache to grow. */
    SSL_CTX_set_session_cache_mode(c, SSL_SESS_CACHE_OFF);
    if (t->no_tickets) {
        SSL_CTX_set_options(c, SSL_OP_NO_TICKET);
        SSL_CTX_set_num_tickets(c, 0);
    } else {
        SSL_CTX_set_num_tickets(c, 1);
        SSL_CTX_set_tlsext_ticket_key_evp_cb(c, ticket_cb);
    }
    if (cert &&
        (SSL_CTX_use_certificate_chain_file(c, cert) != 1 ||
         SSL_CTX_use_PrivateKey_file(c, key, SSL_FILETYPE_PEM) != 1 || SSL_CTX_check_private_key(c) != 1))
        goto fail;
    if (t->ca_file ? SSL_CTX_load_verify_locations(c, t->ca_file, NULL) != 1
                   : (t->verify && SSL_CTX_set_default_verify_paths(c) != 1))
        goto fail;
    if (t->verify)
        SSL_CTX_set_verify(c, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    ERR_clear_error();
    return c;
fail : {
    unsigned long e = ERR_peek_last_error();
    char buf[160] = "out of memory";
    if (e)
        ERR_error_string_n(e, buf, sizeof buf);
    cp__log(CP_LOG_ERROR, "tls: cannot load %s / %s: %s", cert ? cert : "-", key ? key : "-", buf);
    ERR_clear_error();
    SSL_CTX_free(c);
    return NULL;
}
}

static char *str_dup(const char *s)
{
    if (!s)
        return NULL;
    size_t n = strlen(s) + 1;
    char *d = cp__malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

static void tls_free(cp_tls *t)
{
    SSL_CTX_free(t->ctx);
    pthread_mutex_destroy(&t->lock);
    cp__free(t->sni);
    cp__free(t->ca_file);
    OPENSSL_cleanse(t->ticket_key, sizeof t->ticket_key);
    cp__free(t);
}

static int opts_check(const cp_tls_opts *o)
{
    if ((o->cert_file == NULL) != (o->key_file == NULL))
        return -EINVAL;
    if (o->min_version && o->min_version != CP_TLS_1_2 && o->min_version != CP_TLS_1_3)
        return -EINVAL;
    if ((o->cert_file && !*o->cert_file) || (o->key_file && !*o->key_file) || (o->sni && !*o->sni))
        return -EINVAL;
    return 0;
}

int cp_tls_create(cp_tls **out, const cp_tls_opts *o)
{
    if (!out || !o)
        return -EINVAL;
    *out = NULL;
    int r = opts_check(o);
    if (r < 0)
        return r;
    cp_tls *t = cp__zalloc(sizeof *t);
    if (!t)
        return -ENOMEM;
    t->kind.ops = &tls_ops;
    t->kind.handshake_ms = o->handshake_timeout_ms ? o->handshake_timeout_ms : HANDSHAKE_MS_DEFAULT;
    t->kind.fail_reason = CP_REASON_TLS;
    atomic_init(&t->refs, 1);
    pthread_mutex_init(&t->lock, NULL);
    t->verify = o->verify;
    t->min_version = o->min_version ? o->min_version : CP_TLS_1_2;
    t->no_tickets = o->no_tickets;
    t->hs_per_round = o->handshakes_per_round ? o->handshakes_per_round : HS_PER_ROUND_DEFAULT;
    t->sni = str_dup(o->sni);
    t->ca_file = str_dup(o->ca_file);
    if (o->ticket_key)
        memcpy(t->ticket_key, o->ticket_key, CP_TLS_TICKET_KEY_LEN);
    else if (RAND_bytes(t->ticket_key, CP_TLS_TICKET_KEY_LEN) != 1)
        r = -EIO;
    if ((o->sni && !t->sni) || (o->ca_file && !t->ca_file))
        r = -ENOMEM;
    if (r == 0 && !(t->ctx = ctx_make(t, o->cert_file, o->key_file)))
        r = -EIO;
    if (r < 0) {
        tls_free(t);
        return r;
    }
    *out = t;
    return 0;
}

int cp_tls_reload(cp_tls *t, const char *cert, const char *key)
{
    if (!t || !cert || !key || !*cert || !*key)
        return -EINVAL;
    SSL_CTX *c = ctx_make(t, cert, key);
    if (!c)
        return -EIO;
    pthread_mutex_lock(&t->lock);
    SSL_CTX *old = t->ctx;
    t->ctx = c;
    pthread_mutex_unlock(&t->lock);
    SSL_CTX_free(old); /* sessions made from it keep it until they end */
    return 0;
}

void cp_tls_ref(cp_tls *t) { atomic_fetch_add_explicit(&t->refs, 1, memory_order_relaxed); }

void cp_tls_unref(cp_tls *t)
{
    if (t && atomic_fetch_sub_explicit(&t->refs, 1, memory_order_acq_rel) == 1)
        tls_free(t);
}

int cp_session_tls_info(const cp_session *s, cp_tls_info *out)
{
    if (!s || !out)
        return -EINVAL;
    const tls_filter *f = (const tls_filter *)(const void *)cp__session_filter(s, &tls_ops);
    if (!f)
        return -EINVAL;
    if (!f->up)
        return -ENOTCONN;
    memset(out, 0, sizeof *out);
    snprintf(out->version, sizeof out->version, "%s", SSL_get_version(f->ssl));
    snprintf(out->cipher, sizeof out->cipher, "%s", SSL_get_cipher_name(f->ssl));
    out->resumed = SSL_session_reused(f->ssl) ? 1 : 0;
    return 0;
}
