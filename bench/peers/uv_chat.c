/* SPDX-License-Identifier: MIT */
/*
 * uv_chat — a chat server on libuv, the way a libuv user writes a broadcast.
 *
 * Packets are { u16 size; u16 id; body }, little-endian, size counting the
 * 4-byte header (4..65535). Every packet a client sends goes, unchanged, to
 * every connected client, the sender included, each sender's packets in order.
 *
 * One loop, one thread. Reads land in one loop-wide 64 KiB buffer (alloc_cb);
 * a packet cut by the end of a read waits in the client's carry buffer. Each
 * complete packet is copied once into a reference-counted message, and every
 * client gets it with its own uv_write() (one write request per packet per
 * recipient; libuv writes at once when the client's queue is empty and queues
 * the request otherwise, so each client's packets go out in order). Each
 * write's callback drops its reference; the last one frees the message.
 * A client whose libuv write queue holds more than 64 MiB is disconnected (as
 * raw_epoll_chat does with its backlog), and so is one that sends size < 4.
 *
 *   uv_chat --port P [--host H]
 *
 * Prints "listening on H:P" once ready; exits 0 on SIGINT/SIGTERM; usage and
 * exit 2 on bad arguments.
 */
#ifndef _GNU_SOURCE
#  define _GNU_SOURCE
#endif
#include <getopt.h>
#include <netdb.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <uv.h>

#define RBUF (64 * 1024)
#define BACKLOG_LIMIT ((size_t)64 << 20)

struct client {
    uv_tcp_t tcp; /* first: the handle's address is the client's */
    int idx;      /* index in clients[], -1 once closing */
    unsigned char *carry;
    size_t carry_len, carry_cap;
};

/* One packet, shared by every write request that sends it. */
struct msg {
    unsigned refs;
    uv_buf_t buf;
    unsigned char data[];
};

struct wreq {
    uv_write_t req;
    struct msg *m;
};

static uv_loop_t *loop;
static struct client **clients; /* connected clients, dense */
static size_t nclients, clients_cap;
static char rbuf[RBUF];

static void usage(FILE *f)
{
    fprintf(f, "usage: uv_chat --port P [--host H]\n"
               "  libuv chat server: every packet {u16 size,u16 id,body} from any client goes to\n"
               "  every client, one uv_write per packet per client, one loop\n"
               "  --host H      address to bind (default 0.0.0.0)\n");
}

static void on_close(uv_handle_t *h)
{
    struct client *c = (struct client *)h;
    free(c->carry);
    free(c);
}

/* Takes the client out of the room and closes it; its queued writes end with
 * UV_ECANCELED before on_close runs. */
static void drop(struct client *c)
{
    if (c->idx < 0)
        return;
    struct client *last = clients[--nclients];
    clients[c->idx] = last;
    last->idx = c->idx;
    c->idx = -1;
    uv_close((uv_handle_t *)&c->tcp, on_close);
}

static void msg_unref(struct msg *m)
{
    if (--m->refs == 0)
        free(m);
}

static void write_cb(uv_write_t *req, int status)
{
    struct wreq *w = (struct wreq *)req;
    msg_unref(w->m);
    if (status < 0)
        drop((struct client *)req->handle);
    free(w);
}

/* One uv_write of the packet to every client. */
static void broadcast(const unsigned char *p, size_t len)
{
    struct msg *m = malloc(sizeof *m + len);
    if (!m)
        return;
    memcpy(m->data, p, len);
    m->buf = uv_buf_init((char *)m->data, (unsigned)len);
    m->refs = 1; /* ours, until every request holds its own */
    for (size_t i = 0; i < nclients;) {
        struct client *c = clients[i];
        uv_stream_t *s = (uv_stream_t *)&c->tcp;
        struct wreq *w = malloc(sizeof *w);
        if (!w || uv_stream_get_write_queue_size(s) > BACKLOG_LIMIT) {
            free(w);
            drop(c); /* clients[i] now holds another client */
            continue;
        }
        w->m = m;
        m->refs++;
        if (uv_write(&w->req, s, &m->buf, 1, write_cb) != 0) {
            m->refs--;
            free(w);
            drop(c);
            continue;
        }
        i++;
    }
    msg_unref(m);
}

static int reserve(unsigned char **p, size_t *cap, size_t need)
{
    if (need <= *cap)
        return 0;
    size_t n = *cap ? *cap : 4096;
    while (n < need)
        n *= 2;
    unsigned char *q = realloc(*p, n);
    if (!q)
        return -1;
    *p = q;
    *cap = n;
    return 0;
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)h;
    (void)suggested;
    buf->base = rbuf;
    buf->len = RBUF;
}

