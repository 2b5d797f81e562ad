/* SPDX-License-Identifier: MIT */
/* Shared test helpers; see helpers.h for the rules they follow. */
#include "helpers.h"
#include "sys.h" /* the library's own error mapping (Windows) */

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef _WIN32
#  include <malloc.h>
#  include <windows.h>
#  include <mmsystem.h>
#  include <psapi.h>
#  include <winternl.h>
#else
#  include <dirent.h>
#  include <malloc.h>
#  include <poll.h>
#  include <sys/resource.h>
#  include <sys/time.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#  define CPT_ASAN 1
#elif defined(__has_feature)
#  if __has_feature(address_sanitizer)
#    define CPT_ASAN 1
#  endif
#endif
#ifdef CPT_ASAN
#  include <sanitizer/lsan_interface.h>
/* No suppressions here: an LSan "leak:" pattern matches any frame of the
 * allocation's stack, and every test runs under Criterion's frames, so a
 * pattern naming the framework would hide every leak.
 * The leak verdict comes from cpt_leak_end() at the end of each test; the
 * check at exit is off because a test that failed an assertion skipped its
 * clean-up, and reporting that as a leak would only be noise. */
const char *__asan_default_options(void);
const char *__asan_default_options(void) { return "leak_check_at_exit=0"; }
const char *__lsan_default_options(void);
const char *__lsan_default_options(void) { return "print_suppressions=0"; }
#endif

/* ------------------------------------------------------------------ time */

#ifdef _WIN32

static LARGE_INTEGER g_qpf;

/* Before main, in every test process: Winsock, and a 1 ms timer resolution
 * (so that Sleep(1) sleeps about 1 ms on Windows too). */
__attribute__((constructor)) static void cpt_win_init(void)
{
    WSADATA wsa;
    if (WSAStartup(MAKEWORD(2, 2), &wsa) != 0) {
        fprintf(stderr, "helpers: WSAStartup failed\n");
        abort();
    }
    QueryPerformanceFrequency(&g_qpf);
    timeBeginPeriod(1);
}

uint64_t cpt_now_ns(void)
{
    LARGE_INTEGER c;
    QueryPerformanceCounter(&c);
    uint64_t f = (uint64_t)g_qpf.QuadPart;
    uint64_t t = (uint64_t)c.QuadPart;
    return t / f * 1000000000u + t % f * 1000000000u / f;
}

uint64_t cpt_now_ms(void) { return cpt_now_ns() / 1000000u; }

/* Sleep() counts whole milliseconds; shorter waits yield in a loop. */
void cpt_sleep_us(unsigned us)
{
    if (us >= 1000) {
        Sleep((us + 999) / 1000);
        return;
    }
    uint64_t until = cpt_now_ns() + (uint64_t)us * 1000u;
    while (cpt_now_ns() < until)
        SwitchToThread();
}

void cpt_sleep_ms(unsigned ms) { Sleep(ms); }

uint64_t cpt_process_cpu_ns(void)
{
    FILETIME c, e, k, u;
    if (!GetProcessTimes(GetCurrentProcess(), &c, &e, &k, &u))
        return 0;
    uint64_t kt = (uint64_t)k.dwHighDateTime << 32 | k.dwLowDateTime;
    uint64_t ut = (uint64_t)u.dwHighDateTime << 32 | u.dwLowDateTime;
    return (kt + ut) * 100u; /* 100 ns units */
}

int cpt_thread_id(void) { return (int)GetCurrentThreadId(); }

/* Windows does not say; a caller then judges every window. */
uint64_t cpt_thread_kept_off_ns(int tid)
{
    (void)tid;
    return 0;
}

#else

uint64_t cpt_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t cpt_now_ms(void) { return cpt_now_ns() / 1000000u; }

void cpt_sleep_us(unsigned us)
{
    struct timespec ts = { .tv_sec = us / 1000000u, .tv_nsec = (long)(us % 1000000u) * 1000 };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

void cpt_sleep_ms(unsigned ms) { cpt_sleep_us(ms * 1000u); }

uint64_t cpt_process_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int cpt_thread_id(void) { return (int)gettid(); }

/* The thread's run-queue wait from its schedstat, plus the machine's steal
 * time averaged over its CPUs (a hypervisor stops every thread alike). */
uint64_t cpt_thread_kept_off_ns(int tid)
{
    uint64_t kept = 0;
    char path[64];
    snprintf(path, sizeof path, "/proc/self/task/%d/schedstat", tid);
    FILE *f = fopen(path, "r");
    if (f) {
        unsigned long long on_cpu, waited;
        if (fscanf(f, "%llu %llu", &on_cpu, &waited) == 2)
            kept += waited;
        fclose(f);
    }
    f = fopen("/proc/stat", "r");
    if (f) {
        unsigned long long v[8];
        if (fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                   &v[6], &v[7]) == 8) {
            long hz = sysconf(_SC_CLK_TCK), cpus = sysconf(_SC_NPROCESSORS_ONLN);
            if (hz > 0 && cpus > 0)
                kept += v[7] * (1000000000u / (uint64_t)hz) / (uint64_t)cpus;
        }
        fclose(f);
    }
    return kept;
}

#endif

uint64_t cpt_sleep_watching(unsigned ms, const int *tids, int n)
{
    uint64_t before[8], worst = 0;
    n = n < 8 ? n : 8;
    for (int i = 0; i < n; i++)
        before[i] = cpt_thread_kept_off_ns(tids[i]);
    cpt_sleep_ms(ms);
    for (int i = 0; i < n; i++) {
        uint64_t k = cpt_thread_kept_off_ns(tids[i]) - before[i];
        worst = k > worst ? k : worst;
    }
    return worst;
}

/* ------------------------------------------------------------------ port and services */

cp_backend cpt_env_backend(void)
{
    const char *e = getenv("CP_BACKEND");
    if (!e || !*e)
        return CP_BACKEND_AUTO;
    if (!strcmp(e, "epoll"))
        return CP_BACKEND_EPOLL;
    if (!strcmp(e, "uring") || !strcmp(e, "io_uring"))
        return CP_BACKEND_URING;
    if (!strcmp(e, "iocp"))
        return CP_BACKEND_IOCP;
    return CP_BACKEND_AUTO;
}

cp_port *cpt_xport(int workers) { return cpt_xport_opts(&(cp_port_opts){ .workers = workers }); }

