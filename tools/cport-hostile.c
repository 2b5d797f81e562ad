/* SPDX-License-Identifier: MIT */
/*
 * cport-hostile — hostile traffic against a running cport-server, from outside.
 *
 *   cport-hostile SCENARIO --port P [options]
 *
 * Each scenario is bounded by --duration, stops by itself and prints one
 * "RESULT scenario=..." line of key=value numbers (and, for some, progress
 * lines before it). With --server-pid it also reads the server's VmRSS from
 * /proc/PID/status for the scenarios whose verdict is about memory. Exit
 * status: 0 when every given threshold (--max-*, --min-*) held, 1 when one did
 * not or the scenario could not run, 2 for a bad command line.
 *
 * Packets are {u16 size, u16 id} little-endian, size counting the 4-byte
 * header, as cport-server's packet and chat modes frame them; in echo mode the
 * same bytes simply come back. Neighbours' probes are packets with id
 * PROBE_ID and body {magic, neighbour, sequence}: in chat mode every member
 * receives every probe and a neighbour times only its own.
 *
 * Linux/POSIX only (poll, fork, /proc). A process may hold at most 20,000
 * files on the test machine; no scenario here needs more than a few hundred
 * at once.
 */
#ifndef _GNU_SOURCE
#  define _GNU_SOURCE
#endif

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PROBE_ID 0x7072u /* "pr" */
#define FLOOD_ID 0x666cu /* "fl" */
#define DATA_ID 0x6461u  /* "da" */
#define PROBE_MAGIC 0x70726f62u
#define PROBE_SIZE 16u /* header + magic + neighbour + sequence */

static const char *const prog = "cport-hostile";

static struct options {
    const char *scenario;
    const char *host;
    int port;
    double duration;       /* seconds */
    int neighbours;        /* probing neighbours */
    int probe_ms;          /* probe interval (0 = scenario default) */
    int count;             /* burst: repeats; tiny / idle-after-burst: sessions; churn: connections */
    int round;             /* churn: connections per round */
    long burst;            /* bytes per burst */
    int packet;            /* packet size of bursts, header included */
    long packets;          /* idle-after-burst: packets per session */
    int procs;             /* storm processes */
    int batch;             /* tiny: 4-byte packets per send() */
    double rate;           /* connect-storm: connects per second in all */
    long send_queue_limit; /* tiny: the server's limit, for the report */
    int idle_ms;           /* idle-after-burst / churn: wait before the RSS sample */
    pid_t server_pid;
    /* thresholds, < 0 = not checked */
    double max_p99_ms;
    long max_cut;
    long min_served;
    double max_rss_mib;
} O = {
    .host = "127.0.0.1",
    .port = -1,
    .duration = 10,
    .neighbours = 20,
    .count = -1,
    .round = 50,
    .burst = 2L << 20,
    .packet = 1024,
    .packets = 250000,
    .procs = 4,
    .batch = 256,
    .rate = 10000,
    .send_queue_limit = 1L << 20,
    .idle_ms = 3000,
    .max_p99_ms = -1,
    .max_cut = -1,
    .min_served = -1,
    .max_rss_mib = -1,
};

/* ------------------------------------------------------------------ small helpers */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void sleep_ns(uint64_t ns)
{
    struct timespec ts = { (time_t)(ns / 1000000000u), (long)(ns % 1000000000u) };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* The neighbour thread calls this too: strerror_r (GNU's, under _GNU_SOURCE),
 * as strerror may share one buffer among threads. */
static void die(const char *what)
{
    char buf[128];
    fprintf(stderr, "%s: %s: %s\n", prog, what, strerror_r(errno, buf, sizeof buf));
    /* NOLINTNEXTLINE(concurrency-mt-unsafe): fatal errors only; two threads failing at once is not guarded */
    exit(1);
}

static void put16(uint8_t *p, unsigned v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static void put32(uint8_t *p, uint32_t v)
{
    put16(p, v & 0xffff);
    put16(p + 2, v >> 16);
}
static unsigned get16(const uint8_t *p) { return p[0] | (unsigned)p[1] << 8; }
static uint32_t get32(const uint8_t *p) { return get16(p) | (uint32_t)get16(p + 2) << 16; }

/* Fills buf with whole packets of size `size` (id DATA_ID unless given). */
static void fill_packets(uint8_t *buf, size_t len, unsigned size, unsigned id)
{
    for (size_t off = 0; off + size <= len; off += size) {
        put16(buf + off, size);
        put16(buf + off + 2, id);
        memset(buf + off + 4, 'x', size - 4);
    }
}

/* The server's VmRSS (or another /proc/PID/status field) in KiB; -1 if unknown. */
static long proc_kib(pid_t pid, const char *field)
{
    if (pid <= 0)
        return -1;
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    long v = -1;
    size_t fl = strlen(field);
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, field, fl) == 0) {
            v = strtol(line + fl, NULL, 10);
            break;
        }
    }
    fclose(f);
    return v;
}
static long rss_kib(void) { return proc_kib(O.server_pid, "VmRSS:"); }

/* A connected socket (non-blocking once connected), or -1. rcvbuf > 0 sets
 * SO_RCVBUF first. spread != 0 takes the source address 127.1.x.y from it
 * so that many short connections do not run out of ephemeral ports. */
