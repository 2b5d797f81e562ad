/* SPDX-License-Identifier: MIT */
/*
 * idle_conns — open N idle TCP connections to a server and hold them.
 *
 *   idle_conns --port P [--host H] --conns N [--hold SEC] [--wave W]
 *
 * Connects in waves of W (default 256) non-blocking connects, waiting for each
 * wave to finish, so the server's accept backlog never overflows. Prints
 * "connected N" when all are up, then holds them, sending nothing, until SIGINT,
 * SIGTERM or --hold seconds (default 60) pass, and exits 0. Exit 1 if a
 * connection fails (or the server closes one while held), 2 on bad arguments.
 * Used by bench/run.sh to measure a server's memory per idle connection; one
 * process keeps below 20,000 descriptors, so 10,000 connections take one or two.
 */
#ifndef _GNU_SOURCE
#  define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_sig(int s)
{
    (void)s;
    stop = 1;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: idle_conns --port P [--host H] --conns N [--hold SEC] [--wave W]\n");
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
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
    const char *host = "127.0.0.1";
    long port = -1, conns = -1, hold = 60, wave = 256;
    static const struct option lo[] = {
        { "port", required_argument, NULL, 'p' },
        { "host", required_argument, NULL, 'H' },
        { "conns", required_argument, NULL, 'n' },
        { "hold", required_argument, NULL, 't' },
        { "wave", required_argument, NULL, 'w' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int o;
    while ((o = getopt_long(argc, argv, "p:H:n:t:w:h", lo, NULL)) != -1) {
        switch (o) {
        case 'p':
            if (num(optarg, 1, 65535, &port)) {
                usage(stderr);
                return 2;
            }
            break;
        case 'H': host = optarg; break;
        case 'n':
            if (num(optarg, 1, 19000, &conns)) {
                usage(stderr);
                return 2;
            }
            break;
        case 't':
            if (num(optarg, 0, 86400, &hold)) {
                usage(stderr);
                return 2;
            }
            break;
        case 'w':
            if (num(optarg, 1, 4096, &wave)) {
                usage(stderr);
                return 2;
            }
            break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (port < 0 || conns < 0 || optind != argc) {
        usage(stderr);
        return 2;
    }
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fprintf(stderr, "idle_conns: --host must be an IPv4 address\n");
        return 2;
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
        if (rl.rlim_cur != RLIM_INFINITY && (long)rl.rlim_cur < conns + 16) {
            fprintf(stderr, "idle_conns: file limit %ld too small for %ld connections\n", (long)rl.rlim_cur,
                    conns);
            return 2;
        }
    }
    struct sigaction sact;
    memset(&sact, 0, sizeof sact);
    sact.sa_handler = on_sig;
    sigaction(SIGINT, &sact, NULL);
    sigaction(SIGTERM, &sact, NULL);
    signal(SIGPIPE, SIG_IGN);

    struct pollfd *pf = calloc((size_t)conns, sizeof *pf);
    if (!pf)
        return 1;
    double t0 = now();
    for (long base = 0; base < conns && !stop; base += wave) {
        long n = conns - base < wave ? conns - base : wave;
        for (long i = base; i < base + n; i++) {
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (fd < 0) {
                perror("idle_conns: socket");
                return 1;
            }
            if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
                fprintf(stderr, "idle_conns: connect #%ld: %s\n", i, strerror(errno));
                return 1;
            }
            pf[i].fd = fd;
            pf[i].events = POLLOUT;
        }
        /* wait for this wave to be connected */
        long left = n;
        double deadline = now() + 10;
        while (left > 0 && !stop) {
            if (now() > deadline) {
                fprintf(stderr, "idle_conns: %ld connects still pending after 10 s\n", left);
                return 1;
            }
            int r = poll(pf + base, (nfds_t)n, 100);
            if (r < 0 && errno != EINTR)
                return 1;
            for (long i = base; r > 0 && i < base + n; i++) {
                if (!pf[i].revents || pf[i].events == 0)
                    continue;
                int err = 0;
                socklen_t el = sizeof err;
                getsockopt(pf[i].fd, SOL_SOCKET, SO_ERROR, &err, &el);
                if (err) {
                    fprintf(stderr, "idle_conns: connect #%ld: %s\n", i, strerror(err));
                    return 1;
                }
                pf[i].events = 0;
                left--;
            }
        }
    }
    if (stop)
        return 0;
    for (long i = 0; i < conns; i++)
        pf[i].events = POLLIN; /* an idle server sends nothing: POLLIN means it closed us */
    printf("connected %ld in %.2f s\n", conns, now() - t0);
    fflush(stdout);
    double end = now() + (double)hold;
    while (!stop && now() < end) {
        int r = poll(pf, (nfds_t)conns, 200);
        if (r > 0) {
            fprintf(stderr, "idle_conns: the server closed or wrote to a held connection\n");
            return 1;
        }
    }
    return 0;
}
