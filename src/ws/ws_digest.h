/* SPDX-License-Identifier: MIT */
/*
 * What WebSocket needs of cryptography, behind one seam (ws_digest.c): SHA-1
 * for the accept key and random bytes for a client's key and mask seed.
 * OpenSSL provides both on Linux, CNG (bcrypt.dll) on Windows, where there is
 * no OpenSSL. Base64 is a few lines of our own, so it is the same code on
 * both systems.
 */
#ifndef CP_WS_DIGEST_H
#define CP_WS_DIGEST_H

#include <stddef.h>
#include <stdint.h>

/* The base64 of a 20-byte SHA-1: 28 characters. */
#define CP_WS_ACCEPT_LEN 28

/* The Sec-WebSocket-Accept of a Sec-WebSocket-Key (RFC 6455, 4.2.2):
 * base64(SHA-1(key + the GUID)), NUL-terminated. 0, or -EIO if the system's
 * SHA-1 failed. */
int cp__ws_accept_key(const char *key, char out[CP_WS_ACCEPT_LEN + 1]);
/* n bytes from the system's cryptographic generator: 0 or -EIO. */
int cp__ws_random(void *p, size_t n);
/* The base64 of n bytes (RFC 4648, with padding), NUL-terminated: out holds
 * 4 * ((n + 2) / 3) + 1 characters. */
void cp__ws_base64(const uint8_t *in, size_t n, char *out);

#endif /* CP_WS_DIGEST_H */