static int dial(int rcvbuf, uint32_t spread)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (rcvbuf > 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)O.port) };
    inet_pton(AF_INET, O.host, &sa.sin_addr);
    if (spread && ntohl(sa.sin_addr.s_addr) >> 24 == 127) {
#ifdef IP_BIND_ADDRESS_NO_PORT
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
#endif
        struct sockaddr_in src = { .sin_family = AF_INET };
        src.sin_addr.s_addr = htonl(0x7f010000u | (spread % 65000u + 1u));
        (void)bind(fd, (struct sockaddr *)&src, sizeof src);
    }
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        if (errno != EINPROGRESS) {
            close(fd);
            return -1;
        }
        struct pollfd p = { .fd = fd, .events = POLLOUT };
        int err = 0;
        socklen_t el = sizeof err;
        /* Long enough for a SYN retransmitted after a full accept backlog. */
        int pr = poll(&p, 1, 5000);
        if (pr != 1 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) != 0 || err) {
            close(fd);
            errno = pr == 0 ? ETIMEDOUT : err ? err : errno;
            return -1;
        }
    }
    return fd;
}

static void close_rst(int fd)
{
    struct linger l = { 1, 0 };
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    close(fd);
}

/* Reads everything there is; returns bytes read, and sets *eof on EOF or a
 * fatal error (reset). */
