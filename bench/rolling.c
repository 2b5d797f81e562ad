/* SPDX-License-Identifier: MIT */
/*
 * rolling — clients that keep connecting through a rolling restart, and
 * what became of each connection.
 *
 *   rolling --port P [--host H] [--rate R] [--hold MS] [--every MS]
 *           [--duration SEC]
 *
 * R new connections a second (default 200), paced evenly. Each one sends a
 * cport packet (a 4-byte little-endian header: size, then id; 16 bytes of
 * body) at once and every MS milliseconds after (default 250), and checks
 * each echo; after HOLD milliseconds (default 2000) the client closes it.
 * New connections stop after SEC seconds (default 8); the ones still open
 * finish their hold. One thread, non-blocking sockets, epoll.
 *
 * Each connection ends in one of these, counted and printed as one line:
 *   refused    the connect failed (ECONNREFUSED, a reset in the handshake)
 *   reset      a reset after it was up (ECONNRESET, EPIPE)
 *   sent_away  the end of the stream before the first echo: accepted by a
 *              server that was draining already
 *   drained    the end of the stream after an echo, before the hold was
 *              over: a server's graceful stop (every echo it owed came first)
 *   completed  the hold was over; the client closed it
 *   stuck      an echo owed for more than 5 s: counted and closed
 * and bad_echo counts echoes that were not what was sent.
 *
 * Exit status: 0, or 2 for a bad command line.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BODY 16
#define PKT (4 + BODY)
#define STUCK_NS (5000ull * 1000000ull)

typedef struct conn {
    int fd;
    bool up;            /* the connect completed */
    bool served;        /* an echo came back */
    uint32_t sent, got; /* packets sent and echoes checked */
    uint64_t born_ns;   /* when the connect began */
    uint64_t next_ns;   /* the next packet's time */
    uint64_t owed_ns;   /* when the oldest unanswered packet was sent; 0 = none */
    uint8_t in[PKT];
    uint32_t in_len;
} conn;

static struct {
    unsigned long long attempts, refused, reset, sent_away, drained, completed, stuck, bad_echo;
} st;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void usage(FILE *out)
{
    fprintf(out, "usage: rolling --port P [--host H] [--rate R] [--hold MS] [--every MS] [--duration SEC]\n");
}

static void usage_exit(const char *what)
{
    fprintf(stderr, "rolling: %s\n", what);
    usage(stderr);
    exit(2);
}

static long num_arg(const char *v, long lo, long hi, const char *what)
{
    char *end;
    errno = 0;
    long n = strtol(v, &end, 10);
    if (errno || *end || end == v || n < lo || n > hi)
        usage_exit(what);
    return n;
}

static void make_packet(uint8_t *p, uint32_t seq)
{
    p[0] = PKT & 0xff;
    p[1] = PKT >> 8;
    p[2] = 7;
    p[3] = 0;
    for (int i = 0; i < BODY; i++)
        p[4 + i] = (uint8_t)(seq * 31u + (uint32_t)i);
}

static void finish(int ep, conn *c, unsigned long long *counter)
{
    (*counter)++;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

/* The end of a connection the server closed or reset, by what it had had. */
static void ended(int ep, conn *c, int err)
{
    if (!c->up)
        finish(ep, c, &st.refused);
    else if (err == ECONNRESET || err == EPIPE)
        finish(ep, c, &st.reset);
    else if (err)
        finish(ep, c, &st.reset);
    else
        finish(ep, c, c->served ? &st.drained : &st.sent_away);
}

static bool send_next(conn *c, uint64_t now)
{
    uint8_t p[PKT];
    make_packet(p, c->sent);
    ssize_t n = send(c->fd, p, sizeof p, MSG_NOSIGNAL);
    if (n != (ssize_t)sizeof p)
        return false; /* 20 bytes into an empty-ish socket buffer: all or an error */
    if (!c->owed_ns)
        c->owed_ns = now;
    c->sent++;
    return true;
}

/* Reads what came; false when the connection ended (and was counted). */
static bool read_echoes(int ep, conn *c, uint64_t now)
{
    for (;;) {
        ssize_t n = recv(c->fd, c->in + c->in_len, sizeof c->in - c->in_len, 0);
        if (n == 0) {
            ended(ep, c, 0);
            return false;
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return true;
            ended(ep, c, errno);
            return false;
        }
        c->in_len += (uint32_t)n;
        if (c->in_len < PKT)
            continue;
        uint8_t want[PKT];
        make_packet(want, c->got);
        if (memcmp(want, c->in, PKT) != 0)
            st.bad_echo++;
        c->got++;
        c->served = true;
        c->in_len = 0;
        c->owed_ns = c->got < c->sent ? now : 0;
    }
}

static conn *open_one(int ep, const struct sockaddr_in *sa, uint64_t now)
{
    st.attempts++;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        st.refused++;
        return NULL;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &(int){ 1 }, sizeof(int));
    if (connect(fd, (const struct sockaddr *)sa, sizeof *sa) < 0 && errno != EINPROGRESS) {
        close(fd);
        st.refused++;
        return NULL;
    }
    conn *c = calloc(1, sizeof *c);
    if (!c) {
        close(fd);
        st.refused++;
        return NULL;
    }
    c->fd = fd;
    c->born_ns = now;
    struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP, .data.ptr = c };
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    return c;
}