cp_port *cpt_xport_opts(const cp_port_opts *opts)
{
    cp_port *port = NULL;
    cp_port_opts o = *opts;
    o.backend = cpt_env_backend();
    int workers = o.workers;
    int rc = cp_port_create(&port, &o);
    if (rc == -ENOTSUP && o.backend != CP_BACKEND_EPOLL && o.backend != CP_BACKEND_AUTO)
        cr_skip_test("backend %s not available here", getenv("CP_BACKEND"));
    cr_assert_eq(rc, 0, "cp_port_create: %d (%s)", rc, cp_strerror(rc));
    cr_assert_not_null(port);
    const char *e = getenv("CP_BACKEND");
    const char *name = cp_port_backend_name(port);
    cr_assert_not_null(name);
    if (e && *e)
        cr_assert(strstr(name, e) != NULL, "CP_BACKEND=%s but the port uses %s", e, name);
    if (workers > 0)
        cr_assert_eq(cp_port_workers(port), workers);
    return port;
}

void cpt_xport_destroy(cp_port *port)
{
    int rc = cp_port_destroy(port);
    cr_assert_eq(rc, 0, "cp_port_destroy: %d (%s)", rc, cp_strerror(rc));
}

cp_service *cpt_xserver(cp_port *port, const cp_server_opts *opts, const cp_handlers *h, void *ctx)
{
    cp_server_opts o;
    if (opts)
        o = *opts;
    else
        memset(&o, 0, sizeof o);
    if (!o.host)
        o.host = CPT_HOST4;
    cp_service *svc = NULL;
    int rc = cp_server_start(&svc, port, &o, h, ctx);
    cr_assert_eq(rc, 0, "cp_server_start(%s): %d (%s)", o.host, rc, cp_strerror(rc));
    cr_assert_not_null(svc);
    cr_assert_neq(cp_service_listen_port(svc), 0, "cp_service_listen_port() is 0 after start");
    cr_assert_eq(cp_service_ctx(svc), ctx);
    cr_assert_eq(cp_service_get_port(svc), port);
    return svc;
}

cp_service *cpt_xclient(cp_port *port, const cp_client_opts *opts, const cp_handlers *h, void *ctx)
{
    cp_service *svc = NULL;
    int rc = cp_client_start(&svc, port, opts, h, ctx);
    cr_assert_eq(rc, 0, "cp_client_start: %d (%s)", rc, cp_strerror(rc));
    cr_assert_not_null(svc);
    return svc;
}

void cpt_xstop(cp_service *svc)
{
    int rc = cp_service_stop(svc);
    cr_assert_eq(rc, 0, "cp_service_stop: %d (%s)", rc, cp_strerror(rc));
}

static void mark_ran(void *flag) { atomic_store((atomic_int *)flag, 1); }

void cpt_xjobq_drained(cp_jobq *q)
{
    /* On the heap: a test that fails here returns while the job may still run. */
    atomic_int *ran = calloc(1, sizeof *ran);
    cr_assert_not_null(ran);
    cr_assert_eq(cp_jobq_push(q, mark_ran, ran), 0, "the marker job was refused");
    CPT_AWAIT(atomic_load(ran), 5000, "the job queue did not reach the marker job");
    free(ran);
}

cp_service_stats cpt_stats(const cp_service *svc)
{
    cp_service_stats st;
    memset(&st, 0, sizeof st);
    cp_service_stats_get(svc, &st);
    return st;
}

void cpt_xbytes_in(const cp_service *svc, uint64_t n)
{
    uint64_t deadline = cpt_now_ms() + 5000;
    uint64_t got;
    while ((got = cpt_stats(svc).bytes_in) < n && cpt_now_ms() < deadline)
        cpt_sleep_us(50);
    cr_assert_geq(got, n, "the server read %llu of the %llu bytes sent to it", (unsigned long long)got,
                  (unsigned long long)n);
}

void cpt_xwrites_stalled(const cp_service *svc)
{
    uint64_t deadline = cpt_now_ms() + 5000;
    uint64_t last = 0, since = cpt_now_ms();
    for (;;) {
        uint64_t out = cpt_stats(svc).bytes_out, now = cpt_now_ms();
        if (out != last) {
            last = out;
            since = now;
        } else if (out > 0 && now - since >= 20) {
            return;
        }
        cr_assert_lt(now, deadline, "the server's writes did not stall (%llu bytes written)",
                     (unsigned long long)out);
        cpt_sleep_ms(1);
    }
}

/* ------------------------------------------------------------------ session tracking */

cpt_track *cpt_track_new(int cap)
{
    cpt_track *t = calloc(1, sizeof *t);
    cr_assert_not_null(t);
    t->cap = cap;
    t->recs = calloc((size_t)cap, sizeof *t->recs);
    cr_assert_not_null(t->recs);
    return t;
}

void cpt_track_free(cpt_track *t)
{
    if (!t)
        return;
    int n = atomic_load(&t->nrec);
    if (n > t->cap)
        n = t->cap;
    if (t->keep_refs) {
        for (int i = 0; i < n; i++)
            if (t->recs[i].s)
                cp_session_unref(t->recs[i].s);
    }
    free(t->recs);
    free(t);
}

void cpt_track_stopped(cpt_track *t) { atomic_store(&t->stopped, true); }

void cpt_track_xcheck(cpt_track *t)
{
    cpt_sleep_ms(20); /* a sleep: a late callback, which the checks below count, would show in this window */
    cr_expect_eq(atomic_load(&t->overlaps), 0, "callbacks of one session overlapped %d times",
                 atomic_load(&t->overlaps));
    cr_expect_eq(atomic_load(&t->nested), 0,
                 "%d times a callback of a session ran nested inside another callback of the same session "
                 "(re-entrant, e.g. on_disconnected from inside cp_session_disconnect)",
                 atomic_load(&t->nested));
    cr_expect_eq(atomic_load(&t->after_stop), 0, "%d callbacks ran after cp_service_stop returned",
                 atomic_load(&t->after_stop));
    cr_expect_eq(atomic_load(&t->after_disc), 0, "%d callbacks ran after a session's on_disconnected",
                 atomic_load(&t->after_disc));
    cr_expect_eq(atomic_load(&t->failures), 0, "%d contract violations inside callbacks",
                 atomic_load(&t->failures));
    int n = atomic_load(&t->nrec);
    cr_assert_leq(n, t->cap, "more sessions than the test expected (%d > %d)", n, t->cap);
    int bad = 0, first = -1;
    for (int i = 0; i < n; i++) {
        if (atomic_load(&t->recs[i].connected) != 1 || atomic_load(&t->recs[i].disconnected) != 1) {
            if (first < 0)
                first = i;
            bad++;
        }
    }
    cr_assert_eq(bad, 0, "%d of %d sessions not connected once + disconnected once (first: #%d: %d/%d)", bad,
                 n, first, first >= 0 ? atomic_load(&t->recs[first].connected) : 0,
                 first >= 0 ? atomic_load(&t->recs[first].disconnected) : 0);
    cr_assert_eq(atomic_load(&t->connected), atomic_load(&t->disconnected),
                 "on_connected %d times but on_disconnected %d times", atomic_load(&t->connected),
                 atomic_load(&t->disconnected));
}

