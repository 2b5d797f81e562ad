/* SPDX-License-Identifier: MIT */
/*
 * uv_echo — an echo server on libuv, the way a libuv user writes a fast one.
 *
 * One uv_loop per thread; each thread has its own listening socket on the same
 * port (SO_REUSEPORT, set by hand: libuv 1.44 has no UV_TCP_REUSEPORT), so the
 * kernel spreads the connections over the loops. Each loop reads into one
 * shared 64 KiB buffer and echoes with uv_try_write(); only the unwritten rest
 * of a short write is copied and queued with uv_write(), and the connection
 * stops reading until that write completes (back-pressure).
 *
 *   uv_echo --port P [--host H] [--threads N]      (default threads: CPUs online)
 *
 * Prints "listening on H:P" once every loop listens; exits 0 on SIGINT/SIGTERM;
 * usage and exit 2 on bad arguments.
 */
#ifndef _GNU_SOURCE
#  define _GNU_SOURCE
#endif
#include <errno.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#define RBUF (64 * 1024)

struct worker {
    pthread_t th;
    uv_loop_t loop;
    uv_tcp_t server;
    uv_async_t stop;
    char rbuf[RBUF];
    int fd;
};

struct wreq {
    uv_write_t req;
    uv_buf_t buf;
    char data[];
};

static void usage(FILE *f)
{
    fprintf(f, "usage: uv_echo --port P [--host H] [--threads N]\n"
               "  libuv echo server: one loop per thread, SO_REUSEPORT listeners\n"
               "  --host H      address to bind (default 0.0.0.0)\n"
               "  --threads N   loops/threads (default: CPUs online)\n");
}

static void on_close(uv_handle_t *h) { free(h); }

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct worker *w = h->loop->data;
    (void)suggested;
    buf->base = w->rbuf;
    buf->len = RBUF;
}

static void read_cb(uv_stream_t *s, ssize_t n, const uv_buf_t *buf);

static void write_cb(uv_write_t *req, int status)
{
    struct wreq *wr = (struct wreq *)req;
    uv_stream_t *s = req->handle;
    free(wr);
    if (status < 0) {
        if (!uv_is_closing((uv_handle_t *)s))
            uv_close((uv_handle_t *)s, on_close);
        return;
    }
    if (uv_stream_get_write_queue_size(s) == 0 && !uv_is_closing((uv_handle_t *)s))
        uv_read_start(s, alloc_cb, read_cb);
}

static void read_cb(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    if (n < 0) {
        if (!uv_is_closing((uv_handle_t *)s))
            uv_close((uv_handle_t *)s, on_close);
        return;
    }
    if (n == 0)
        return;
    uv_buf_t b = uv_buf_init(buf->base, (unsigned)n);
    int w = uv_try_write(s, &b, 1);
    if (w == n)
        return;
    if (w < 0) {
        if (w != UV_EAGAIN) {
            uv_close((uv_handle_t *)s, on_close);
            return;
        }
        w = 0;
    }
    size_t rest = (size_t)n - (size_t)w;
    struct wreq *wr = malloc(sizeof *wr + rest);
    if (!wr) {
        uv_close((uv_handle_t *)s, on_close);
        return;
    }
    memcpy(wr->data, buf->base + w, rest);
    wr->buf = uv_buf_init(wr->data, (unsigned)rest);
    if (uv_write(&wr->req, s, &wr->buf, 1, write_cb) != 0) {
        free(wr);
        uv_close((uv_handle_t *)s, on_close);
        return;
    }
    uv_read_stop(s); /* resumed in write_cb once the rest is written */
}

static void on_connection(uv_stream_t *server, int status)
{
    if (status < 0)
        return;
    uv_tcp_t *c = malloc(sizeof *c);
    if (!c)
        return;
    uv_tcp_init(server->loop, c);
    if (uv_accept(server, (uv_stream_t *)c) != 0) {
        uv_close((uv_handle_t *)c, on_close);
        return;
    }
    uv_tcp_nodelay(c, 1);
    uv_read_start((uv_stream_t *)c, alloc_cb, read_cb);
}

