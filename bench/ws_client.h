/* SPDX-License-Identifier: MIT */
/*
 * ws_client.h — the client side of RFC 6455 that the bench programs share
 * (loadgen --ws, idle_conns --ws). Header-only, no cport:
 *
 *   - the upgrade request, and the check of the server's answer to it (101,
 *     Upgrade, Connection, Sec-WebSocket-Accept; no extension, no subprotocol,
 *     since none is offered);
 *   - client frame headers and masking (every client frame is masked, with a
 *     fresh mask from the caller's generator);
 *   - a parser of the server's frames that moves the data payloads to the front
 *     of the buffer they arrived in, so that the caller's stream parser sees the
 *     payloads exactly as it would see a TCP stream. Fragmented messages are
 *     joined (the payloads of a message are just consecutive bytes of the
 *     stream); a ping's payload is kept for the pong; a close ends the stream.
 *
 * The handshake needs SHA-1 and base64: define WSC_OPENSSL before including
 * this where OpenSSL is linked. Without it only the framing is available.
 */
#ifndef CP_BENCH_WS_CLIENT_H
#define CP_BENCH_WS_CLIENT_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#ifdef WSC_OPENSSL
#  include <openssl/evp.h>
#  include <openssl/rand.h>
#endif

enum { WSC_CONT = 0, WSC_TEXT = 1, WSC_BINARY = 2, WSC_CLOSE = 8, WSC_PING = 9, WSC_PONG = 10 };

/* the longest client frame header: 2 + 8 (64-bit length) + 4 (mask) */
#define WSC_HDR_MAX 14

/* ------------------------------------------------------------ the handshake */

#ifdef WSC_OPENSSL
/* Sec-WebSocket-Key: 16 random bytes in base64 (24 characters). 0, or -1 if
 * OpenSSL has no randomness to give. */
static inline int wsc_key(char out[25])
{
    unsigned char r[16];
    if (RAND_bytes(r, sizeof r) != 1)
        return -1;
    EVP_EncodeBlock((unsigned char *)out, r, sizeof r);
    return 0;
}

/* The Sec-WebSocket-Accept a server must answer key with: base64 of the
 * SHA-1 of the key and RFC 6455's GUID (28 characters). */
static inline int wsc_accept_for(const char *key, char out[29])
{
    char in[128];
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    int n = snprintf(in, sizeof in, "%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", key);
    if (n < 0 || (size_t)n >= sizeof in || EVP_Digest(in, (size_t)n, md, &mdlen, EVP_sha1(), NULL) != 1 ||
        mdlen != 20)
        return -1;
    EVP_EncodeBlock((unsigned char *)out, md, 20);
    return 0;
}
#endif

/* The upgrade request for path on host:port (an IPv6 address in brackets in
 * Host). Its length, or -1 if it does not fit in cap. */
static inline int wsc_request(char *buf, size_t cap, const char *host, const char *port, const char *path,
                              const char *key)
{
    bool v6 = strchr(host, ':') != NULL;
    int n = snprintf(buf, cap,
                     "GET %s HTTP/1.1\r\n"
                     "Host: %s%s%s:%s\r\n"
                     "Upgrade: websocket\r\n"
                     "Connection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\n"
                     "Sec-WebSocket-Version: 13\r\n"
                     "\r\n",
                     path, v6 ? "[" : "", host, v6 ? "]" : "", port, key);
    return n < 0 || (size_t)n >= cap ? -1 : n;
}

/* Does the comma-separated list v[0..n) hold token tok (case-insensitive)? */
static inline bool wsc_has_token(const char *v, size_t n, const char *tok)
{
    size_t tl = strlen(tok), i = 0;
    while (i < n) {
        while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
            i++;
        size_t s = i;
        while (i < n && v[i] != ',')
            i++;
        size_t e = i;
        while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t'))
            e--;
        if (e - s == tl && strncasecmp(v + s, tok, tl) == 0)
            return true;
    }
    return false;
}

/* The server's answer in buf[0..n): 1 when it is a complete, valid 101 (its
 * head is *head bytes long; what follows are frames), 0 while it is not
 * complete, -1 if it is a refusal or wrong (the reason in why). */