cpt_srec *cpt_rec(cp_session *s) { return (cpt_srec *)cp_session_data(s); }

static bool settled(const cp_service *svc, cpt_track *t)
{
    cp_service_stats st = cpt_stats(svc);
    uint64_t c = (uint64_t)atomic_load(&t->connected), d = (uint64_t)atomic_load(&t->disconnected);
    return st.connected == c && st.disconnected == d && st.sessions == c - d &&
           st.connect_failed == (uint64_t)atomic_load(&t->connect_failed);
}

void cpt_xsettle(const cp_service *svc, cpt_track *t)
{
    CPT_AWAIT(settled(svc, t), 2000,
              "stats disagree with callbacks: stats connected %llu disconnected %llu sessions %llu "
              "connect_failed %llu; callbacks connected %d disconnected %d connect_failed %d",
              (unsigned long long)cpt_stats(svc).connected, (unsigned long long)cpt_stats(svc).disconnected,
              (unsigned long long)cpt_stats(svc).sessions, (unsigned long long)cpt_stats(svc).connect_failed,
              atomic_load(&t->connected), atomic_load(&t->disconnected), atomic_load(&t->connect_failed));
}

cpt_srec *cpt_track_by_peer(cpt_track *t, uint16_t peer_port)
{
    int n = atomic_load(&t->nrec);
    if (n > t->cap)
        n = t->cap;
    for (int i = 0; i < n; i++)
        if (atomic_load(&t->recs[i].peer_port) == peer_port)
            return &t->recs[i];
    return NULL;
}

void cpt_enter(cp_session *s)
{
    cpt_track *t = cp_session_ctx(s);
    cpt_srec *r = cpt_rec(s);
    if (t && atomic_load(&t->stopped))
        atomic_fetch_add(&t->after_stop, 1);
    if (!r)
        return;
    if (atomic_load(&r->disconnected) > 0)
        atomic_fetch_add(&t->after_disc, 1);
    int me = cpt_thread_id();
    int prev = atomic_exchange(&r->inside, me);
    if (prev == me)
        atomic_fetch_add(&t->nested, 1);
    else if (prev != 0)
        atomic_fetch_add(&t->overlaps, 1);
    if (t && t->hold_us)
        cpt_sleep_us(t->hold_us);
}

void cpt_leave(cp_session *s)
{
    cpt_srec *r = cpt_rec(s);
    if (r)
        atomic_store(&r->inside, 0);
}

static uint16_t parse_peer_port(cp_session *s)
{
    char buf[96];
    int n = cp_session_peer(s, buf, sizeof buf);
    if (n <= 0 || (size_t)n >= sizeof buf)
        return 0;
    const char *colon = strrchr(buf, ':');
    if (!colon)
        return 0;
    return (uint16_t)atoi(colon + 1);
}

void cpt_on_connected(cp_session *s)
{
    cpt_track *t = cp_session_ctx(s);
    int i = atomic_fetch_add(&t->nrec, 1);
    if (i >= t->cap) {
        atomic_fetch_add(&t->failures, 1);
        atomic_fetch_add(&t->connected, 1);
        return;
    }
    cpt_srec *r = &t->recs[i];
    if (t->keep_refs)
        cp_session_ref(s);
    r->s = s;
    r->id = cp_session_id(s);
    atomic_store(&r->peer_port, parse_peer_port(s));
    cp_session_set_data(s, r);
    cpt_enter(s);
    if (atomic_fetch_add(&r->connected, 1) != 0)
        atomic_fetch_add(&t->failures, 1);
    /* cp_session_connected() may already say 0 here: a disconnect requested
     * by another thread (a stopping service, say) is visible at once, also
     * while on_connected runs. What must hold is that the session is not
     * finished: its service is still there. */
    if (cp_session_service(s) == NULL)
        atomic_fetch_add(&t->failures, 1);
    cpt_leave(s);
    atomic_fetch_add(&t->connected, 1);
}

void cpt_on_disconnected(cp_session *s, cp_reason reason, int err)
{
    cpt_track *t = cp_session_ctx(s);
    cpt_srec *r = cpt_rec(s);
    if (!r) {
        atomic_fetch_add(&t->failures, 1);
        atomic_fetch_add(&t->disconnected, 1);
        return;
    }
    cpt_enter(s);
    atomic_store(&r->reason, (int)reason);
    atomic_store(&r->err, err);
    if ((int)reason <= CP_REASON_NONE || (int)reason >= CP_REASON_COUNT_)
        atomic_fetch_add(&t->failures, 1);
    else
        atomic_fetch_add(&t->reasons[reason], 1);
    if (reason == CP_REASON_IO_ERROR && err >= 0)
        atomic_fetch_add(&t->failures, 1);
    /* The session is disconnecting: it refuses sends and says so. */
    if (cp_session_connected(s) != 0)
        atomic_fetch_add(&t->failures, 1);
    if (cp_session_send_copy(s, "x", 1) != -ENOTCONN)
        atomic_fetch_add(&t->failures, 1);
    if (r->id != cp_session_id(s))
        atomic_fetch_add(&t->failures, 1);
    cpt_leave(s);
    if (atomic_fetch_add(&r->disconnected, 1) != 0)
        atomic_fetch_add(&t->failures, 1);
    atomic_fetch_add(&t->disconnected, 1);
}

void cpt_on_connect_failed(cp_service *svc, int err)
{
    cpt_track *t = cp_service_ctx(svc);
    if (atomic_load(&t->stopped))
        atomic_fetch_add(&t->after_stop, 1);
    if (err >= 0)
        atomic_fetch_add(&t->failures, 1);
    atomic_store(&t->last_connect_err, err);
    atomic_fetch_add(&t->connect_failed, 1);
}

void cpt_on_sent(cp_session *s, size_t bytes)
{
    cpt_track *t = cp_session_ctx(s);
    cpt_enter(s);
    cpt_srec *r = cpt_rec(s);
    if (r)
        atomic_fetch_add(&r->sent, (long long)bytes);
    atomic_fetch_add(&t->bytes_sent, (long long)bytes);
    cpt_leave(s);
}