static void on_stop(uv_async_t *a) { uv_stop(a->loop); }

static void *run(void *arg)
{
    struct worker *w = arg;
    uv_run(&w->loop, UV_RUN_DEFAULT);
    return NULL;
}

/* A listening socket with SO_REUSEPORT; *port is filled in when it was 0. */
static int make_listener(const char *host, char *port, size_t portlen, char *desc, size_t desclen)
{
    struct addrinfo hints, *res, *ai;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "uv_echo: %s:%s: %s\n", host, port, gai_strerror(rc));
        return -1;
    }
    int fd = -1;
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
            continue;
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, SOMAXCONN) == 0) {
            struct sockaddr_storage ss;
            socklen_t sl = sizeof ss;
            char h[NI_MAXHOST], p[NI_MAXSERV];
            if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0 &&
                getnameinfo((struct sockaddr *)&ss, sl, h, sizeof h, p, sizeof p,
                            NI_NUMERICHOST | NI_NUMERICSERV) == 0) {
                snprintf(desc, desclen, "%s:%s", h, p);
                snprintf(port, portlen, "%s", p);
            }
            break;
        }
        fprintf(stderr, "uv_echo: bind/listen %s:%s: %s\n", host, port, strerror(errno));
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    return fd;
}

int main(int argc, char **argv)
{
    const char *host = "0.0.0.0";
    char port[NI_MAXSERV] = "";
    long threads = sysconf(_SC_NPROCESSORS_ONLN);
    static const struct option lo[] = {
        { "port", required_argument, NULL, 'p' },
        { "host", required_argument, NULL, 'H' },
        { "threads", required_argument, NULL, 't' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int o;
    char *end;
    while ((o = getopt_long(argc, argv, "p:H:t:h", lo, NULL)) != -1) {
        switch (o) {
        case 'p': {
            long pn = strtol(optarg, &end, 10);
            if (*optarg == 0 || *end || pn < 0 || pn > 65535) {
                usage(stderr);
                return 2;
            }
            snprintf(port, sizeof port, "%ld", pn);
            break;
        }
        case 'H': host = optarg; break;
        case 't':
            threads = strtol(optarg, &end, 10);
            if (*optarg == 0 || *end || threads < 1 || threads > 256) {
                usage(stderr);
                return 2;
            }
            break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (!port[0] || optind != argc) {
        usage(stderr);
        return 2;
    }
    if (threads < 1)
        threads = 1;

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &mask, NULL); /* the loops inherit it; main sigwaits */

    struct worker *ws = calloc((size_t)threads, sizeof *ws);
    if (!ws)
        return 1;
    char desc[NI_MAXHOST + NI_MAXSERV + 2] = "?";
    for (long i = 0; i < threads; i++) {
        struct worker *w = &ws[i];
        w->fd = make_listener(host, port, sizeof port, desc, sizeof desc);
        if (w->fd < 0)
            return 1;
        uv_loop_init(&w->loop);
        w->loop.data = w;
        uv_tcp_init(&w->loop, &w->server);
        int rc = uv_tcp_open(&w->server, w->fd);
        if (rc == 0)
            rc = uv_listen((uv_stream_t *)&w->server, SOMAXCONN, on_connection);
        if (rc != 0) {
            fprintf(stderr, "uv_echo: listen: %s\n", uv_strerror(rc));
            return 1;
        }
        uv_async_init(&w->loop, &w->stop, on_stop);
    }
    for (long i = 0; i < threads; i++)
        if (pthread_create(&ws[i].th, NULL, run, &ws[i]) != 0) {
            perror("uv_echo: pthread_create");
            return 1;
        }
    printf("listening on %s (libuv %s, %ld loop thread%s)\n", desc, uv_version_string(), threads,
           threads == 1 ? "" : "s");
    fflush(stdout);
    int sig;
    sigwait(&mask, &sig);
    for (long i = 0; i < threads; i++)
        uv_async_send(&ws[i].stop);
    for (long i = 0; i < threads; i++)
        pthread_join(ws[i].th, NULL);
    return 0;
}