static size_t drain(int fd, bool *eof)
{
    static _Thread_local uint8_t scratch[256 * 1024];
    size_t got = 0;
    for (;;) {
        ssize_t n = recv(fd, scratch, sizeof scratch, 0);
        if (n > 0) {
            got += (size_t)n;
            continue;
        }
        if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
            *eof = true;
        if (n < 0 && errno == EINTR)
            continue;
        return got;
    }
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double ms(uint64_t ns) { return (double)ns / 1e6; }

/* ------------------------------------------------------------------ verdict */

static bool failed;

static void check_max(const char *what, double v, double max)
{
    if (max >= 0 && v > max) {
        fprintf(stderr, "%s: %s: %s %.3f > %.3f\n", prog, O.scenario, what, v, max);
        failed = true;
    }
}

static void check_min(const char *what, double v, double min)
{
    if (min >= 0 && v < min) {
        fprintf(stderr, "%s: %s: %s %.3f < %.3f\n", prog, O.scenario, what, v, min);
        failed = true;
    }
}

/* ------------------------------------------------------------------ neighbours */

/* N connections that each send a probe every interval and time it until it
 * comes back; they read everything that arrives (in chat mode the whole
 * room's traffic). One thread runs them all. */
typedef struct neighbour {
    int fd;
    bool cut;
    uint32_t seq;      /* probes sent */
    uint64_t *sent_at; /* by sequence; 0 once answered */
    size_t cap;
    uint8_t *in; /* unparsed received bytes */
    size_t in_len, in_cap;
    uint8_t out[4096]; /* probes not yet written */
    size_t out_len;
} neighbour;

static struct neighbours {
    neighbour *v;
    int n;
    uint64_t interval_ns;
    atomic_bool stop;
    pthread_t thread;
    uint64_t *rtt; /* answered probes' round trips */
    size_t rtt_n, rtt_cap;
    uint64_t sent, got, cut;
} NB;

static void nb_cut(neighbour *b)
{
    if (!b->cut) {
        b->cut = true;
        NB.cut++;
        close(b->fd);
    }
}

static void nb_parse(neighbour *b, uint32_t me, uint64_t now)
{
    size_t off = 0;
    while (b->in_len - off >= 4) {
        unsigned size = get16(b->in + off);
        if (size < 4) { /* not a packet stream: give up on this one */
            nb_cut(b);
            return;
        }
        if (b->in_len - off < size)
            break;
        const uint8_t *p = b->in + off;
        if (get16(p + 2) == PROBE_ID && size == PROBE_SIZE && get32(p + 4) == PROBE_MAGIC &&
            get32(p + 8) == me) {
            uint32_t seq = get32(p + 12);
            if (seq < b->cap && b->sent_at[seq]) {
                if (NB.rtt_n == NB.rtt_cap) {
                    NB.rtt_cap = NB.rtt_cap ? NB.rtt_cap * 2 : 4096;
                    NB.rtt = realloc(NB.rtt, NB.rtt_cap * sizeof *NB.rtt);
                    if (!NB.rtt)
                        die("realloc");
                }
                NB.rtt[NB.rtt_n++] = now - b->sent_at[seq];
                b->sent_at[seq] = 0;
                NB.got++;
            }
        }
        off += size;
    }
    memmove(b->in, b->in + off, b->in_len - off);
    b->in_len -= off;
}

static void nb_read(neighbour *b, uint32_t me)
{
    while (!b->cut) {
        if (b->in_cap - b->in_len < 65536) {
            b->in_cap = b->in_cap * 2 + 65536;
            if (!(b->in = realloc(b->in, b->in_cap)))
                die("realloc");
        }
        ssize_t n = recv(b->fd, b->in + b->in_len, b->in_cap - b->in_len, 0);
        if (n > 0) {
            b->in_len += (size_t)n;
            nb_parse(b, me, now_ns());
            continue;
        }
        if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
            nb_cut(b);
        if (n < 0 && errno == EINTR)
            continue;
        return;
    }
}

static void nb_flush(neighbour *b)
{
    while (!b->cut && b->out_len) {
        ssize_t n = send(b->fd, b->out, b->out_len, MSG_NOSIGNAL);
        if (n > 0) {
            memmove(b->out, b->out + n, b->out_len - (size_t)n);
            b->out_len -= (size_t)n;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return;
        } else if (n < 0 && errno != EINTR) {
            nb_cut(b);
        }
    }
}

static void nb_probe(neighbour *b, uint32_t me)
{
    if (b->cut || b->seq >= b->cap)
        return;
    NB.sent++;
    if (b->out_len + PROBE_SIZE > sizeof b->out)
        return; /* cannot even queue it: counts as lost */
    uint8_t *p = b->out + b->out_len;
    put16(p, PROBE_SIZE);
    put16(p + 2, PROBE_ID);
    put32(p + 4, PROBE_MAGIC);
    put32(p + 8, me);
    put32(p + 12, b->seq);
    b->out_len += PROBE_SIZE;
    b->sent_at[b->seq++] = now_ns();
    nb_flush(b);
}

static void *nb_main(void *arg)
{
    (void)arg;
    struct pollfd *pf = calloc((size_t)NB.n, sizeof *pf);
    if (!pf)
        die("calloc");
    uint64_t next = now_ns();
    bool stopping = false;
    uint64_t stop_at = 0;
    for (;;) {
        uint64_t now = now_ns();
        if (!stopping && atomic_load(&NB.stop)) {
            stopping = true;
            stop_at = now + 1000000000u; /* one second for the last answers */
        }
        if (stopping && now >= stop_at)
            break;
        if (!stopping && now >= next) {
            for (int i = 0; i < NB.n; i++)
                nb_probe(&NB.v[i], (uint32_t)i);
            next += NB.interval_ns;
            if (next < now)
                next = now + NB.interval_ns;
        }
        for (int i = 0; i < NB.n; i++) {
            pf[i].fd = NB.v[i].cut ? -1 : NB.v[i].fd;
            pf[i].events = (short)(POLLIN | (NB.v[i].out_len ? POLLOUT : 0));
            pf[i].revents = 0;
        }
        uint64_t wake = stopping ? stop_at : next;
        int to = wake > now ? (int)((wake - now) / 1000000u) : 0;
        if (to > 50)
            to = 50;
        poll(pf, (nfds_t)NB.n, to);
        for (int i = 0; i < NB.n; i++) {
            if (pf[i].revents & (POLLIN | POLLHUP | POLLERR))
                nb_read(&NB.v[i], (uint32_t)i);
            if (pf[i].revents & POLLOUT)
                nb_flush(&NB.v[i]);
        }
    }
    free(pf);
    return NULL;
}

/* Connects the neighbours and starts their thread. */
static int nb_start(int n, int interval_ms, double duration)
{
    NB.n = n;
    NB.interval_ns = (uint64_t)interval_ms * 1000000u;
    NB.v = calloc((size_t)n, sizeof *NB.v);
    if (!NB.v)
        die("calloc");
    size_t cap = (size_t)(duration * 1000.0 / interval_ms) + 64;
    for (int i = 0; i < n; i++) {
        neighbour *b = &NB.v[i];
        b->fd = dial(0, 0);
        if (b->fd < 0) {
            /* NOLINTNEXTLINE(concurrency-mt-unsafe): the main thread, before the neighbour thread starts */
            fprintf(stderr, "%s: neighbour %d cannot connect: %s\n", prog, i, strerror(errno));
            return -1;
        }
        b->cap = cap;
        if (!(b->sent_at = calloc(cap, sizeof *b->sent_at)))
            die("calloc");
    }
    usleep(200000); /* the room has them all before the first probe */
    if (pthread_create(&NB.thread, NULL, nb_main, NULL) != 0)
        die("pthread_create");
    return 0;
}

typedef struct nb_report {
    double p50, p99, max, lost_pct, oldest_ms;
} nb_report;

/* Stops the neighbours (after their last second of answers) and sums up.
 * A probe not answered by then is lost; oldest_ms is the age of the oldest. */
static nb_report nb_finish(void)
{
    atomic_store(&NB.stop, true);
    pthread_join(NB.thread, NULL);
    nb_report r = { 0 };
    uint64_t now = now_ns(), oldest = 0;
    for (int i = 0; i < NB.n; i++) {
        neighbour *b = &NB.v[i];
        for (uint32_t s = 0; s < b->seq; s++)
            if (b->sent_at[s] && now - b->sent_at[s] > oldest)
                oldest = now - b->sent_at[s];
        if (!b->cut)
            close(b->fd);
        free(b->sent_at);
        free(b->in);
    }
    if (NB.rtt_n) {
        qsort(NB.rtt, NB.rtt_n, sizeof *NB.rtt, cmp_u64);
        r.p50 = ms(NB.rtt[NB.rtt_n / 2]);
        r.p99 = ms(NB.rtt[(NB.rtt_n * 99) / 100]);
        r.max = ms(NB.rtt[NB.rtt_n - 1]);
    }
    r.lost_pct = NB.sent ? 100.0 * (double)(NB.sent - NB.got) / (double)NB.sent : 0;
    r.oldest_ms = ms(oldest);
    free(NB.v);
    free(NB.rtt);
    return r;
}

static void print_nb(const nb_report *r)
{
    printf(" neighbours=%d cut=%llu probes=%llu answered=%llu lost_pct=%.2f p50_ms=%.3f p99_ms=%.3f "
           "max_ms=%.3f oldest_unanswered_ms=%.0f",
           NB.n, (unsigned long long)NB.cut, (unsigned long long)NB.sent, (unsigned long long)NB.got,
           r->lost_pct, r->p50, r->p99, r->max, r->oldest_ms);
}

static void check_nb(const nb_report *r)
{
    check_max("neighbour p99 ms", r->p99, O.max_p99_ms);
    check_max("neighbours cut", (double)NB.cut, (double)O.max_cut);
}

/* ------------------------------------------------------------------ chat-flood */

static int run_chat_flood(void)
{
    if (nb_start(O.neighbours, O.probe_ms ? O.probe_ms : 100, O.duration) != 0)
        return 1;
    int fd = dial(0, 0);
    if (fd < 0)
        die("flooder connect");
    static uint8_t out[64 * 1024];
    fill_packets(out, sizeof out, 64, FLOOD_ID);
    uint64_t sent = 0, echoed = 0, end = now_ns() + (uint64_t)(O.duration * 1e9);
    size_t off = 0;
    bool eof = false;
    while (!eof && now_ns() < end) {
        struct pollfd p = { .fd = fd, .events = POLLIN | POLLOUT };
        if (poll(&p, 1, 50) <= 0)
            continue;
        if (p.revents & (POLLIN | POLLHUP | POLLERR))
            echoed += drain(fd, &eof);
        if (p.revents & POLLOUT) {
            ssize_t n = send(fd, out + off, sizeof out - off, MSG_NOSIGNAL);
            if (n > 0) {
                sent += (uint64_t)n;
                off = (off + (size_t)n) % sizeof out;
            } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
                eof = true;
            }
        }
    }
    close(fd);
    uint64_t now = now_ns();
    if (now < end) /* a cut flooder does not end the neighbours' watch */
        sleep_ns(end - now);
    nb_report r = nb_finish();
    printf("RESULT scenario=chat-flood duration_s=%.1f flood_packets_sent=%llu flood_bytes_back=%llu "
           "flooder_cut=%d",
           O.duration, (unsigned long long)(sent / 64), (unsigned long long)echoed, eof ? 1 : 0);
    print_nb(&r);
    printf("\n");
    check_nb(&r);
    return 0;
}