int cpt_on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    cpt_track *t = cp_session_ctx(s);
    cpt_enter(s);
    cpt_srec *r = cpt_rec(s);
    if (r) {
        atomic_fetch_add(&r->packets, 1);
        atomic_fetch_add(&r->bytes, (long long)len);
    }
    atomic_fetch_add(&t->packets, 1);
    atomic_fetch_add(&t->bytes_in, (long long)len);
    if (t->echo) {
        cp_sendbuf *b = cp_packet_make(id, body, len);
        if (!b) {
            atomic_fetch_add(&t->failures, 1);
        } else {
            int rc = cp_session_send(s, b);
            if (rc != 0 && rc != -ENOTCONN)
                atomic_fetch_add(&t->failures, 1);
            cp_sendbuf_unref(b);
        }
    }
    cpt_leave(s);
    return 0;
}

size_t cpt_on_recv(cp_session *s, const uint8_t *data, size_t len)
{
    cpt_track *t = cp_session_ctx(s);
    cpt_enter(s);
    cpt_srec *r = cpt_rec(s);
    if (r)
        atomic_fetch_add(&r->bytes, (long long)len);
    atomic_fetch_add(&t->bytes_in, (long long)len);
    if (t->echo) {
        int rc = cp_session_send_copy(s, data, len);
        if (rc != 0 && rc != -ENOTCONN)
            atomic_fetch_add(&t->failures, 1);
    }
    cpt_leave(s);
    return len;
}

cp_handlers cpt_track_handlers(void)
{
    cp_handlers h = {
        .on_connected = cpt_on_connected,
        .on_connect_failed = cpt_on_connect_failed,
        .on_packet = cpt_on_packet,
        .on_sent = cpt_on_sent,
        .on_disconnected = cpt_on_disconnected,
    };
    return h;
}

/* ------------------------------------------------------------------ raw sockets */

#ifdef _WIN32

/* Test sockets report errors as the library does: its own mapping. */
static int map_wsa(int code) { return cp__win_errno((unsigned long)code); }

int cpt_sock_errno(void) { return map_wsa(WSAGetLastError()); }

/* The error of a receive: a receive timeout (WSAETIMEDOUT on Windows) is
 * -EAGAIN, as SO_RCVTIMEO's EAGAIN on POSIX. */
static int recv_err(void)
{
    int e = WSAGetLastError();
    return e == WSAETIMEDOUT || e == WSAEWOULDBLOCK ? -EAGAIN : -map_wsa(e);
}

int cpt_socket(int family)
{
    SOCKET s = WSASocketW(family, SOCK_STREAM, IPPROTO_TCP, NULL, 0,
                          WSA_FLAG_OVERLAPPED | WSA_FLAG_NO_HANDLE_INHERIT);
    return s == INVALID_SOCKET ? -cpt_sock_errno() : (int)s;
}

void cpt_close(int fd) { closesocket((SOCKET)fd); }

int cpt_setsockopt_int(int fd, int level, int name, int value)
{
    DWORD v = (DWORD)value;
    return setsockopt((SOCKET)fd, level, name, (const char *)&v, sizeof v) == 0 ? 0 : -cpt_sock_errno();
}

int cpt_getsockopt_int(int fd, int level, int name, int *value)
{
    /* Some options (TCP_NODELAY) are returned as one byte on Windows. */
    DWORD v = 0;
    int len = sizeof v;
    if (getsockopt((SOCKET)fd, level, name, (char *)&v, &len) != 0)
        return -cpt_sock_errno();
    *value = len == 1 ? (int)(v & 0xff) : (int)v;
    return 0;
}

static int set_timeo(int fd, int opt, unsigned ms)
{
    DWORD v = ms;
    return setsockopt((SOCKET)fd, SOL_SOCKET, opt, (const char *)&v, sizeof v) == 0 ? 0 : -cpt_sock_errno();
}

int cpt_poll_in(int fd, int timeout_ms)
{
    WSAPOLLFD p = { .fd = (SOCKET)fd, .events = POLLRDNORM };
    int r = WSAPoll(&p, 1, timeout_ms);
    return r < 0 ? -cpt_sock_errno() : r > 0;
}

static ssize_t sock_send(int fd, const void *p, size_t n)
{
    int chunk = n > (size_t)INT_MAX ? INT_MAX : (int)n;
    int w = send((SOCKET)fd, p, chunk, 0);
    return w == SOCKET_ERROR ? -cpt_sock_errno() : w;
}

static ssize_t sock_recv(int fd, void *p, size_t n, int flags)
{
    int chunk = n > (size_t)INT_MAX ? INT_MAX : (int)n;
    int r = recv((SOCKET)fd, p, chunk, flags);
    return r == SOCKET_ERROR ? recv_err() : r;
}

int cpt_accept(int lfd)
{
    SOCKET s = accept((SOCKET)lfd, NULL, NULL);
    if (s == INVALID_SOCKET)
        return -1;
    SetHandleInformation((HANDLE)s, HANDLE_FLAG_INHERIT, 0);
    return (int)s;
}

int cpt_ncpu(void)
{
    DWORD_PTR proc = 0, sys = 0;
    if (GetProcessAffinityMask(GetCurrentProcess(), &proc, &sys) && proc) {
        int n = 0;
        for (; proc; proc &= proc - 1)
            n++;
        return n;
    }
    SYSTEM_INFO si;
    GetSystemInfo(&si);
    return (int)si.dwNumberOfProcessors;
}

int cpt_under_wine(void)
{
    HMODULE nt = GetModuleHandleA("ntdll.dll");
    return nt && GetProcAddress(nt, "wine_get_version") ? 1 : 0;
}

#else /* POSIX */

int cpt_sock_errno(void) { return errno; }

static int recv_err(void) { return errno == EWOULDBLOCK ? -EAGAIN : -errno; }

int cpt_socket(int family)
{
    int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    return fd < 0 ? -errno : fd;
}

void cpt_close(int fd) { close(fd); }

int cpt_setsockopt_int(int fd, int level, int name, int value)
{
    return setsockopt(fd, level, name, &value, sizeof value) == 0 ? 0 : -errno;
}

int cpt_getsockopt_int(int fd, int level, int name, int *value)
{
    socklen_t len = sizeof *value;
    return getsockopt(fd, level, name, value, &len) == 0 ? 0 : -errno;
}