/* One epoll event of c; false when c ended. */
static bool on_event(int ep, conn *c, uint32_t events, uint64_t now)
{
    if (!c->up) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err || (events & (EPOLLERR | EPOLLHUP))) {
            finish(ep, c, &st.refused);
            return false;
        }
        if (!(events & EPOLLOUT))
            return true;
        c->up = true;
        struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP, .data.ptr = c };
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        if (!send_next(c, now)) {
            ended(ep, c, errno);
            return false;
        }
        c->next_ns = now;
    }
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP))
        return read_echoes(ep, c, now);
    return true;
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1";
    long port = -1, rate = 200, hold_ms = 2000, every_ms = 250, duration = 8;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        if (strcmp(o, "--help") == 0) {
            usage(stdout);
            return 0;
        }
        if (i + 1 >= argc)
            usage_exit("an option needs a value");
        const char *v = argv[++i];
        if (strcmp(o, "--host") == 0)
            host = v;
        else if (strcmp(o, "--port") == 0)
            port = num_arg(v, 1, 65535, "bad --port");
        else if (strcmp(o, "--rate") == 0)
            rate = num_arg(v, 1, 100000, "bad --rate (connections a second)");
        else if (strcmp(o, "--hold") == 0)
            hold_ms = num_arg(v, 0, 600000, "bad --hold (ms)");
        else if (strcmp(o, "--every") == 0)
            every_ms = num_arg(v, 1, 600000, "bad --every (ms)");
        else if (strcmp(o, "--duration") == 0)
            duration = num_arg(v, 1, 3600, "bad --duration (seconds)");
        else
            usage_exit("unknown option");
    }
    if (port < 0)
        usage_exit("--port is required");
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1)
        usage_exit("bad --host (an IPv4 address)");
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    int ep = epoll_create1(EPOLL_CLOEXEC);
    /* Every connection, for the timers: a plain array, swept each round. */
    size_t cap = (size_t)rate * (size_t)(hold_ms / 1000 + 7) + 64, n = 0;
    conn **all = calloc(cap, sizeof *all);
    if (ep < 0 || !all) {
        perror("rolling");
        return 1;
    }
    uint64_t start = now_ns(), gap = 1000000000ull / (uint64_t)rate;
    uint64_t stop_new = start + (uint64_t)duration * 1000000000ull, next_open = start;
    uint64_t hold = (uint64_t)hold_ms * 1000000ull, every = (uint64_t)every_ms * 1000000ull;
    for (;;) {
        uint64_t now = now_ns();
        while (next_open <= now && next_open < stop_new && n < cap) {
            conn *c = open_one(ep, &sa, now);
            if (c)
                all[n++] = c;
            next_open += gap;
        }
        if (now >= stop_new && n == 0)
            break;
        struct epoll_event evs[256];
        int k = epoll_wait(ep, evs, 256, 1);
        now = now_ns();
        for (int i = 0; i < k; i++) {
            conn *c = evs[i].data.ptr;
            if (!on_event(ep, c, evs[i].events, now)) {
                for (size_t j = 0; j < n; j++)
                    if (all[j] == c) {
                        all[j] = all[--n];
                        break;
                    }
            }
        }
        /* Timers: packets due, holds over, echoes owed too long. */
        for (size_t j = 0; j < n;) {
            conn *c = all[j];
            bool gone = false;
            if (c->up && now - c->born_ns >= hold) {
                finish(ep, c, &st.completed);
                gone = true;
            } else if (c->owed_ns && now - c->owed_ns > STUCK_NS) {
                finish(ep, c, &st.stuck);
                gone = true;
            } else if (!c->up && now - c->born_ns > STUCK_NS) {
                finish(ep, c, &st.refused);
                gone = true;
            } else if (c->up && now - c->next_ns >= every) {
                c->next_ns = now;
                if (!send_next(c, now)) {
                    ended(ep, c, errno);
                    gone = true;
                }
            }
            if (gone)
                all[j] = all[--n];
            else
                j++;
        }
    }
    printf("rolling: attempts=%llu refused=%llu reset=%llu sent_away=%llu drained=%llu completed=%llu "
           "stuck=%llu "
           "bad_echo=%llu\n",
           st.attempts, st.refused, st.reset, st.sent_away, st.drained, st.completed, st.stuck, st.bad_echo);
    free(all);
    close(ep);
    return 0;
}