/* ------------------------------------------------------------------ bursts */

/* One connection that writes `burst` bytes of packets while reading what
 * comes back. */
typedef struct pump {
    int fd;
    uint64_t sent, got;
    bool eof, done;
} pump;

/* About 64 KiB of --packet sized packets; bursts repeat it. */
static size_t burst_period(void) { return (size_t)O.packet * (64 * 1024 / (size_t)O.packet + 1); }

static const uint8_t *burst_bytes(void)
{
    static uint8_t *buf;
    static int made_for;
    if (made_for != O.packet) {
        free(buf);
        if (!(buf = malloc(burst_period())))
            die("malloc");
        fill_packets(buf, burst_period(), (unsigned)O.packet, DATA_ID);
        made_for = O.packet;
    }
    /* cppcheck-suppress deallocret ; buf is malloc's new block: die() does not return */
    return buf;
}

/* Moves a pump on; a pump is done when all came back or its peer is gone. */
static void pump_step(pump *p, short revents, uint64_t total)
{
    const uint8_t *src = burst_bytes();
    size_t period = burst_period();
    if (revents & (POLLIN | POLLHUP | POLLERR))
        p->got += drain(p->fd, &p->eof);
    while (!p->eof && p->sent < total) {
        size_t at = (size_t)(p->sent % period);
        size_t want = period - at;
        if (want > total - p->sent)
            want = (size_t)(total - p->sent);
        ssize_t n = send(p->fd, src + at, want, MSG_NOSIGNAL);
        if (n > 0)
            p->sent += (uint64_t)n;
        else {
            if (n < 0 && errno != EAGAIN && errno != EINTR)
                p->eof = true;
            break;
        }
    }
    if (p->eof || p->got >= total)
        p->done = true;
}

/* Runs the pumps until all are done or `end`; returns how many got all back. */
static int pumps_run(pump *v, int n, uint64_t total, uint64_t end)
{
    struct pollfd *pf = calloc((size_t)n, sizeof *pf);
    if (!pf)
        die("calloc");
    for (int i = 0; i < n; i++)
        pump_step(&v[i], 0, total);
    for (;;) {
        int live = 0;
        for (int i = 0; i < n; i++) {
            pf[i].fd = v[i].done ? -1 : v[i].fd;
            pf[i].events = (short)(POLLIN | (v[i].sent < total ? POLLOUT : 0));
            live += !v[i].done;
        }
        if (!live || now_ns() >= end)
            break;
        poll(pf, (nfds_t)n, 50);
        for (int i = 0; i < n; i++)
            if (!v[i].done && pf[i].revents)
                pump_step(&v[i], pf[i].revents, total);
    }
    free(pf);
    int full = 0;
    for (int i = 0; i < n; i++)
        full += v[i].got >= total;
    return full;
}

