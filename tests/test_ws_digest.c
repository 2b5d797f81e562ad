/* SPDX-License-Identifier: MIT */
/*
 * WebSocket's cryptography seam (src/ws/ws_digest.c): the accept key, base64
 * and random bytes. The expected values come from the RFCs, not from the
 * implementation behind the seam, so every system's must give them.
 */
#include "helpers.h"
#include "ws/ws_digest.h"

#include <string.h>

/* RFC 6455, section 1.3: the key of its example handshake and the accept
 * value the server must answer with. */
Test(ws_digest, accept_key_of_rfc6455s_example)
{
    char out[CP_WS_ACCEPT_LEN + 1];
    memset(out, 'x', sizeof out);
    cr_assert_eq(cp__ws_accept_key("dGhlIHNhbXBsZSBub25jZQ==", out), 0);
    cr_assert_str_eq(out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

/* Another key, another answer: the key is hashed, not ignored (the value
 * computed with `printf '%s' KEY258EAFA5-E914-47DA-95CA-C5AB0DC85B11 |
 * openssl sha1 -binary | base64`). */
Test(ws_digest, accept_key_depends_on_the_key)
{
    char out[CP_WS_ACCEPT_LEN + 1];
    cr_assert_eq(cp__ws_accept_key("AAAAAAAAAAAAAAAAAAAAAA==", out), 0);
    cr_assert_str_eq(out, "ICX+Yqv66kxgM0FcWaLWlFLwTAI=");
}

/* RFC 4648, section 10: every padding case, and bytes that use the last
 * two letters of the alphabet. */
Test(ws_digest, base64_of_rfc4648s_vectors)
{
    static const struct {
        const char *in, *out;
    } v[] = {
        { "", "" },
        { "f", "Zg==" },
        { "fo", "Zm8=" },
        { "foo", "Zm9v" },
        { "foob", "Zm9vYg==" },
        { "fooba", "Zm9vYmE=" },
        { "foobar", "Zm9vYmFy" },
        { "\xfb\xff\xbf", "+/+/" },
    };
    for (size_t i = 0; i < sizeof v / sizeof *v; i++) {
        char out[16];
        memset(out, 'x', sizeof out);
        cp__ws_base64((const uint8_t *)v[i].in, strlen(v[i].in), out);
        cr_assert_str_eq(out, v[i].out, "base64(\"%s\")", v[i].in);
    }
}

/* The generator fills all it is given. Drawn over zeros, each KiB of 16
 * KiB keeps about 4 zero bytes by chance, never 32 (p < 1e-17); the whole
 * has every byte value (one missing by chance: about 256 * e^-64). Two
 * keys' worth differ. */
Test(ws_digest, random_bytes_fill_the_buffer)
{
    static uint8_t big[16384];
    memset(big, 0, sizeof big);
    cr_assert_eq(cp__ws_random(big, sizeof big), 0);
    bool seen[256] = { false };
    for (size_t k = 0; k < sizeof big; k += 1024) {
        int zeros = 0;
        for (size_t i = k; i < k + 1024; i++) {
            seen[big[i]] = true;
            zeros += !big[i];
        }
        cr_assert_lt(zeros, 32, "bytes %zu-%zu: %d zeros, not drawn", k, k + 1023, zeros);
    }
    for (int c = 0; c < 256; c++)
        cr_assert(seen[c], "byte value %d never came", c);
    uint8_t a[16], b[16];
    cr_assert_eq(cp__ws_random(a, sizeof a), 0);
    cr_assert_eq(cp__ws_random(b, sizeof b), 0);
    cr_assert_neq(memcmp(a, b, sizeof a), 0, "two draws of 16 bytes are the same");
}