static inline int wsc_answer(const char *buf, size_t n, const char *accept, size_t *head, char *why,
                             size_t whylen)
{
    const char *end = memmem(buf, n, "\r\n\r\n", 4);
    if (!end)
        return 0;
    *head = (size_t)(end - buf) + 4;
    const char *eol = memmem(buf, n, "\r\n", 2);
    if ((size_t)(eol - buf) < 12 || memcmp(buf, "HTTP/1.1 101", 12) != 0 ||
        (eol - buf > 12 && buf[12] != ' ')) {
        snprintf(why, whylen, "upgrade refused: %.*s", (int)(eol - buf < 120 ? eol - buf : 120), buf);
        return -1;
    }
    bool upgrade = false, connection = false, accepted = false;
    for (const char *p = eol + 2; p < end; p = eol + 2) {
        eol = memmem(p, (size_t)(end + 2 - p), "\r\n", 2);
        const char *colon = memchr(p, ':', (size_t)(eol - p));
        if (!colon) {
            snprintf(why, whylen, "a header line without a colon in the 101 answer");
            return -1;
        }
        size_t nl = (size_t)(colon - p);
        const char *v = colon + 1;
        while (v < eol && (*v == ' ' || *v == '\t'))
            v++;
        size_t vl = (size_t)(eol - v);
        while (vl && (v[vl - 1] == ' ' || v[vl - 1] == '\t'))
            vl--;
#define WSC_IS(name) (nl == sizeof name - 1 && strncasecmp(p, name, nl) == 0)
        if (WSC_IS("Upgrade"))
            upgrade = wsc_has_token(v, vl, "websocket");
        else if (WSC_IS("Connection"))
            connection = wsc_has_token(v, vl, "upgrade");
        else if (WSC_IS("Sec-WebSocket-Accept"))
            accepted = vl == strlen(accept) && memcmp(v, accept, vl) == 0;
        else if (WSC_IS("Sec-WebSocket-Extensions") || WSC_IS("Sec-WebSocket-Protocol")) {
            snprintf(why, whylen, "the 101 answer chose %.*s, which was not offered", (int)nl, p);
            return -1;
        }
#undef WSC_IS
    }
    if (!upgrade || !connection || !accepted) {
        snprintf(why, whylen, "the 101 answer has %s",
                 !upgrade      ? "no Upgrade: websocket"
                 : !connection ? "no Connection: Upgrade"
                               : "a wrong or no Sec-WebSocket-Accept");
        return -1;
    }
    return 1;
}

/* ---------------------------------------------------------- client frames */

/* A fresh mask per frame (splitmix64; the caller keeps one state per thread). */
static inline uint32_t wsc_rand(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return (uint32_t)((z ^ (z >> 31)) >> 32);
}

/* header length of a client frame with len bytes of payload */
static inline size_t wsc_hdr_len(uint64_t len) { return len < 126 ? 6 : len < 65536 ? 8 : 14; }

/* Writes a client frame's header (FIN set, masked) into p; its length. The
 * mask's bytes go on the wire in memory order, as wsc_mask applies them. */
static inline size_t wsc_frame_header(unsigned char *p, unsigned op, uint64_t len, uint32_t mask)
{
    size_t h;
    p[0] = (unsigned char)(0x80 | op);
    if (len < 126) {
        p[1] = (unsigned char)(0x80 | len);
        h = 2;
    } else if (len < 65536) {
        p[1] = 0x80 | 126;
        p[2] = (unsigned char)(len >> 8);
        p[3] = (unsigned char)len;
        h = 4;
    } else {
        p[1] = 0x80 | 127;
        for (int i = 0; i < 8; i++)
            p[2 + i] = (unsigned char)(len >> (56 - 8 * i));
        h = 10;
    }
    memcpy(p + h, &mask, 4);
    return h + 4;
}

/* XORs n payload bytes with the mask, the first of them being byte `phase` of
 * the frame's payload (a frame made in pieces). Eight bytes at a time. */
static inline void wsc_mask(unsigned char *p, size_t n, uint32_t mask, size_t phase)
{
    unsigned char k[4], m[8];
    memcpy(k, &mask, 4);
    for (int i = 0; i < 8; i++)
        m[i] = k[(i + phase) & 3];
    uint64_t m64;
    memcpy(&m64, m, 8);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t v;
        memcpy(&v, p + i, 8);
        v ^= m64;
        memcpy(p + i, &v, 8);
    }
    for (; i < n; i++)
        p[i] ^= m[i & 7];
}

/* A whole control frame (close, ping, pong; payload at most 125 bytes). */
static inline size_t wsc_control(unsigned char *p, unsigned op, const unsigned char *payload, size_t len,
                                 uint32_t mask)
{
    size_t h = wsc_frame_header(p, op, len, mask);
    if (len)
        memcpy(p + h, payload, len);
    wsc_mask(p + h, len, mask, 0);
    return h + len;
}

/* ------------------------------------------------------ the server's frames */

struct wsc_rx {
    uint64_t left;         /* payload bytes of the current frame still to come */
    bool in_frame;         /* a header is parsed, its payload not all seen yet */
    bool in_msg;           /* a binary message has begun and not ended (no FIN yet) */
    bool ping;             /* a ping came and is not answered: pong with ping_data */
    bool closed;           /* a close came: close_code (1005 when it had none) */
    unsigned char op;      /* the current frame's opcode */
    unsigned char hdr_len; /* a header cut by the end of a read: hdr[0..hdr_len) */
    unsigned char ctl_len, ping_len;
    uint16_t close_code;
    unsigned char hdr[10];
    unsigned char ctl[125], ping_data[125];
};