static int run_burst(void)
{
    int k = O.count > 0 ? O.count : 20;
    uint64_t t0 = now_ns(), end = t0 + (uint64_t)(O.duration * 1e9);
    int full = 0, cut = 0, stuck = 0, tried = 0;
    for (int i = 0; i < k && now_ns() < end; i++) {
        pump p = { .fd = dial(0, 0) };
        if (p.fd < 0)
            die("connect");
        tried++;
        uint64_t stop = now_ns() + 10000000000u < end ? now_ns() + 10000000000u : end;
        full += pumps_run(&p, 1, (uint64_t)O.burst, stop);
        if (p.got < (uint64_t)O.burst && p.eof)
            cut++;
        else if (p.got < (uint64_t)O.burst)
            stuck++;
        close(p.fd);
    }
    printf("RESULT scenario=burst bursts=%d burst_bytes=%ld packet=%d served_full=%d cut=%d stuck=%d "
           "elapsed_s=%.2f\n",
           tried, O.burst, O.packet, full, cut, stuck, (double)(now_ns() - t0) / 1e9);
    check_max("bursts cut", cut + stuck, (double)O.max_cut);
    check_min("bursts served", full, (double)O.min_served);
    if (tried < k)
        check_min("bursts tried", tried, k);
    return 0;
}

/* ------------------------------------------------------------------ never-readers */

/* Sends one 4-byte packet on fd if it can; false once the peer is gone. */
static bool send_tiny(int fd, int n_packets)
{
    static uint8_t tiny[4 * 1024];
    if (!tiny[0])
        fill_packets(tiny, sizeof tiny, 4, DATA_ID);
    ssize_t r = send(fd, tiny, (size_t)n_packets * 4, MSG_NOSIGNAL);
    if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
        return false;
    return true;
}