static int set_timeo(int fd, int opt, unsigned ms)
{
    struct timeval tv = { .tv_sec = ms / 1000u, .tv_usec = (suseconds_t)(ms % 1000u) * 1000 };
    return setsockopt(fd, SOL_SOCKET, opt, &tv, sizeof tv) == 0 ? 0 : -errno;
}

int cpt_poll_in(int fd, int timeout_ms)
{
    struct pollfd p = { .fd = fd, .events = POLLIN };
    int r;
    while ((r = poll(&p, 1, timeout_ms)) < 0 && errno == EINTR) {
    }
    return r < 0 ? -errno : r > 0;
}

static ssize_t sock_send(int fd, const void *p, size_t n)
{
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    return w < 0 ? -errno : w;
}

static ssize_t sock_recv(int fd, void *p, size_t n, int flags)
{
    ssize_t r = recv(fd, p, n, flags);
    return r < 0 ? recv_err() : r;
}

int cpt_accept(int lfd)
{
    int fd;
    while ((fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC)) < 0 && errno == EINTR) {
    }
    return fd;
}

int cpt_ncpu(void) { return (int)sysconf(_SC_NPROCESSORS_ONLN); }

int cpt_under_wine(void) { return 0; }

#endif

int cpt_socketpair(int sv[2])
{
#ifdef _WIN32
    int lfd = cpt_socket(AF_INET);
    if (lfd < 0)
        return lfd;
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    int rc = 0;
    if (bind((SOCKET)lfd, (struct sockaddr *)&a, sizeof a) != 0 || listen((SOCKET)lfd, 1) != 0) {
        rc = -cpt_sock_errno();
        cpt_close(lfd);
        return rc;
    }
    sv[0] = cpt_connect(CPT_HOST4, cpt_local_port(lfd), 0);
    if (sv[0] < 0) {
        cpt_close(lfd);
        return sv[0];
    }
    sv[1] = cpt_accept(lfd);
    rc = sv[1] < 0 ? -cpt_sock_errno() : 0;
    cpt_close(lfd);
    if (rc)
        cpt_close(sv[0]);
    return rc;
#else
    return socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0 ? 0 : -errno;
#endif
}

int cpt_xlisten(int backlog)
{
    int lfd = cpt_socket(AF_INET);
    cr_assert_geq(lfd, 0, "socket: %s", strerror(-lfd));
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    cr_assert_eq(bind(lfd, (struct sockaddr *)&a, sizeof a), 0, "bind: %s", strerror(cpt_sock_errno()));
    cr_assert_eq(listen(lfd, backlog), 0, "listen: %s", strerror(cpt_sock_errno()));
    return lfd;
}

static int make_addr(const char *host, uint16_t port, struct sockaddr_storage *ss, socklen_t *len)
{
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons(port);
        *len = sizeof *a4;
        return 0;
    }
    if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons(port);
        *len = sizeof *a6;
        return 0;
    }
    return -EINVAL;
}

int cpt_set_rcvtimeo(int fd, unsigned ms) { return set_timeo(fd, SO_RCVTIMEO, ms); }

int cpt_connect(const char *host, uint16_t port, int rcvbuf)
{
    struct sockaddr_storage ss;
    socklen_t len;
    int rc = make_addr(host, port, &ss, &len);
    if (rc)
        return rc;
    int fd = cpt_socket(ss.ss_family);
    if (fd < 0)
        return fd;
    cpt_setsockopt_int(fd, IPPROTO_TCP, TCP_NODELAY, 1);
    if (rcvbuf > 0)
        cpt_setsockopt_int(fd, SOL_SOCKET, SO_RCVBUF, rcvbuf);
    set_timeo(fd, SO_RCVTIMEO, CPT_IO_TIMEOUT_MS);
    set_timeo(fd, SO_SNDTIMEO, CPT_IO_TIMEOUT_MS);
    if (connect(fd, (struct sockaddr *)&ss, len) != 0) {
        rc = -cpt_sock_errno();
#ifndef _WIN32
        if (rc == -EINTR) {
            /* A signal (or io_uring task work) interrupted the wait; the
             * handshake goes on: wait for it like a non-blocking connect. */
            struct pollfd pfd = { .fd = fd, .events = POLLOUT };
            int err = 0;
            socklen_t el = sizeof err;
            int pr;
            while ((pr = poll(&pfd, 1, CPT_IO_TIMEOUT_MS)) < 0 && errno == EINTR) {
            }
            if (pr == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) == 0 && err == 0)
                return fd;
            rc = pr == 0 ? -ETIMEDOUT : -(err ? err : EIO);
        }
#endif
        cpt_close(fd);
        return rc;
    }
    return fd;
}

int cpt_connect_from(const char *src, const char *host, uint16_t port)
{
    struct sockaddr_storage ss, from;
    socklen_t len, flen;
    int rc = make_addr(host, port, &ss, &len);
    if (rc == 0)
        rc = make_addr(src, 0, &from, &flen);
    if (rc)
        return rc;
    int fd = cpt_socket(ss.ss_family);
    if (fd < 0)
        return fd;
    cpt_setsockopt_int(fd, IPPROTO_TCP, TCP_NODELAY, 1);
    set_timeo(fd, SO_RCVTIMEO, CPT_IO_TIMEOUT_MS);
    set_timeo(fd, SO_SNDTIMEO, CPT_IO_TIMEOUT_MS);
    if (bind(fd, (struct sockaddr *)&from, flen) != 0 || connect(fd, (struct sockaddr *)&ss, len) != 0) {
        rc = -cpt_sock_errno();
        cpt_close(fd);
        return rc;
    }
    return fd;
}

int cpt_xconnect(uint16_t port)
{
    int fd = cpt_connect(CPT_HOST4, port, 0);
    cr_assert_geq(fd, 0, "connect to 127.0.0.1:%u: %s", port, strerror(-fd));
    return fd;
}

int cpt_send_all(int fd, const void *p, size_t n)
{
    const uint8_t *c = p;
    while (n > 0) {
        ssize_t w = sock_send(fd, c, n);
        if (w < 0) {
            if (w == -EINTR)
                continue;
            return (int)w;
        }
        c += w;
        n -= (size_t)w;
    }
    return 0;
}

ssize_t cpt_recv_once(int fd, void *p, size_t n) { return sock_recv(fd, p, n, 0); }

ssize_t cpt_recv_some(int fd, void *p, size_t n)
{
    for (;;) {
        ssize_t r = sock_recv(fd, p, n, 0);
        if (r != -EINTR)
            return r;
    }
}

