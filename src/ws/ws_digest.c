/* SPDX-License-Identifier: MIT */
/*
 * SHA-1, random bytes and base64 for WebSocket (ws_digest.h), through
 * OpenSSL. Called once per upgrade, never per frame.
 */
#include "ws/ws_digest.h"

#include <errno.h>
#include <stdbool.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/rand.h>

#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#define SHA1_LEN 20

void cp__ws_base64(const uint8_t *in, size_t n, char *out)
{
    /* The 64 digits, then the pad. */
    static const char abc[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=";
    for (; n >= 3; in += 3, n -= 3) {
        uint32_t v = (uint32_t)in[0] << 16 | (uint32_t)in[1] << 8 | in[2];
        *out++ = abc[v >> 18];
        *out++ = abc[(v >> 12) & 63];
        *out++ = abc[(v >> 6) & 63];
        *out++ = abc[v & 63];
    }
    if (n) { /* one or two bytes left: two or three characters, then padding */
        uint32_t v = (uint32_t)in[0] << 16 | (n == 2 ? (uint32_t)in[1] << 8 : 0);
        *out++ = abc[v >> 18];
        *out++ = abc[(v >> 12) & 63];
        *out++ = abc[n == 2 ? (v >> 6) & 63 : 64];
        *out++ = abc[64];
    }
    *out = '\0';
}

static int sha1_key(const char *key, uint8_t md[SHA1_LEN])
{
    unsigned int len = 0;
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    bool ok = c && EVP_DigestInit_ex(c, EVP_sha1(), NULL) && EVP_DigestUpdate(c, key, strlen(key)) &&
              EVP_DigestUpdate(c, WS_GUID, sizeof WS_GUID - 1) && EVP_DigestFinal_ex(c, md, &len) &&
              len == SHA1_LEN;
    EVP_MD_CTX_free(c);
    return ok ? 0 : -EIO;
}

int cp__ws_random(void *p, size_t n) { return RAND_bytes(p, (int)n) == 1 ? 0 : -EIO; }

int cp__ws_accept_key(const char *key, char out[CP_WS_ACCEPT_LEN + 1])
{
    uint8_t md[SHA1_LEN];
    int rc = sha1_key(key, md);
    if (rc == 0)
        cp__ws_base64(md, sizeof md, out);
    return rc;
}