/* Whether the server closed a never-reading socket (EOF / reset pending). */
static bool peer_gone(int fd)
{
    char c;
    ssize_t n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

static int run_pin(void)
{
    enum { NR = 2, RD = 2 };
    int nr[NR], rd[RD];
    double nr_cut_s[NR];
    for (int i = 0; i < NR; i++) {
        if ((nr[i] = dial(4096, 0)) < 0)
            die("connect");
        nr_cut_s[i] = -1;
    }
    pump rp[RD] = { 0 };
    for (int i = 0; i < RD; i++) {
        if ((rd[i] = dial(0, 0)) < 0)
            die("connect");
        rp[i].fd = rd[i];
    }
    const int psize = 4000;
    static uint8_t big[4000 * 16];
    fill_packets(big, sizeof big, psize, DATA_ID);
    const double rate = 20e6; /* bytes/s per reader: ~40 MB/s in all */
    long rss0 = rss_kib(), rss_max = rss0;
    uint64_t t0 = now_ns(), end = t0 + (uint64_t)(O.duration * 1e9), next_tick = t0,
             next_rss = t0 + 1000000000u;
    int readers_cut = 0;
    printf("pin: t=0s rss_kib=%ld\n", rss0);
    while (now_ns() < end) {
        uint64_t now = now_ns();
        if (now >= next_tick) { /* one 4-byte packet per ms per never-reader */
            for (int i = 0; i < NR; i++)
                if (nr_cut_s[i] < 0 && (!send_tiny(nr[i], 1) || peer_gone(nr[i])))
                    nr_cut_s[i] = (double)(now - t0) / 1e9;
            next_tick += 1000000u;
            if (next_tick < now)
                next_tick = now + 1000000u;
        }
        double allowed = rate * (double)(now - t0) / 1e9;
        struct pollfd pf[RD];
        for (int i = 0; i < RD; i++) {
            pf[i].fd = rp[i].eof ? -1 : rd[i];
            pf[i].events = (short)(POLLIN | ((double)rp[i].sent < allowed ? POLLOUT : 0));
        }
        poll(pf, RD, 1);
        for (int i = 0; i < RD; i++) {
            if (rp[i].eof)
                continue;
            if (pf[i].revents & (POLLIN | POLLHUP | POLLERR))
                rp[i].got += drain(rd[i], &rp[i].eof);
            while (!rp[i].eof && (double)rp[i].sent < allowed) {
                size_t at = (size_t)(rp[i].sent % sizeof big);
                ssize_t n = send(rd[i], big + at, sizeof big - at, MSG_NOSIGNAL);
                if (n > 0)
                    rp[i].sent += (uint64_t)n;
                else {
                    if (n < 0 && errno != EAGAIN && errno != EINTR)
                        rp[i].eof = true;
                    break;
                }
            }
            if (rp[i].eof)
                readers_cut++;
        }
        if (now >= next_rss) {
            long r = rss_kib();
            if (r > rss_max)
                rss_max = r;
            printf("pin: t=%.0fs rss_kib=%ld never_readers_cut=%d\n", (double)(now - t0) / 1e9, r,
                   (nr_cut_s[0] >= 0) + (nr_cut_s[1] >= 0));
            fflush(stdout);
            next_rss += 1000000000u;
        }
    }
    double el = (double)(now_ns() - t0) / 1e9;
    long rss_end = rss_kib();
    if (rss_end > rss_max)
        rss_max = rss_end;
    printf("RESULT scenario=pin duration_s=%.1f reader_mb_s=%.1f readers_cut=%d never_reader_cut_s=%.2f,%.2f "
           "rss_start_kib=%ld rss_max_kib=%ld rss_end_kib=%ld\n",
           el, (double)(rp[0].got + rp[1].got) / el / 1e6, readers_cut, nr_cut_s[0], nr_cut_s[1], rss0,
           rss_max, rss_end);
    for (int i = 0; i < NR; i++)
        close(nr[i]);
    for (int i = 0; i < RD; i++)
        close(rd[i]);
    check_max("rss growth MiB", (double)(rss_max - rss0) / 1024.0, O.max_rss_mib);
    return 0;
}

static int run_tiny(void)
{
    int n = O.count > 0 ? O.count : 100;
    int *fd = calloc((size_t)n, sizeof *fd);
    double *cut_s = calloc((size_t)n, sizeof *cut_s);
    if (!fd || !cut_s)
        die("calloc");
    long rss0 = rss_kib(), rss_max = rss0;
    for (int i = 0; i < n; i++) {
        if ((fd[i] = dial(4096, 0)) < 0)
            die("connect");
        cut_s[i] = -1;
    }
    uint64_t t0 = now_ns(), end = t0 + (uint64_t)(O.duration * 1e9), next_rss = t0;
    int cut = 0;
    while (cut < n && now_ns() < end) {
        uint64_t now = now_ns();
        for (int i = 0; i < n; i++) {
            if (cut_s[i] >= 0)
                continue;
            if (!send_tiny(fd[i], O.batch) || peer_gone(fd[i])) {
                cut_s[i] = (double)(now - t0) / 1e9;
                cut++;
            }
        }
        if (now >= next_rss) {
            long r = rss_kib();
            if (r > rss_max)
                rss_max = r;
            next_rss = now + 100000000u;
        }
    }
    usleep(200000);
    long rss_end = rss_kib();
    double last_cut = -1;
    for (int i = 0; i < n; i++)
        if (cut_s[i] > last_cut)
            last_cut = cut_s[i];
    double bound_kib = (double)n * (double)O.send_queue_limit / 1024.0;
    printf("RESULT scenario=tiny sessions=%d cut=%d last_cut_s=%.2f rss_start_kib=%ld rss_max_kib=%ld "
           "rss_end_kib=%ld n_x_limit_kib=%.0f growth_over_limit=%.2f\n",
           n, cut, last_cut, rss0, rss_max, rss_end, bound_kib,
           rss0 >= 0 ? (double)(rss_max - rss0) / bound_kib : -1.0);
    for (int i = 0; i < n; i++)
        close(fd[i]);
    free(fd);
    free(cut_s);
    check_max("rss growth MiB", (double)(rss_max - rss0) / 1024.0, O.max_rss_mib);
    return 0;
}

/* ------------------------------------------------------------------ idle-after-burst */

static int run_idle_after_burst(void)
{
    int n = O.count > 0 ? O.count : 100;
    pump *v = calloc((size_t)n, sizeof *v);
    if (!v)
        die("calloc");
    long rss0 = rss_kib();
    for (int i = 0; i < n; i++)
        if ((v[i].fd = dial(0, 0)) < 0)
            die("connect");
    int saved_packet = O.packet;
    O.packet = 4;
    uint64_t t0 = now_ns(), total = (uint64_t)O.packets * 4u;
    int full = pumps_run(v, n, total, t0 + (uint64_t)(O.duration * 1e9));
    O.packet = saved_packet;
    double burst_s = (double)(now_ns() - t0) / 1e9;
    long rss_busy = rss_kib();
    int cut = 0;
    for (int i = 0; i < n; i++)
        cut += v[i].eof;
    usleep((useconds_t)O.idle_ms * 1000u);
    long rss_idle = rss_kib();
    printf("RESULT scenario=idle-after-burst sessions=%d packets_each=%ld served_full=%d cut=%d burst_s=%.2f "
           "rss_before_kib=%ld rss_after_burst_kib=%ld rss_idle_kib=%ld idle_growth_kib=%ld "
           "per_session_kib=%.1f\n",
           n, O.packets, full, cut, burst_s, rss0, rss_busy, rss_idle, rss_idle - rss0,
           (double)(rss_idle - rss0) / n);
    for (int i = 0; i < n; i++)
        close(v[i].fd);
    free(v);
    check_max("idle rss growth MiB", (double)(rss_idle - rss0) / 1024.0, O.max_rss_mib);
    check_max("sessions cut", cut, (double)O.max_cut);
    return 0;
}

/* ------------------------------------------------------------------ churn */

static int run_churn(void)
{
    int total = O.count > 0 ? O.count : 12000;
    int round = O.round;
    pump *v = calloc((size_t)round, sizeof *v);
    if (!v)
        die("calloc");
    long rss0 = rss_kib(), rss_max = rss0;
    uint64_t t0 = now_ns(), end = t0 + (uint64_t)(O.duration * 1e9);
    int done = 0, full = 0, cut = 0, rounds = 0, failed_connects = 0;
    uint32_t spread = 1;
    while (done < total && now_ns() < end) {
        int k = total - done < round ? total - done : round;
        int opened = 0;
        for (int i = 0; i < k; i++) {
            v[opened] = (pump){ .fd = dial(0, spread++) };
            if (v[opened].fd >= 0)
                opened++;
            else
                failed_connects++;
        }
        full += pumps_run(v, opened, (uint64_t)O.burst, end);
        for (int i = 0; i < opened; i++) {
            cut += v[i].eof && v[i].got < (uint64_t)O.burst;
            close(v[i].fd);
        }
        done += k;
        if (++rounds % 20 == 0) {
            long r = rss_kib();
            if (r > rss_max)
                rss_max = r;
        }
    }
    double el = (double)(now_ns() - t0) / 1e9;
    usleep((useconds_t)O.idle_ms * 1000u);
    long rss_after = rss_kib();
    printf("RESULT scenario=churn connections=%d of=%d round=%d burst_bytes=%ld served_full=%d cut=%d "
           "connect_failed=%d elapsed_s=%.2f rss_before_kib=%ld rss_max_kib=%ld rss_after_kib=%ld\n",
           done, total, round, O.burst, full, cut, failed_connects, el, rss0, rss_max, rss_after);
    free(v);
    check_max("rss after churn MiB", (double)rss_after / 1024.0, O.max_rss_mib);
    check_max("connections cut", cut, (double)O.max_cut);
    return 0;
}

/* ------------------------------------------------------------------ storms */

/* Runs fn in O.procs processes until `end`; each writes its count into a
 * pipe. Returns the sum. */
static uint64_t storm(uint64_t (*fn)(int idx, uint64_t end), uint64_t end)
{
    int pfd[2];
    if (pipe(pfd) != 0)
        die("pipe");
    pid_t *kids = calloc((size_t)O.procs, sizeof *kids);
    for (int i = 0; i < O.procs; i++) {
        pid_t pid = fork();
        if (pid < 0)
            die("fork");
        if (pid == 0) {
            close(pfd[0]);
            uint64_t c = fn(i, end);
            if (write(pfd[1], &c, sizeof c) != (ssize_t)sizeof c)
                _exit(1);
            _exit(0);
        }
        kids[i] = pid;
    }
    close(pfd[1]);
    uint64_t sum = 0, c;
    while (read(pfd[0], &c, sizeof c) == (ssize_t)sizeof c)
        sum += c;
    close(pfd[0]);
    for (int i = 0; i < O.procs; i++)
        waitpid(kids[i], NULL, 0);
    free(kids);
    return sum;
}

static uint64_t rst_loop(int idx, uint64_t end)
{
    uint64_t n = 0;
    uint32_t spread = (uint32_t)idx * 10007u + 1;
    while (now_ns() < end) {
        int fd = dial(0, spread++);
        if (fd < 0)
            continue;
        close_rst(fd);
        n++;
    }
    return n;
}

static uint64_t connect_loop(int idx, uint64_t end)
{
    uint64_t n = 0, t0 = now_ns();
    double per_ns = O.rate / O.procs / 1e9;
    uint32_t spread = (uint32_t)idx * 10007u + 1;
    uint8_t pkt[8];
    fill_packets(pkt, sizeof pkt, 8, DATA_ID);
    while (now_ns() < end) {
        uint64_t now = now_ns();
        double due = (double)(now - t0) * per_ns;
        if ((double)n >= due) { /* ahead of schedule */
            sleep_ns((uint64_t)(((double)n + 1 - due) / per_ns));
            continue;
        }
        int fd = dial(0, spread++);
        if (fd < 0)
            continue;
        (void)send(fd, pkt, sizeof pkt, MSG_NOSIGNAL);
        close(fd);
        n++;
    }
    return n;
}

static int run_storm(bool rst)
{
    if (nb_start(O.neighbours, O.probe_ms ? O.probe_ms : 10, O.duration) != 0)
        return 1;
    uint64_t t0 = now_ns(), end = t0 + (uint64_t)(O.duration * 1e9);
    uint64_t n = storm(rst ? rst_loop : connect_loop, end);
    double el = (double)(now_ns() - t0) / 1e9;
    nb_report r = nb_finish();
    printf("RESULT scenario=%s procs=%d connections=%llu per_s=%.0f", O.scenario, O.procs,
           (unsigned long long)n, (double)n / el);
    print_nb(&r);
    printf("\n");
    check_nb(&r);
    return 0;
}

/* ------------------------------------------------------------------ main */

static void usage(FILE *out)
{
    fprintf(out,
            "usage: %s SCENARIO --port P [options]\n"
            "scenarios (server mode in brackets):\n"
            "  chat-flood        [chat] 1 flooder sends 64 B packets as fast as it can; N neighbours\n"
            "                    probe every 100 ms through the room\n"
            "  burst             [echo|packet] K times: a fresh connection writes --burst bytes of\n"
            "                    --packet B packets while reading every reply\n"
            "  pin               [packet] 2 never-readers send a 4 B packet per ms each while 2 readers\n"
            "                    echo ~40 MB/s of 4000 B packets; server RSS every second\n"
            "  tiny              [packet] --count N (100) never-readers send 4 B packets, --batch (256)\n"
            "                    per send(); RSS vs N x --send-queue-limit\n"
            "  idle-after-burst  [packet] --count N (100) sessions each get --packets (250000)\n"
            "                    4 B packets' replies, read them all, sit idle; RSS per session\n"
            "  churn             [echo] --count (12000) connections in rounds of --round (50), each\n"
            "                    writing a --burst and reading the replies; RSS after they left\n"
            "  rst-storm         [echo] --procs processes connect and reset; neighbours probe / 10 ms\n"
            "  connect-storm     [echo] --rate connects/s (open, one packet, close); neighbours probe\n"
            "options:\n"
            "  --host H (127.0.0.1)  --port P  --duration SEC (10)  --server-pid PID (for RSS)\n"
            "  --neighbours N (20)  --probe-ms MS  --count N  --round N (50)  --burst BYTES (2097152)\n"
            "  --packet B (1024)  --packets N (250000)  --batch N (256)  --procs N (4)  --rate R (10000)\n"
            "  --send-queue-limit BYTES (1048576, the server's, for tiny's report)  --idle-ms MS (3000)\n"
            "thresholds (exit 1 when broken): --max-p99-ms MS  --max-cut N  --min-served N  --max-rss-mib M\n"
            "  (--max-rss-mib: pin/tiny: RSS growth; idle-after-burst: idle growth; churn: RSS after)\n",
            prog);
}

static double num_arg(const char *opt, const char *val, double lo, double hi)
{
    char *end;
    errno = 0;
    double v = strtod(val, &end);
    if (errno || end == val || *end || v < lo || v > hi) {
        fprintf(stderr, "%s: bad %s '%s' (%g..%g)\n", prog, opt, val, lo, hi);
        usage(stderr);
        /* NOLINTNEXTLINE(concurrency-mt-unsafe): option parsing, before any other thread starts */
        exit(2);
    }
    return v;
}

static void parse_args(int argc, char **argv)
{
    if (argc < 2 || argv[1][0] == '-') {
        bool help = argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"));
        usage(help ? stdout : stderr);
        /* NOLINTNEXTLINE(concurrency-mt-unsafe): option parsing, before any other thread starts */
        exit(help ? 0 : 2);
    }
    O.scenario = argv[1];
    for (int i = 2; i < argc; i++) {
        const char *o = argv[i];
        if (i + 1 >= argc) {
            fprintf(stderr, "%s: option %s needs a value\n", prog, o);
            usage(stderr);
            /* NOLINTNEXTLINE(concurrency-mt-unsafe): option parsing, before any other thread starts */
            exit(2);
        }
        const char *v = argv[++i];
        if (!strcmp(o, "--host"))
            O.host = v;
        else if (!strcmp(o, "--port"))
            O.port = (int)num_arg(o, v, 1, 65535);
        else if (!strcmp(o, "--duration"))
            O.duration = num_arg(o, v, 0.1, 3600);
        else if (!strcmp(o, "--server-pid"))
            O.server_pid = (pid_t)num_arg(o, v, 1, 1e9);
        else if (!strcmp(o, "--neighbours"))
            O.neighbours = (int)num_arg(o, v, 1, 1000);
        else if (!strcmp(o, "--probe-ms"))
            O.probe_ms = (int)num_arg(o, v, 1, 10000);
        else if (!strcmp(o, "--count"))
            O.count = (int)num_arg(o, v, 1, 1e7);
        else if (!strcmp(o, "--round"))
            O.round = (int)num_arg(o, v, 1, 5000);
        else if (!strcmp(o, "--burst"))
            O.burst = (long)num_arg(o, v, 4, 1e10);
        else if (!strcmp(o, "--packet"))
            O.packet = (int)num_arg(o, v, 4, 65535);
        else if (!strcmp(o, "--packets"))
            O.packets = (long)num_arg(o, v, 1, 1e9);
        else if (!strcmp(o, "--batch"))
            O.batch = (int)num_arg(o, v, 1, 1024);
        else if (!strcmp(o, "--procs"))
            O.procs = (int)num_arg(o, v, 1, 64);
        else if (!strcmp(o, "--rate"))
            O.rate = num_arg(o, v, 1, 1e6);
        else if (!strcmp(o, "--send-queue-limit"))
            O.send_queue_limit = (long)num_arg(o, v, 1, 1e12);
        else if (!strcmp(o, "--idle-ms"))
            O.idle_ms = (int)num_arg(o, v, 0, 600000);
        else if (!strcmp(o, "--max-p99-ms"))
            O.max_p99_ms = num_arg(o, v, 0, 1e9);
        else if (!strcmp(o, "--max-cut"))
            O.max_cut = (long)num_arg(o, v, 0, 1e9);
        else if (!strcmp(o, "--min-served"))
            O.min_served = (long)num_arg(o, v, 0, 1e9);
        else if (!strcmp(o, "--max-rss-mib"))
            O.max_rss_mib = num_arg(o, v, 0, 1e9);
        else {
            fprintf(stderr, "%s: unknown option '%s'\n", prog, o);
            usage(stderr);
            /* NOLINTNEXTLINE(concurrency-mt-unsafe): option parsing, before any other thread starts */
            exit(2);
        }
    }
    if (O.port < 0) {
        fprintf(stderr, "%s: --port is required\n", prog);
        usage(stderr);
        /* NOLINTNEXTLINE(concurrency-mt-unsafe): option parsing, before any other thread starts */
        exit(2);
    }
    if (O.max_rss_mib >= 0 && O.server_pid <= 0) {
        fprintf(stderr, "%s: --max-rss-mib needs --server-pid\n", prog);
        /* NOLINTNEXTLINE(concurrency-mt-unsafe): option parsing, before any other thread starts */
        exit(2);
    }
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        (void)setrlimit(RLIMIT_NOFILE, &rl);
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    int rc;
    const char *s = O.scenario;
    if (!strcmp(s, "chat-flood"))
        rc = run_chat_flood();
    else if (!strcmp(s, "burst"))
        rc = run_burst();
    else if (!strcmp(s, "pin"))
        rc = run_pin();
    else if (!strcmp(s, "tiny"))
        rc = run_tiny();
    else if (!strcmp(s, "idle-after-burst"))
        rc = run_idle_after_burst();
    else if (!strcmp(s, "churn"))
        rc = run_churn();
    else if (!strcmp(s, "rst-storm"))
        rc = run_storm(true);
    else if (!strcmp(s, "connect-storm"))
        rc = run_storm(false);
    else {
        fprintf(stderr, "%s: unknown scenario '%s'\n", prog, s);
        usage(stderr);
        return 2;
    }
    return rc ? rc : failed ? 1 : 0;
}