int cpt_recv_exact(int fd, void *p, size_t n)
{
    uint8_t *c = p;
    while (n > 0) {
        ssize_t r = sock_recv(fd, c, n, 0);
        if (r == 0)
            return 1;
        if (r < 0) {
            if (r == -EINTR)
                continue;
            return (int)r;
        }
        c += r;
        n -= (size_t)r;
    }
    return 0;
}

int cpt_wait_closed(int fd, unsigned timeout_ms)
{
    static uint8_t sink[65536]; /* contents never read */
    uint64_t deadline = cpt_now_ms() + timeout_ms;
    for (;;) {
        uint64_t now = cpt_now_ms();
        if (now >= deadline)
            return -ETIMEDOUT;
        unsigned left = (unsigned)(deadline - now);
        set_timeo(fd, SO_RCVTIMEO, left < 100 ? left : 100);
        ssize_t r = sock_recv(fd, sink, sizeof sink, 0);
        if (r == 0)
            return 0;
        if (r < 0) {
            if (r == -EINTR || r == -EAGAIN)
                continue;
            if (r == -ECONNRESET || r == -EPIPE || r == -ECONNABORTED)
                return 0;
            return (int)r;
        }
    }
}

int cpt_peek_state(int fd)
{
    uint8_t c;
#ifdef _WIN32
    /* No MSG_DONTWAIT: a zero-timeout poll says whether a peek would block. */
    int ready = cpt_poll_in(fd, 0);
    if (ready == 0)
        return 0;
    if (ready < 0)
        return 1;
    ssize_t r = sock_recv(fd, &c, 1, MSG_PEEK);
#else
    ssize_t r = sock_recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
#endif
    if (r == 0)
        return 1;
    if (r > 0)
        return 2;
    if (r == -EAGAIN || r == -EINTR)
        return 0;
    return 1;
}

void cpt_put_header(uint8_t *p, uint16_t size, uint16_t id)
{
    p[0] = (uint8_t)(size & 0xff);
    p[1] = (uint8_t)(size >> 8);
    p[2] = (uint8_t)(id & 0xff);
    p[3] = (uint8_t)(id >> 8);
}

int cpt_send_packet(int fd, uint16_t id, const void *body, size_t len)
{
    if (len + 4 > 65535)
        return -EMSGSIZE;
    uint8_t stackbuf[4096];
    uint8_t *p = len + 4 <= sizeof stackbuf ? stackbuf : malloc(len + 4);
    if (!p)
        return -ENOMEM;
    cpt_put_header(p, (uint16_t)(len + 4), id);
    if (len)
        memcpy(p + 4, body, len);
    int rc = cpt_send_all(fd, p, len + 4);
    if (p != stackbuf)
        free(p);
    return rc;
}

int cpt_recv_packet(int fd, uint16_t *id, void *body, size_t cap, size_t *len)
{
    uint8_t h[4];
    int rc = cpt_recv_exact(fd, h, 4);
    if (rc)
        return rc;
    size_t size = (size_t)h[0] | ((size_t)h[1] << 8);
    if (size < 4)
        return -EBADMSG;
    if (id)
        *id = (uint16_t)(h[2] | (h[3] << 8));
    if (size - 4 > cap)
        return -EMSGSIZE;
    if (len)
        *len = size - 4;
    return cpt_recv_exact(fd, body, size - 4);
}

uint16_t cpt_local_port(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0)
        return 0;
    if (ss.ss_family == AF_INET)
        return ntohs(((struct sockaddr_in *)&ss)->sin_port);
    if (ss.ss_family == AF_INET6)
        return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    return 0;
}

void cpt_close_reset(int fd)
{
    struct linger lg = { .l_onoff = 1, .l_linger = 0 };
    setsockopt(fd, SOL_SOCKET, SO_LINGER, (const void *)&lg, sizeof lg);
    cpt_close(fd);
}

void cpt_xsend(int fd, const void *p, size_t n)
{
    int rc = cpt_send_all(fd, p, n);
    cr_assert_eq(rc, 0, "send %zu bytes: %s", n, strerror(-rc));
}

void cpt_xrecv(int fd, void *p, size_t n)
{
    int rc = cpt_recv_exact(fd, p, n);
    cr_assert_eq(rc, 0, "recv %zu bytes: %s", n, rc == 1 ? "peer closed" : strerror(-rc));
}

void cpt_xsend_packet(int fd, uint16_t id, const void *body, size_t len)
{
    int rc = cpt_send_packet(fd, id, body, len);
    cr_assert_eq(rc, 0, "send packet id %u len %zu: %s", id, len, strerror(-rc));
}

void cpt_xrecv_packet_eq(int fd, uint16_t id, const void *body, size_t len)
{
    uint8_t *buf = malloc(65536);
    cr_assert_not_null(buf);
    uint16_t got_id = 0;
    size_t got_len = 0;
    int rc = cpt_recv_packet(fd, &got_id, buf, 65536, &got_len);
    if (rc != 0)
        free(buf);
    cr_assert_eq(rc, 0, "recv packet: %s", rc == 1 ? "peer closed" : strerror(-rc));
    bool same = got_id == id && got_len == len && (len == 0 || memcmp(buf, body, len) == 0);
    free(buf);
    cr_assert(same, "packet differs: id %u len %zu, expected id %u len %zu", got_id, got_len, id, len);
}

void cpt_xnext_packet_is(int fd, uint16_t id, const void *body, size_t len, const char *msg)
{
    uint8_t got[256];
    uint16_t got_id = 0;
    size_t got_len = 0;
    cr_assert_leq(len, sizeof got);
    int rc = cpt_recv_packet(fd, &got_id, got, sizeof got, &got_len);
    cr_assert_eq(rc, 0, "%s (receiving the marker: %d)", msg, rc);
    cr_assert(got_id == id && got_len == len && memcmp(got, body, len) == 0, "%s (packet %u of %zu bytes)",
              msg, (unsigned)got_id, got_len);
}

void cpt_xclosed(int fd, unsigned timeout_ms)
{
    int rc = cpt_wait_closed(fd, timeout_ms);
    cr_assert_eq(rc, 0, "connection not closed by the server within %u ms (%s)", timeout_ms, strerror(-rc));
}

static bool same_addr(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    if (a->ss_family != b->ss_family)
        return false;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    if (a->ss_family == AF_INET6) {
        const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
        return x->sin6_port == y->sin6_port && !memcmp(&x->sin6_addr, &y->sin6_addr, sizeof x->sin6_addr);
    }
    return false;
}

