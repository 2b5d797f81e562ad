/* SPDX-License-Identifier: MIT */
/*
 * nats_pub — the minimal pipelined NATS publisher the bus is measured against.
 *
 * One thread, one blocking socket: CONNECT (verbose and pedantic off), then
 * N messages "PUB subject S\r\n<S bytes>\r\n" packed into 64 KiB writes, then
 * PING, and the time ends when the server's PONG arrives (so it has read
 * every message). Nothing else: no reconnects, no bounds, no thread
 * hand-off. What a hand-written client reaches is the ceiling.
 *
 *   nats_pub --port P [--host H] [--count N] [--size S] [--subject SUBJ]
 *
 * Prints "RESULT msgs=N size=S seconds=T msgs_per_s=R cpu_ns_per_msg=C".
 */
#ifndef _GNU_SOURCE
#  define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            perror("nats_pub: write");
            exit(1);
        }
        p += w;
        n -= (size_t)w;
    }
}

/* Reads until the buffer holds "PONG\r\n" (the server answers nothing else
 * with verbose off, but its INFO may come first). */
static void wait_pong(int fd)
{
    char buf[8192];
    size_t have = 0;
    for (;;) {
        ssize_t r = read(fd, buf + have, sizeof buf - 1 - have);
        if (r <= 0) {
            fprintf(stderr, "nats_pub: the server closed\n");
            exit(1);
        }
        have += (size_t)r;
        buf[have] = '\0';
        if (strstr(buf, "PONG\r\n"))
            return;
        if (have > sizeof buf / 2) { /* keep the tail only */
            memmove(buf, buf + have - 16, 16);
            have = 16;
        }
    }
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1", *subject = "bench.pub";
    int port = 4222;
    long count = 1000000, size = 64;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--host"))
            host = argv[i + 1];
        else if (!strcmp(argv[i], "--port"))
            port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--count"))
            count = atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--size"))
            size = atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--subject"))
            subject = argv[i + 1];
        else {
            fprintf(stderr, "usage: nats_pub --port P [--host H] [--count N] [--size S] [--subject SUBJ]\n");
            return 2;
        }
    }
    if (port <= 0 || port > 65535 || count <= 0 || size < 0 || size > 1 << 20) {
        fprintf(stderr, "usage: nats_pub --port P [--host H] [--count N] [--size S] [--subject SUBJ]\n");
        return 2;
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    inet_pton(AF_INET, host, &sa.sin_addr);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        perror("nats_pub: connect");
        return 1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    static const char hello[] = "CONNECT {\"verbose\":false,\"pedantic\":false}\r\nPING\r\n";
    write_all(fd, hello, sizeof hello - 1);
    wait_pong(fd);

    char head[256];
    int hn = snprintf(head, sizeof head, "PUB %s %ld\r\n", subject, size);
    size_t one_len = (size_t)hn + (size_t)size + 2;
    size_t cap = 65536 > one_len ? 65536 : one_len;
    char *buf = malloc(cap);
    char *payload = malloc((size_t)size + 1);
    memset(payload, 'x', (size_t)size);
    uint64_t t0 = now_ns(), c0 = cpu_ns();
    size_t used = 0;
    for (long i = 0; i < count; i++) {
        if (used + one_len > cap) {
            write_all(fd, buf, used);
            used = 0;
        }
        memcpy(buf + used, head, (size_t)hn);
        memcpy(buf + used + hn, payload, (size_t)size);
        memcpy(buf + used + hn + size, "\r\n", 2);
        used += one_len;
    }
    write_all(fd, buf, used);
    write_all(fd, "PING\r\n", 6);
    wait_pong(fd);
    double secs = (double)(now_ns() - t0) / 1e9;
    uint64_t cpu = cpu_ns() - c0;
    printf("RESULT msgs=%ld size=%ld seconds=%.3f msgs_per_s=%.0f cpu_ns_per_msg=%.1f\n", count, size, secs,
           (double)count / secs, (double)cpu / (double)count);
    close(fd);
    free(buf);
    free(payload);
    return 0;
}
