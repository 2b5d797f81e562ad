/* SPDX-License-Identifier: MIT */
/*
 * The PROXY protocol's header, versions 1 (text) and 2 (binary), as HAProxy
 * specifies it (doc/proxy-protocol.txt): a parser over the bytes received
 * so far, which says "more", "malformed" or how long the header was and
 * what address it carries. The session's receive path calls it while a
 * session waits for its header (session.c).
 */
#include "net/net.h"

#include <string.h>

static const uint8_t v2_sig[12] = { 0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a };

/* v1's longest line: "PROXY TCP6 " + two addresses of 39 + two ports + CRLF. */
#define V1_MAX 107

/* A port: 1 to 5 digits, no leading zero, at most 65535. */
static bool v1_port(const char *s, size_t n, uint16_t *out)
{
    if (n == 0 || n > 5 || (n > 1 && s[0] == '0'))
        return false;
    uint32_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (uint32_t)(s[i] - '0');
    }
    if (v > 65535)
        return false;
    *out = (uint16_t)v;
    return true;
}

/* The line without its CRLF, NUL-terminated in line. */
static int v1_parse(char *line, cp_sockaddr *addr, socklen_t *len)
{
    /* Fields: "PROXY", protocol, source, destination, source port, destination port. */
    char *f[6];
    int nf = 0;
    for (char *p = line; nf < 6;) {
        f[nf++] = p;
        char *sp = strchr(p, ' ');
        if (!sp)
            break;
        *sp = '\0';
        p = sp + 1;
    }
    if (nf < 2 || strcmp(f[0], "PROXY") != 0)
        return -1;
    if (strcmp(f[1], "UNKNOWN") == 0) { /* the rest, if any, is to be ignored */
        *len = 0;
        return 0;
    }
    if (nf != 6 || strchr(f[5], ' '))
        return -1;
    uint16_t sport, dport;
    if (!v1_port(f[4], strlen(f[4]), &sport) || !v1_port(f[5], strlen(f[5]), &dport))
        return -1;
    memset(addr, 0, sizeof *addr);
    struct in6_addr dst6;
    struct in_addr dst4;
    if (strcmp(f[1], "TCP4") == 0) {
        if (inet_pton(AF_INET, f[2], &addr->v4.sin_addr) != 1 || inet_pton(AF_INET, f[3], &dst4) != 1)
            return -1;
        addr->v4.sin_family = AF_INET;
        addr->v4.sin_port = htons(sport);
        *len = sizeof addr->v4;
        return 0;
    }
    if (strcmp(f[1], "TCP6") == 0) {
        if (inet_pton(AF_INET6, f[2], &addr->v6.sin6_addr) != 1 || inet_pton(AF_INET6, f[3], &dst6) != 1)
            return -1;
        addr->v6.sin6_family = AF_INET6;
        addr->v6.sin6_port = htons(sport);
        *len = sizeof addr->v6;
        return 0;
    }
    return -1;
}

static int v1(const uint8_t *data, size_t n, cp_sockaddr *addr, socklen_t *len)
{
    static const char prefix[] = "PROXY ";
    size_t cmp = n < 6 ? n : 6;
    if (memcmp(data, prefix, cmp) != 0)
        return -1;
    size_t lim = n < V1_MAX ? n : V1_MAX;
    for (size_t i = 0; i < lim; i++) {
        if (data[i] == '\r' && i + 1 < lim && data[i + 1] == '\n') {
            char line[V1_MAX];
            memcpy(line, data, i);
            line[i] = '\0';
            return v1_parse(line, addr, len) < 0 ? -1 : (int)(i + 2);
        }
        /* A line ends with CRLF and holds no NUL; a CR alone may be the
         * last byte received so far. */
        if (data[i] == '\n' || data[i] == '\0' || (data[i] == '\r' && i + 1 < lim))
            return -1;
    }
    return n < V1_MAX ? 0 : -1;
}

static int v2(const uint8_t *data, size_t n, cp_sockaddr *addr, socklen_t *len)
{
    size_t cmp = n < sizeof v2_sig ? n : sizeof v2_sig;
    if (memcmp(data, v2_sig, cmp) != 0)
        return -1;
    if (n < 16)
        return n > 12 && (data[12] >> 4) != 2 ? -1 : 0;
    unsigned ver = data[12] >> 4, cmd = data[12] & 0xf, fam = data[13];
    size_t body = (size_t)data[14] << 8 | data[15];
    if (ver != 2 || cmd > 1 || 16 + body > CP_PROXY_MAX)
        return -1;
    if (n < 16 + body)
        return 0;
    const uint8_t *b = data + 16;
    *len = 0;
    if (cmd == 0) /* LOCAL: the proxy's own connection (a health check); the block is ignored */
        return (int)(16 + body);
    memset(addr, 0, sizeof *addr);
    switch (fam) {
    case 0x11: /* TCP over IPv4: source, destination, source port, destination port */
        if (body < 12)
            return -1;
        addr->v4.sin_family = AF_INET;
        memcpy(&addr->v4.sin_addr, b, 4);
        memcpy(&addr->v4.sin_port, b + 8, 2);
        *len = sizeof addr->v4;
        break;
    case 0x21: /* TCP over IPv6 */
        if (body < 36)
            return -1;
        addr->v6.sin6_family = AF_INET6;
        memcpy(&addr->v6.sin6_addr, b, 16);
        memcpy(&addr->v6.sin6_port, b + 32, 2);
        *len = sizeof addr->v6;
        break;
    case 0x00: /* UNSPEC, and the UNIX socket families: nothing we can name; keep the socket's */
    case 0x31:
    case 0x32: break;
    default: return -1; /* UDP, or unknown: not what a TCP listener is sent */
    }
    /* TLVs after the addresses are skipped whole: none changes the address. */
    return (int)(16 + body);
}

int cp__proxy_parse(const uint8_t *data, size_t n, cp_sockaddr *addr, socklen_t *len)
{
    *len = 0;
    if (n == 0)
        return 0;
    if (data[0] == 'P')
        return v1(data, n, addr, len);
    if (data[0] == 0x0d)
        return v2(data, n, addr, len);
    return -1;
}