/* c is the other end of the connection whose ends are mine / theirs. */
static bool is_peer(int c, const struct sockaddr_storage *mine, const struct sockaddr_storage *theirs)
{
    struct sockaddr_storage a, b;
    socklen_t la = sizeof a, lb = sizeof b;
    if (getsockname(c, (struct sockaddr *)&a, &la) || getpeername(c, (struct sockaddr *)&b, &lb))
        return false;
    return same_addr(&a, theirs) && same_addr(&b, mine);
}

#ifdef _WIN32

/* The handles of this process, from the system's handle table
 * (SystemExtendedHandleInformation: no API lists one process' handles), whose
 * type passes keep() (NULL: all). Returns how many, or -1; *vals (may be
 * NULL) gets a malloc'ed array of them. */
typedef struct cpt_handle_entry {
    PVOID object;
    ULONG_PTR pid;
    ULONG_PTR value;
    ULONG access;
    USHORT backtrace, type;
    ULONG attributes, reserved;
} cpt_handle_entry;

typedef struct cpt_handle_table {
    ULONG_PTR count, reserved;
    cpt_handle_entry h[1];
} cpt_handle_table;

static int own_handles(uintptr_t **vals, bool (*keep)(uintptr_t h))
{
    typedef LONG(NTAPI * qsi_fn)(ULONG, PVOID, ULONG, PULONG);
    static qsi_fn qsi;
    if (!qsi)
        qsi = (qsi_fn)(void (*)(void))GetProcAddress(GetModuleHandleA("ntdll.dll"),
                                                     "NtQuerySystemInformation");
    if (!qsi)
        return -1;
    ULONG size = 1u << 16, got = 0;
    cpt_handle_table *t = NULL;
    LONG st;
    for (;;) {
        void *n = realloc(t, size);
        if (!n) {
            free(t);
            return -1;
        }
        t = n;
        st = qsi(64 /* SystemExtendedHandleInformation */, t, size, &got);
        if (st != (LONG)0xC0000004 /* STATUS_INFO_LENGTH_MISMATCH */)
            break;
        size = got > size ? got + 4096 : size * 2;
    }
    if (st != 0) {
        free(t);
        return -1;
    }
    ULONG_PTR me = GetCurrentProcessId();
    int n = 0;
    uintptr_t *out = vals ? malloc((t->count + 1) * sizeof *out) : NULL;
    for (ULONG_PTR i = 0; i < t->count; i++) {
        if (t->h[i].pid != me || (keep && !keep(t->h[i].value)))
            continue;
        if (out)
            out[n] = t->h[i].value;
        n++;
    }
    free(t);
    if (vals)
        *vals = out;
    return n;
}

/* Copies the type name of handle h ("File", "Event", ...) into name. */
static bool handle_type(uintptr_t h, char *name, size_t cap)
{
    union {
        PUBLIC_OBJECT_TYPE_INFORMATION info;
        char bytes[512];
    } u;
    ULONG len = 0;
    if (NtQueryObject((HANDLE)h, ObjectTypeInformation, &u, sizeof u, &len) != 0)
        return false;
    int n = WideCharToMultiByte(CP_UTF8, 0, u.info.TypeName.Buffer, u.info.TypeName.Length / 2, name,
                                (int)cap - 1, NULL, NULL);
    name[n > 0 ? n : 0] = '\0';
    return n > 0;
}

/* Sockets are File objects. */
static bool is_file(uintptr_t h)
{
    char type[64];
    return handle_type(h, type, sizeof type) && !strcmp(type, "File");
}

/* Every handle but those of synchronization objects: winpthreads and the C
 * runtime create an event or semaphore for a lock at its first contention
 * and keep it while the lock lives, so a static lock first contended during
 * a test would look like a leak. cport itself creates no such objects per
 * port, service or session; sockets, threads and completion ports count. */
static bool not_sync(uintptr_t h)
{
    static const char *const sync[] = { "Event", "Semaphore", "Mutant", "KeyedEvent" };
    char type[64];
    if (!handle_type(h, type, sizeof type))
        return true;
    for (size_t i = 0; i < sizeof sync / sizeof sync[0]; i++)
        if (!strcmp(type, sync[i]))
            return false;
    return true;
}

int cpt_find_peer_fd(int fd)
{
    struct sockaddr_storage mine, theirs;
    socklen_t l1 = sizeof mine, l2 = sizeof theirs;
    if (getsockname(fd, (struct sockaddr *)&mine, &l1) || getpeername(fd, (struct sockaddr *)&theirs, &l2))
        return -1;
    uintptr_t *vals = NULL;
    int n = own_handles(&vals, is_file);
    int found = -1;
    for (int i = 0; i < n && vals; i++) {
        int c = (int)vals[i];
        if (c != fd && is_peer(c, &mine, &theirs)) {
            found = c;
            break;
        }
    }
    free(vals);
    return found;
}

#else

int cpt_find_peer_fd(int fd)
{
    struct sockaddr_storage mine, theirs;
    socklen_t l1 = sizeof mine, l2 = sizeof theirs;
    if (getsockname(fd, (struct sockaddr *)&mine, &l1) || getpeername(fd, (struct sockaddr *)&theirs, &l2))
        return -1;
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return -1;
    int found = -1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        int c = atoi(e->d_name);
        if (c == fd || c == dirfd(d))
            continue;
        if (is_peer(c, &mine, &theirs)) {
            found = c;
            break;
        }
    }
    closedir(d);
    return found;
}

#endif

int cpt_xfind_peer_fd(int fd)
{
    int found = -1;
    uint64_t deadline = cpt_now_ms() + 1000;
    while ((found = cpt_find_peer_fd(fd)) < 0 && cpt_now_ms() < deadline)
        cpt_sleep_ms(5);
    if (found < 0 && cpt_env_backend() != CP_BACKEND_EPOLL)
        cr_skip_test("the library's socket is not a plain fd with this backend");
    cr_assert_geq(found, 0, "cannot find the library's end of the connection among this process' fds");
    return found;
}

uint8_t cpt_pattern(uint64_t i, uint32_t seed)
{
    uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ ((uint64_t)seed << 32 | seed);
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    return (uint8_t)(x >> 24);
}

void cpt_fill(uint8_t *p, size_t n, uint64_t offset, uint32_t seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = cpt_pattern(offset + i, seed);
}

long long cpt_check_pattern(const uint8_t *p, size_t n, uint64_t offset, uint32_t seed)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != cpt_pattern(offset + i, seed))
            return (long long)i;
    return -1;
}

