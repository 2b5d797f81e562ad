/* SPDX-License-Identifier: MIT */
/*
 * tls_hs_cost — OpenSSL's own CPU cost of one full TLS handshake, in-process.
 *
 *   tls_hs_cost --cert FILE --key FILE [--count N] [--warmup W] [--tls12]
 *
 * Runs W handshakes (default 50, not counted), then N (default 2000), between
 * a client SSL and a server SSL joined by a BIO pair, in one thread: no
 * socket, no kernel, no event loop, only OpenSSL. It is the floor under any
 * TLS server's cost per new connection, which bench/tls.sh sets cport-server's
 * (measured from outside, per connection of a churn) against.
 *
 * The server's context has cport's settings (src/tls/tls.c, ctx_make): any
 * version from TLS 1.2, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE,
 * SSL_MODE_RELEASE_BUFFERS, the session cache off, one session ticket sealed
 * by a ticket-key callback as cport's (AES-256-CBC and HMAC-SHA256 under an
 * 80-byte key), the certificate chain and key from the files (bench/tls_cert.sh
 * makes a P-256 pair). The client's are loadgen's: TLS 1.2 or later, no
 * certificate check, OpenSSL's default groups and ciphers, and a new SSL for
 * every handshake without a session to resume, so every handshake is full
 * (checked). --tls12 caps both at TLS 1.2.
 *
 * Every OpenSSL call of the server is timed with CLOCK_THREAD_CPUTIME_ID:
 * SSL_new and its setup (BIO pair, accept state), each SSL_do_handshake up to
 * the one that completes (it also writes the session ticket), and SSL_free.
 * The client's calls are timed the same way but reported apart. What one
 * clock read costs (median of 1000 back-to-back pairs) is taken off each timed
 * call.
 *
 * Output: a summary, then the last line
 *   RESULT handshakes=N version=... cipher=... group=... server_us=MEAN
 *          server_us_median=... server_us_p10=... server_us_p90=...
 *          server_hs_us=... client_us=... wall_us=... clock_ns=... tickets=...
 * server_us is the server's CPU per handshake, all its calls (mean over N);
 * server_hs_us only the SSL_do_handshake part; wall_us the elapsed time per
 * handshake of the whole loop (both sides). Exit 0, 1 if a handshake fails,
 * 2 on bad arguments or unreadable files.
 */
#ifndef _GNU_SOURCE
#  define _GNU_SOURCE
#endif
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>

#define TICKET_KEY_LEN 80 /* as CP_TLS_TICKET_KEY_LEN: 16 name, 32 HMAC, 32 AES */
#define MAX_STEPS 16      /* handshake calls per side before giving up */

static unsigned char ticket_key[TICKET_KEY_LEN];
static long tickets_seen; /* session tickets the client received */

static int64_t cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t wall_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: tls_hs_cost --cert FILE --key FILE [--count N] [--warmup W] [--tls12]\n");
}

/* cport's ticket callback (src/tls/tls.c, ticket_cb), with the same key layout */
static int ticket_cb(SSL *ssl, unsigned char *name, unsigned char *iv, EVP_CIPHER_CTX *ectx,
                     EVP_MAC_CTX *hctx, int enc)
{
    (void)ssl;
    OSSL_PARAM params[3];
    params[0] = OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, ticket_key + 16, 32);
    params[1] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0);
    params[2] = OSSL_PARAM_construct_end();
    if (enc) {
        memcpy(name, ticket_key, 16);
        if (RAND_bytes(iv, EVP_MAX_IV_LENGTH) <= 0 ||
            !EVP_EncryptInit_ex(ectx, EVP_aes_256_cbc(), NULL, ticket_key + 48, iv) ||
            !EVP_MAC_CTX_set_params(hctx, params))
            return -1;
        return 1;
    }
    if (memcmp(name, ticket_key, 16) != 0)
        return 0;
    if (!EVP_DecryptInit_ex(ectx, EVP_aes_256_cbc(), NULL, ticket_key + 48, iv) ||
        !EVP_MAC_CTX_set_params(hctx, params))
        return -1;
    return 1;
}

