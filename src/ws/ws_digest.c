/* SPDX-License-Identifier: MIT */
/*
 * SHA-1, random bytes and base64 for WebSocket (ws_digest.h): OpenSSL on
 * Linux, CNG on Windows. Both are called once per upgrade, never per frame.
 */
#include "ws/ws_digest.h"

#include <errno.h>
#include <stdbool.h>
#include <string.h>

#ifdef _WIN32
#  include <windows.h>
#  include <bcrypt.h>
#else
#  include <openssl/evp.h>
#  include <openssl/rand.h>
#endif

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

#ifdef _WIN32

/* A provider opened per call: an upgrade is rare next to the frames that
 * follow it, and nothing outlives the call (no handle to account for). */
static int sha1_key(const char *key, uint8_t md[SHA1_LEN])
{
    BCRYPT_ALG_HANDLE alg = NULL;
    BCRYPT_HASH_HANDLE h = NULL;
    bool ok = BCRYPT_SUCCESS(BCryptOpenAlgorithmProvider(&alg, BCRYPT_SHA1_ALGORITHM, NULL, 0)) &&
              BCRYPT_SUCCESS(BCryptCreateHash(alg, &h, NULL, 0, NULL, 0, 0)) &&
              BCRYPT_SUCCESS(BCryptHashData(h, (PUCHAR)key, (ULONG)strlen(key), 0)) &&
              BCRYPT_SUCCESS(BCryptHashData(h, (PUCHAR)WS_GUID, (ULONG)(sizeof WS_GUID - 1), 0)) &&
              BCRYPT_SUCCESS(BCryptFinishHash(h, md, SHA1_LEN, 0));
    if (h)
        BCryptDestroyHash(h);
    if (alg)
        BCryptCloseAlgorithmProvider(alg, 0);
    return ok ? 0 : -EIO;
}

int cp__ws_random(void *p, size_t n)
{
    return BCRYPT_SUCCESS(BCryptGenRandom(NULL, p, (ULONG)n, BCRYPT_USE_SYSTEM_PREFERRED_RNG)) ? 0 : -EIO;
}

#else

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

#endif

int cp__ws_accept_key(const char *key, char out[CP_WS_ACCEPT_LEN + 1])
{
    uint8_t md[SHA1_LEN];
    int rc = sha1_key(key, md);
    if (rc == 0)
        cp__ws_base64(md, sizeof md, out);
    return rc;
}