/* ------------------------------------------------------------------ resources and leaks */

#ifdef _WIN32

int cpt_count_fds(void) { return own_handles(NULL, not_sync); }

long cpt_rss_kib(void)
{
    PROCESS_MEMORY_COUNTERS pmc;
    if (!K32GetProcessMemoryInfo(GetCurrentProcess(), &pmc, sizeof pmc))
        return -1;
    return (long)(pmc.WorkingSetSize / 1024);
}

/* The C runtime's heap, walked under its lock (other threads' allocations
 * wait meanwhile). */
size_t cpt_heap_in_use(void)
{
    HANDLE h = (HANDLE)_get_heap_handle();
    if (!h || !HeapLock(h))
        return 0;
    size_t sum = 0;
    PROCESS_HEAP_ENTRY e;
    e.lpData = NULL;
    while (HeapWalk(h, &e))
        if (e.wFlags & PROCESS_HEAP_ENTRY_BUSY)
            sum += e.cbData;
    HeapUnlock(h);
    return sum;
}

unsigned long long cpt_raise_nofile(unsigned long long want) { return want; }

#else

int cpt_count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n - 1; /* the directory's own fd */
}

long cpt_rss_kib(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f)
        return -1;
    long size = 0, rss = -1;
    if (fscanf(f, "%ld %ld", &size, &rss) != 2)
        rss = -1;
    fclose(f);
    return rss < 0 ? -1 : rss * (sysconf(_SC_PAGESIZE) / 1024);
}

size_t cpt_heap_in_use(void)
{
#  ifdef CPT_ASAN
    return 0;
#  else
    struct mallinfo2 mi = mallinfo2();
    return mi.uordblks + mi.hblkhd;
#  endif
}

unsigned long long cpt_raise_nofile(unsigned long long want)
{
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur < want) {
        rl.rlim_cur = want < rl.rlim_max ? want : rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
    }
    return rl.rlim_cur;
}

#endif

int cpt_sanitized(void)
{
#ifdef CPT_ASAN
    return 1;
#else
    return 0;
#endif
}

#ifdef _WIN32
static size_t warm_recv(cp_session *s, const uint8_t *data, size_t len)
{
    cp_session_send_copy(s, data, len);
    return len;
}

/* The C runtime, winpthreads, Winsock and Wine create a few handles lazily,
 * once per process and for good (the main thread's pthread handle, the
 * socket layer's state; locks' events are not counted, see not_sync). The
 * first leak mark of a process is taken after one whole round of what tests
 * do (a send buffer, a port, a server, a client that echoes one message,
 * stop, destroy), so that those handles count as the process' baseline, not
 * as a leak of the test. A leak per port, service or session still shows. */
static void warm_up(void)
{
    static bool done;
    if (done)
        return;
    done = true;
    cp_sendbuf_unref(cp_sendbuf_copy("w", 1));
    cp_port *port = NULL;
    cp_port_opts po = { .workers = 1, .backend = cpt_env_backend() };
    if (cp_port_create(&port, &po) != 0)
        return;
    cp_service *svc = NULL;
    cp_handlers h = { .on_recv = warm_recv };
    cp_server_opts so = { .host = CPT_HOST4, .session.framing = CP_FRAMING_RAW };
    if (cp_server_start(&svc, port, &so, &h, NULL) == 0) {
        int fd = cpt_connect(CPT_HOST4, cp_service_listen_port(svc), 0);
        if (fd >= 0) {
            char c = 'w';
            if (cpt_send_all(fd, &c, 1) == 0)
                cpt_recv_exact(fd, &c, 1);
            cpt_close(fd);
        }
        uint64_t deadline = cpt_now_ms() + 2000;
        cp_service_stats st;
        do {
            cp_service_stats_get(svc, &st);
            cpt_sleep_ms(1);
        } while (st.sessions != 0 && cpt_now_ms() < deadline);
        cp_service_stop(svc);
    }
    cp_port_destroy(port);
}
#endif

void cpt_leak_begin(cpt_leak_mark *m)
{
#ifdef _WIN32
    warm_up();
#endif
    m->fds = cpt_count_fds();
}

void cpt_leak_end(const cpt_leak_mark *m)
{
    /* Closing is synchronous in a correct library; allow a short grace period. */
    CPT_AWAIT(cpt_count_fds() <= m->fds, 1000, "file descriptors leaked: %d open, %d at start",
              cpt_count_fds(), m->fds);
#ifdef CPT_ASAN
    int leaks = __lsan_do_recoverable_leak_check();
    cr_assert_eq(leaks, 0, "LeakSanitizer found leaks (see stderr)");
#endif
}

/* ------------------------------------------------------------------ a ready-made test environment */

void cpt_env_start(cpt_env *e, int workers, const cp_server_opts *opts, const cp_handlers *h, int cap,
                   unsigned flags)
{
    cpt_env_start_on(e, &(cp_port_opts){ .workers = workers }, opts, h, cap, flags);
}

void cpt_env_start_on(cpt_env *e, const cp_port_opts *port_opts, const cp_server_opts *opts,
                      const cp_handlers *h, int cap, unsigned flags)
{
    memset(e, 0, sizeof *e);
    cpt_leak_begin(&e->leak);
    e->port = cpt_xport_opts(port_opts);
    e->t = cpt_track_new(cap);
    e->t->keep_refs = (flags & CPT_KEEP_REFS) != 0;
    e->t->echo = (flags & CPT_NO_ECHO) == 0;
    if (h) {
        e->h = *h;
    } else {
        e->h = cpt_track_handlers();
        if (flags & CPT_RAW) {
            e->h.on_packet = NULL;
            e->h.on_recv = cpt_on_recv;
        }
    }
    e->svc = cpt_xserver(e->port, opts, &e->h, e->t);
    e->sport = cp_service_listen_port(e->svc);
}

void cpt_env_stop(cpt_env *e)
{
    cpt_xstop(e->svc);
    e->svc = NULL;
    cpt_track_stopped(e->t);
    cpt_track_xcheck(e->t);
    cpt_track_free(e->t);
    e->t = NULL;
    cpt_xport_destroy(e->port);
    e->port = NULL;
    cpt_leak_end(&e->leak);
}

void cpt_env_xneighbour(cpt_env *e)
{
    int fd = cpt_xconnect(e->sport);
    static const char msg[] = "neighbour";
    cpt_xsend_packet(fd, 77, msg, sizeof msg);
    cpt_xrecv_packet_eq(fd, 77, msg, sizeof msg);
    cpt_close(fd);
}