/* A server frame's header at p (avail bytes): its length (2, 4 or 10), 0 if
 * more bytes are needed, -1 if it breaks RFC 6455 or is not what a binary
 * stream may hold (why). */
static inline int wsc_header(struct wsc_rx *rx, const unsigned char *p, size_t avail, const char **why)
{
    if (avail < 2)
        return 0;
    unsigned b0 = p[0], b1 = p[1], op = b0 & 15;
    int need = (b1 & 127) == 126 ? 4 : (b1 & 127) == 127 ? 10 : 2;
    if (avail < (size_t)need)
        return 0;
    uint64_t len = b1 & 127;
    if (len == 126) {
        len = (uint64_t)p[2] << 8 | p[3];
    } else if (len == 127) {
        len = 0;
        for (int i = 0; i < 8; i++)
            len = len << 8 | p[2 + i];
    }
    bool fin = b0 & 0x80;
    *why = NULL;
    if (b0 & 0x70)
        *why = "a frame with reserved bits set";
    else if (b1 & 0x80)
        *why = "a masked frame from the server";
    else if ((need == 4 && len < 126) || (need == 10 && (len < 65536 || len >> 63)))
        *why = "a frame length not in its shortest form";
    else if (op == WSC_CONT && !rx->in_msg)
        *why = "a continuation frame outside a message";
    else if (op == WSC_BINARY && rx->in_msg)
        *why = "a new message inside an unfinished one";
    else if (op == WSC_TEXT)
        *why = "a text message (only binary ones are expected)";
    else if (op >= 8 && (op > WSC_PONG || !fin || len > 125))
        *why = op > WSC_PONG ? "a reserved opcode" : "a fragmented or long control frame";
    else if (op > WSC_BINARY && op < 8)
        *why = "a reserved opcode";
    if (*why)
        return -1;
    if (op < 8)
        rx->in_msg = !fin;
    rx->op = (unsigned char)op;
    rx->left = len;
    rx->ctl_len = 0;
    return need;
}

static inline void wsc_control_done(struct wsc_rx *rx)
{
    if (rx->op == WSC_PING) {
        memcpy(rx->ping_data, rx->ctl, rx->ctl_len);
        rx->ping_len = rx->ctl_len;
        rx->ping = true;
    } else if (rx->op == WSC_CLOSE) {
        rx->closed = true;
        rx->close_code = rx->ctl_len >= 2 ? (uint16_t)(rx->ctl[0] << 8 | rx->ctl[1]) : 1005;
    }
}

/* Parses the server's frames in buf[0..n), moving the data payloads to the
 * front, in order: their length, or -1 on a protocol error (why). A ping sets
 * rx->ping; a close sets rx->closed and ends the parse (what follows it is
 * dropped). A frame cut by the end of buf continues with the next call. */
static inline long wsc_rx_feed(struct wsc_rx *rx, unsigned char *buf, size_t n, const char **why)
{
    size_t pos = 0, out = 0;
    while (pos < n && !rx->closed) {
        if (!rx->in_frame) {
            int h;
            if (rx->hdr_len) {
                size_t old = rx->hdr_len, take = sizeof rx->hdr - old;
                if (take > n - pos)
                    take = n - pos;
                memcpy(rx->hdr + old, buf + pos, take);
                h = wsc_header(rx, rx->hdr, old + take, why);
                if (h < 0)
                    return -1;
                if (h == 0) {
                    rx->hdr_len = (unsigned char)(old + take);
                    pos += take;
                    break;
                }
                pos += (size_t)h - old;
                rx->hdr_len = 0;
            } else {
                h = wsc_header(rx, buf + pos, n - pos, why);
                if (h < 0)
                    return -1;
                if (h == 0) {
                    memcpy(rx->hdr, buf + pos, n - pos);
                    rx->hdr_len = (unsigned char)(n - pos);
                    break;
                }
                pos += (size_t)h;
            }
            rx->in_frame = true;
        }
        size_t take = rx->left < n - pos ? (size_t)rx->left : n - pos;
        if (rx->op < 8) {
            if (out != pos)
                memmove(buf + out, buf + pos, take);
            out += take;
        } else {
            memcpy(rx->ctl + rx->ctl_len, buf + pos, take);
            rx->ctl_len = (unsigned char)(rx->ctl_len + take);
        }
        pos += take;
        rx->left -= take;
        if (rx->left == 0) {
            rx->in_frame = false;
            if (rx->op >= 8)
                wsc_control_done(rx);
        }
    }
    return (long)out;
}

#endif