static SSL_CTX *server_ctx(const char *cert, const char *key, int max_version)
{
    SSL_CTX *c = SSL_CTX_new(TLS_method());
    if (!c || RAND_bytes(ticket_key, sizeof ticket_key) != 1)
        return NULL;
    SSL_CTX_set_min_proto_version(c, TLS1_2_VERSION);
    SSL_CTX_set_max_proto_version(c, max_version);
    SSL_CTX_set_options(c, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
    SSL_CTX_set_mode(c, SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_session_cache_mode(c, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_num_tickets(c, 1);
    SSL_CTX_set_tlsext_ticket_key_evp_cb(c, ticket_cb);
    if (SSL_CTX_use_certificate_chain_file(c, cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(c, key, SSL_FILETYPE_PEM) != 1 || SSL_CTX_check_private_key(c) != 1) {
        SSL_CTX_free(c);
        return NULL;
    }
    return c;
}

/* Counts the tickets that arrive; keeps none (returning 0 lets OpenSSL free it). */
static int on_ticket(SSL *ssl, SSL_SESSION *sess)
{
    (void)ssl, (void)sess;
    tickets_seen++;
    return 0;
}

static SSL_CTX *client_ctx(int max_version)
{
    SSL_CTX *c = SSL_CTX_new(TLS_client_method());
    if (!c)
        return NULL;
    SSL_CTX_set_min_proto_version(c, TLS1_2_VERSION);
    SSL_CTX_set_max_proto_version(c, max_version);
    /* the callback runs only with client caching on; nothing is stored */
    SSL_CTX_set_session_cache_mode(c, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(c, on_ticket);
    return c;
}

/* One handshake's costs, in ns. */
typedef struct hs_cost {
    int64_t server, server_hs, client;
} hs_cost;

typedef struct run_ctx {
    SSL_CTX *sctx, *cctx;
    int64_t clock_ns; /* one clock read, taken off each timed call */
    char version[32], cipher[64], group[32];
} run_ctx;

/* The time of one timed call: the clock pair's own cost taken off. */
static int64_t spent(const run_ctx *r, int64_t t0, int64_t t1)
{
    int64_t d = t1 - t0 - r->clock_ns;
    return d > 0 ? d : 0;
}

static int want_more(SSL *ssl, int rc)
{
    int e = SSL_get_error(ssl, rc);
    return e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE;
}

/* One full handshake; 0 on success. */
static int handshake(run_ctx *r, hs_cost *c)
{
    memset(c, 0, sizeof *c);
    BIO *sb = NULL, *cb = NULL;
    int64_t t0 = cpu_ns();
    SSL *s = SSL_new(r->sctx);
    int ok = s && BIO_new_bio_pair(&sb, 0, &cb, 0) == 1;
    if (ok) {
        SSL_set_bio(s, sb, sb); /* one reference, for both directions */
        SSL_set_accept_state(s);
    }
    int64_t t1 = cpu_ns();
    c->server += spent(r, t0, t1);
    SSL *cl = NULL;
    if (ok) {
        t0 = cpu_ns();
        cl = SSL_new(r->cctx);
        ok = cl != NULL;
        if (ok) {
            SSL_set_bio(cl, cb, cb);
            SSL_set_connect_state(cl);
        } else {
            BIO_free(cb);
        }
        c->client += spent(r, t0, cpu_ns());
    }
    int sdone = 0, cdone = 0;
    for (int step = 0; ok && step < MAX_STEPS && !(sdone && cdone); step++) {
        if (!cdone) {
            t0 = cpu_ns();
            int rc = SSL_do_handshake(cl);
            c->client += spent(r, t0, cpu_ns());
            cdone = rc == 1;
            ok = cdone || want_more(cl, rc);
        }
        if (ok && !sdone) {
            t0 = cpu_ns();
            int rc = SSL_do_handshake(s);
            int64_t d = spent(r, t0, cpu_ns());
            c->server += d;
            c->server_hs += d;
            sdone = rc == 1;
            ok = sdone || want_more(s, rc);
        }
    }
    ok = ok && sdone && cdone && !SSL_session_reused(s);
    if (ok) {
        /* the client takes in the session ticket (no data follows) */
        unsigned char b[64];
        t0 = cpu_ns();
        int rc = SSL_read(cl, b, sizeof b);
        c->client += spent(r, t0, cpu_ns());
        ok = rc <= 0 && SSL_get_error(cl, rc) == SSL_ERROR_WANT_READ;
    }
    if (ok && !r->version[0]) {
        int nid = SSL_get_negotiated_group(s);
        snprintf(r->version, sizeof r->version, "%s", SSL_get_version(s));
        snprintf(r->cipher, sizeof r->cipher, "%s", SSL_get_cipher_name(s));
        snprintf(r->group, sizeof r->group, "%s", nid > 0 ? OBJ_nid2sn(nid) : "-");
    }
    t0 = cpu_ns();
    SSL_free(s);
    c->server += spent(r, t0, cpu_ns());
    t0 = cpu_ns();
    SSL_free(cl);
    c->client += spent(r, t0, cpu_ns());
    if (!ok) {
        unsigned long e = ERR_peek_last_error();
        fprintf(stderr, "tls_hs_cost: handshake failed: %s\n",
                e ? ERR_reason_error_string(e) : "no progress");
        ERR_clear_error();
        return -1;
    }
    return 0;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* The median cost of one clock read, from back-to-back pairs. */
static int64_t clock_cost(void)
{
    enum { PAIRS = 1000 };
    static int64_t d[PAIRS];
    for (int i = 0; i < PAIRS; i++) {
        int64_t a = cpu_ns();
        d[i] = cpu_ns() - a;
    }
    qsort(d, PAIRS, sizeof d[0], cmp_i64);
    return d[PAIRS / 2];
}

static int num(const char *s, long lo, long hi, long *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == 0 || *end || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    const char *cert = NULL, *key = NULL;
    long count = 2000, warmup = 50;
    int max_version = TLS1_3_VERSION;
    static const struct option lo[] = {
        { "cert", required_argument, NULL, 'c' },
        { "key", required_argument, NULL, 'k' },
        { "count", required_argument, NULL, 'n' },
        { "warmup", required_argument, NULL, 'w' },
        { "tls12", no_argument, NULL, '2' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int o;
    while ((o = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        int bad = 0;
        switch (o) {
        case 'c': cert = optarg; break;
        case 'k': key = optarg; break;
        case 'n': bad = num(optarg, 1, 10000000, &count); break;
        case 'w': bad = num(optarg, 0, 10000000, &warmup); break;
        case '2': max_version = TLS1_2_VERSION; break;
        case 'h': usage(stdout); return 0;
        default: bad = 1;
        }
        if (bad) {
            usage(stderr);
            return 2;
        }
    }
    if (!cert || !key || optind != argc) {
        usage(stderr);
        return 2;
    }
    run_ctx r = { 0 };
    r.sctx = server_ctx(cert, key, max_version);
    r.cctx = client_ctx(max_version);
    if (!r.sctx || !r.cctx) {
        unsigned long e = ERR_peek_last_error();
        fprintf(stderr, "tls_hs_cost: cannot load %s / %s: %s\n", cert, key,
                e ? ERR_reason_error_string(e) : "out of memory");
        return 2;
    }
    hs_cost c;
    for (long i = 0; i < warmup; i++)
        if (handshake(&r, &c) < 0)
            return 1;
    r.clock_ns = clock_cost();
    int64_t *srv = malloc(sizeof *srv * (size_t)count);
    if (!srv)
        return 1;
    int64_t sum_srv = 0, sum_hs = 0, sum_cl = 0;
    tickets_seen = 0;
    int64_t w0 = wall_ns();
    for (long i = 0; i < count; i++) {
        if (handshake(&r, &c) < 0)
            return 1;
        srv[i] = c.server;
        sum_srv += c.server;
        sum_hs += c.server_hs;
        sum_cl += c.client;
    }
    int64_t wall = wall_ns() - w0;
    qsort(srv, (size_t)count, sizeof *srv, cmp_i64);
    double n = (double)count;
    double mean = (double)sum_srv / n / 1e3, med = (double)srv[count / 2] / 1e3;
    double p10 = (double)srv[count / 10] / 1e3, p90 = (double)srv[count * 9 / 10] / 1e3;
    printf("tls_hs_cost: %ld full handshakes (%s, %s, %s): server %.1f us CPU each (median %.1f, p10 %.1f, "
           "p90 %.1f; SSL_do_handshake %.1f), client %.1f us, %.1f us of wall time per handshake; "
           "%ld tickets; a clock read costs %lld ns\n",
           count, r.version, r.cipher, r.group, mean, med, p10, p90, (double)sum_hs / n / 1e3,
           (double)sum_cl / n / 1e3, (double)wall / n / 1e3, tickets_seen, (long long)r.clock_ns);
    printf("RESULT handshakes=%ld version=%s cipher=%s group=%s server_us=%.1f server_us_median=%.1f "
           "server_us_p10=%.1f server_us_p90=%.1f server_hs_us=%.1f client_us=%.1f wall_us=%.1f "
           "clock_ns=%lld "
           "tickets=%ld\n",
           count, r.version, r.cipher, r.group, mean, med, p10, p90, (double)sum_hs / n / 1e3,
           (double)sum_cl / n / 1e3, (double)wall / n / 1e3, (long long)r.clock_ns, tickets_seen);
    free(srv);
    SSL_CTX_free(r.sctx);
    SSL_CTX_free(r.cctx);
    return 0;
}