/* Broadcasts the complete packets at the front of [p, p+len); returns how many
 * bytes they took, or -1 if a packet's size is below its header. */
static ssize_t broadcast_packets(struct client *c, const unsigned char *p, size_t len)
{
    size_t off = 0;
    while (len - off >= 4 && c->idx >= 0) {
        size_t size = (size_t)p[off] | (size_t)p[off + 1] << 8;
        if (size < 4)
            return -1;
        if (size > len - off)
            break;
        broadcast(p + off, size);
        off += size;
    }
    return (ssize_t)off;
}

static void read_cb(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    struct client *c = (struct client *)s;
    if (n < 0) {
        drop(c);
        return;
    }
    if (n == 0 || c->idx < 0)
        return;
    const unsigned char *data = (const unsigned char *)buf->base;
    size_t len = (size_t)n;
    if (c->carry_len) {
        /* Complete the carried packet first; whatever follows stays in place. */
        if (reserve(&c->carry, &c->carry_cap, c->carry_len + len) < 0) {
            drop(c);
            return;
        }
        memcpy(c->carry + c->carry_len, data, len);
        data = c->carry;
        len += c->carry_len;
        c->carry_len = 0;
    }
    ssize_t used = broadcast_packets(c, data, len);
    if (used < 0 || c->idx < 0) {
        drop(c);
        return;
    }
    size_t rest = len - (size_t)used;
    if (rest) {
        if (reserve(&c->carry, &c->carry_cap, rest) < 0) {
            drop(c);
            return;
        }
        memmove(c->carry, data + used, rest);
    }
    c->carry_len = rest;
}

static void on_connection(uv_stream_t *server, int status)
{
    if (status < 0)
        return;
    struct client *c = calloc(1, sizeof *c);
    if (!c)
        return;
    uv_tcp_init(loop, &c->tcp);
    c->idx = -1;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        uv_close((uv_handle_t *)&c->tcp, on_close);
        return;
    }
    if (nclients == clients_cap) {
        size_t cap = clients_cap ? 2 * clients_cap : 1024;
        struct client **q = realloc(clients, cap * sizeof *q);
        if (!q) {
            uv_close((uv_handle_t *)&c->tcp, on_close);
            return;
        }
        clients = q;
        clients_cap = cap;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    c->idx = (int)nclients;
    clients[nclients++] = c;
    uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, read_cb);
}

static void on_signal(uv_signal_t *h, int signum)
{
    (void)signum;
    uv_stop(h->loop);
}

int main(int argc, char **argv)
{
    const char *host = "0.0.0.0";
    long port = -1;
    static const struct option lo[] = {
        { "port", required_argument, NULL, 'p' },
        { "host", required_argument, NULL, 'H' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int o;
    char *end;
    while ((o = getopt_long(argc, argv, "p:H:h", lo, NULL)) != -1) {
        switch (o) {
        case 'p':
            port = strtol(optarg, &end, 10);
            if (*optarg == 0 || *end || port < 0 || port > 65535) {
                usage(stderr);
                return 2;
            }
            break;
        case 'H': host = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (port < 0 || optind != argc) {
        usage(stderr);
        return 2;
    }

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);
    loop = uv_default_loop();

    struct sockaddr_storage addr;
    if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)&addr) != 0 &&
        uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)&addr) != 0) {
        fprintf(stderr, "uv_chat: bad host %s\n", host);
        return 2;
    }
    static uv_tcp_t server;
    uv_tcp_init(loop, &server);
    int rc = uv_tcp_bind(&server, (const struct sockaddr *)&addr, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&server, SOMAXCONN, on_connection);
    if (rc != 0) {
        fprintf(stderr, "uv_chat: listen %s:%ld: %s\n", host, port, uv_strerror(rc));
        return 1;
    }
    struct sockaddr_storage ss;
    int sl = (int)sizeof ss;
    char h[NI_MAXHOST] = "?", p[NI_MAXSERV] = "?";
    if (uv_tcp_getsockname(&server, (struct sockaddr *)&ss, &sl) == 0)
        getnameinfo((struct sockaddr *)&ss, (socklen_t)sl, h, sizeof h, p, sizeof p,
                    NI_NUMERICHOST | NI_NUMERICSERV);
    static uv_signal_t sigint, sigterm;
    uv_signal_init(loop, &sigint);
    uv_signal_start(&sigint, on_signal, SIGINT);
    uv_signal_init(loop, &sigterm);
    uv_signal_start(&sigterm, on_signal, SIGTERM);

    printf("listening on %s:%s (libuv %s, one loop)\n", h, p, uv_version_string());
    fflush(stdout);
    uv_run(loop, UV_RUN_DEFAULT);
    return 0;
}
