/* SPDX-License-Identifier: MIT */
/*
 * tsan_stress — the multithreaded paths of cport, exercised at once, for
 * ThreadSanitizer (`make check-tsan`). Criterion cannot run under TSan (its
 * inheritable arena collides with TSan's memory layout), so this is a plain
 * program: exit 0 when every check holds, 1 otherwise.
 *
 * At the same time: client threads ping-pong packets with an echo server;
 * a thread sends to sessions by id and broadcasts through a group; another
 * disconnects sessions by id; job queues take pushes from four threads while
 * timers are armed and cancelled from two; sessions tick on their own timers
 * and take posts from their handlers and from two threads, which also start
 * and cancel session timers; a thread asks kept sessions for their service
 * and moves them out of the room and back; two threads broadcast to the room
 * throughout, also while the service stops; finally the service is stopped
 * while the clients are still busy (and that thread still asks). Before all
 * that, send buffers are closed on another thread than the one that opened
 * them, while the opener opens more. Then, on ports of their own, the
 * lifetimes at close and destroy: two closes of one queue at once, timers
 * through a queue that closes, posts across a destroy, and a destroy with
 * work in flight.
 *
 * It also runs in every normal build (ctest stress.<backend>), on Windows
 * (under Wine) too.
 */
#include <cport.h>

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _WIN32
#  define WIN32_LEAN_AND_MEAN
#  include <winsock2.h>
#  include <ws2tcpip.h>
#  include <windows.h>
typedef SOCKET sock_t;
#  define sock_close closesocket
#  define SEND_FLAGS 0
static void sleep_us(unsigned us) { Sleep((us + 999) / 1000); }
static void set_rcvtimeo_ms(sock_t fd, unsigned ms)
{
    DWORD v = ms;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, (const char *)&v, sizeof v);
}
#else
#  include <arpa/inet.h>
#  include <netinet/in.h>
#  include <netinet/tcp.h>
#  include <sys/socket.h>
#  include <sys/time.h>
#  include <time.h>
#  include <unistd.h>
typedef int sock_t;
#  define sock_close close
#  define SEND_FLAGS MSG_NOSIGNAL
static void sleep_us(unsigned us) { usleep(us); }
static void set_rcvtimeo_ms(sock_t fd, unsigned ms)
{
    struct timeval tv = { .tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}
#endif

#define CLIENTS 8
#define MAX_IDS 256
#define PUSHES 20000 /* jobs per pusher thread */

/* rand_r is POSIX only; any small generator does. */
static unsigned next_rand(unsigned *seed)
{
    *seed = *seed * 1103515245u + 12345u;
    return *seed >> 8;
}

static atomic_int failures;
static atomic_int stop_clients; /* the socket clients */
static atomic_int stop_users;   /* the threads that use the service handle */
static cp_group *room;
static pthread_mutex_t ids_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t ids[MAX_IDS];
static int nids;

#define CHECK(cond, ...)                                                                                     \
  do {                                                                                                       \
    if (!(cond)) {                                                                                           \
      fprintf(stderr, "tsan_stress: " __VA_ARGS__);                                                          \
      fputc('\n', stderr);                                                                                   \
      atomic_fetch_add(&failures, 1);                                                                        \
    }                                                                                                        \
  } while (0)

/* ------------------------------------------------------------------ server side */

typedef struct sess_state {
    atomic_int inside; /* a callback of this session is running */
    long work;         /* touched by callbacks, posts and session timers alike */
    cp_session_timer *tick;
} sess_state;

/* Sessions kept (cp_session_ref) for the threads that post to them. */
static pthread_mutex_t kept_lock = PTHREAD_MUTEX_INITIALIZER;
static cp_session *kept[MAX_IDS];
static int nkept;
static atomic_long posts_made, posts_ran;

static atomic_int connected, disconnected;

static void enter(cp_session *s)
{
    sess_state *st = cp_session_data(s);
    CHECK(atomic_fetch_add(&st->inside, 1) == 0, "two callbacks of one session overlapped");
}

static void leave(cp_session *s)
{
    sess_state *st = cp_session_data(s);
    atomic_fetch_sub(&st->inside, 1);
}

static void session_tick(cp_session *s, void *arg)
{
    (void)arg;
    enter(s);
    ((sess_state *)cp_session_data(s))->work++;
    leave(s);
}

/* Frees its arg: a post that returned 0 always runs, before on_disconnected. */
static void session_job(cp_session *s, void *arg)
{
    enter(s);
    ((sess_state *)cp_session_data(s))->work++;
    leave(s);
    free(arg);
    atomic_fetch_add(&posts_ran, 1);
}

static void post_job(cp_session *s)
{
    void *arg = malloc(16);
    int r = cp_session_post(s, session_job, arg);
    CHECK(r == 0 || r == -ENOTCONN, "cp_session_post returned %d", r);
    if (r == 0)
        atomic_fetch_add(&posts_made, 1);
    else
        free(arg);
}

static void on_connected(cp_session *s)
{
    sess_state *st = calloc(1, sizeof *st);
    cp_session_set_data(s, st);
    enter(s);
    cp_session_timer_start(&st->tick, s, 1, 1, session_tick, NULL);
    cp_session_ref(s);
    cp_session *dropped = NULL;
    pthread_mutex_lock(&kept_lock);
    if (nkept < MAX_IDS) {
        kept[nkept++] = s;
    } else { /* newer sessions replace older ones */
        unsigned i = (unsigned)cp_session_id(s) % MAX_IDS;
        dropped = kept[i];
        kept[i] = s;
    }
    pthread_mutex_unlock(&kept_lock);
    cp_session_unref(dropped);
    atomic_fetch_add(&connected, 1);
    cp_group_add(room, s);
    pthread_mutex_lock(&ids_lock);
    if (nids < MAX_IDS)
        ids[nids++] = cp_session_id(s);
    pthread_mutex_unlock(&ids_lock);
    leave(s);
}

static int on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    enter(s);
    post_job(s);
    cp_sendbuf *b = cp_packet_make(id, body, len);
    if (b) {
        cp_session_send(s, b);
        cp_sendbuf_unref(b);
    }
    leave(s);
    return 0;
}

static void on_disconnected(cp_session *s, cp_reason reason, int err)
{
    (void)reason, (void)err;
    enter(s);
    atomic_fetch_add(&disconnected, 1);
    sess_state *st = cp_session_data(s);
    if (st->tick)
        CHECK(cp_session_timer_cancel(st->tick) == -ENOENT, "a session timer outlived its session");
    leave(s);
    free(cp_session_data(s));
}

/* ------------------------------------------------------------------ client threads */

static uint16_t server_port;

static void *client_thread(void *arg)
{
    (void)arg;
    while (!atomic_load(&stop_clients)) {
        sock_t fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(server_port) };
        inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
        set_rcvtimeo_ms(fd, 200);
        if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
            sock_close(fd);
            sleep_us(1000);
            continue;
        }
        for (int i = 0; i < 50 && !atomic_load(&stop_clients); i++) {
            uint8_t pkt[36] = { 36, 0, 7, 0 };
            memset(pkt + 4, i, 32);
            if (send(fd, (const void *)pkt, sizeof pkt, SEND_FLAGS) != (int)sizeof pkt)
                break;
            uint8_t in[512];
            if (recv(fd, (void *)in, sizeof in, 0) <= 0) /* echoes and broadcasts mixed: only liveness */
                break;
        }
        sock_close(fd);
    }
    return NULL;
}

/* ------------------------------------------------------------------ by-id senders */

static cp_service *svc;

static uint64_t random_id(unsigned *seed)
{
    pthread_mutex_lock(&ids_lock);
    uint64_t id = nids ? ids[next_rand(seed) % nids] : 0;
    pthread_mutex_unlock(&ids_lock);
    return id;
}

static void *sender_thread(void *arg)
{
    (void)arg;
    unsigned seed = 1;
    while (!atomic_load(&stop_users)) {
        cp_sendbuf *b = cp_packet_make(9, "by-id", 5);
        int r = cp_service_send_to(svc, random_id(&seed), b);
        CHECK(r == 0 || r == -ENOTCONN, "send_to returned %d", r);
        cp_group_broadcast(room, b);
        cp_sendbuf_unref(b);
        sleep_us(200);
    }
    return NULL;
}

static void *kicker_thread(void *arg)
{
    (void)arg;
    unsigned seed = 2;
    while (!atomic_load(&stop_users)) {
        int r = cp_service_disconnect_id(svc, random_id(&seed));
        CHECK(r == 0 || r == -ENOTCONN, "disconnect_id returned %d", r);
        sleep_us(3000);
    }
    return NULL;
}

/* ------------------------------------------------------------------ work bound to sessions */

static void *session_poster_thread(void *arg)
{
    unsigned seed = (unsigned)(uintptr_t)arg;
    while (!atomic_load(&stop_users)) {
        pthread_mutex_lock(&kept_lock);
        cp_session *s = nkept ? kept[next_rand(&seed) % nkept] : NULL;
        if (s)
            cp_session_ref(s); /* on_connected may replace it meanwhile */
        pthread_mutex_unlock(&kept_lock);
        if (!s) {
            sleep_us(1000);
            continue;
        }
        post_job(s);
        cp_session_timer *t;
        if (cp_session_timer_start(&t, s, next_rand(&seed) % 3, next_rand(&seed) % 2, session_tick, NULL) ==
            0) {
            int r = cp_session_timer_cancel(t);
            CHECK(r == 0 || r == -ENOENT, "cp_session_timer_cancel returned %d", r);
        }
        cp_session_unref(s);
        sleep_us(100);
    }
    return NULL;
}

/* A thread that asks kept sessions for their service while sessions finish
 * and the service stops: the finish clears the pointer on the worker as this
 * reads it (a data race before the pointer was atomic). It also takes them
 * out of the room and puts them back. */
static atomic_int stop_watch;

static void *service_watch_thread(void *arg)
{
    unsigned seed = (unsigned)(uintptr_t)arg;
    while (!atomic_load(&stop_watch)) {
        pthread_mutex_lock(&kept_lock);
        cp_session *s = nkept ? kept[next_rand(&seed) % nkept] : NULL;
        if (s)
            cp_session_ref(s);
        pthread_mutex_unlock(&kept_lock);
        if (s) {
            cp_service *got = cp_session_service(s);
            CHECK(got == svc || got == NULL, "cp_session_service gave neither the service nor NULL");
            /* Membership changes from a user thread, against the broadcasts
             * and the members' own leaving on their workers. */
            int r = cp_group_remove(room, s);
            CHECK(r == 0 || r == -ENOENT, "cp_group_remove returned %d", r);
            r = cp_group_add(room, s);
            CHECK(r == 0 || r == -EEXIST || r == -ENOTCONN, "cp_group_add returned %d", r);
            cp_session_unref(s);
        }
    }
    return NULL;
}

/* Threads that broadcast to the room until after the service has stopped:
 * the members' closes (urgent messages to their workers) take them out of the
 * room while broadcasts hold the member array. */
static atomic_int stop_flood;

static void *room_flood_thread(void *arg)
{
    (void)arg;
    cp_sendbuf *b = cp_packet_make(10, "flood", 5);
    while (!atomic_load(&stop_flood)) {
        int n = cp_group_broadcast(room, b);
        CHECK(n >= 0, "cp_group_broadcast returned %d", n);
        sleep_us(50);
    }
    cp_sendbuf_unref(b);
    return NULL;
}

/* ------------------------------------------------------------------ send buffers closed elsewhere */

/* A buffer opened here is closed on a partner thread while this thread makes
 * a copy (a shortcut, allowed while a buffer is open): the copy's open must
 * not touch the other buffer's length (before the fix it set it to the
 * capacity, racing with the close and sometimes winning). */
static _Atomic(cp_sendbuf *) far_buf;
static atomic_int far_closed;

static void *far_close_thread(void *arg)
{
    int rounds = (int)(intptr_t)arg;
    for (int i = 0; i < rounds; i++) {
        cp_sendbuf *b;
        while (!(b = atomic_exchange(&far_buf, NULL)))
            sleep_us(0);
        cp_sendbuf_close(b, 10);
        atomic_store(&far_closed, 1);
    }
    return NULL;
}

static void sendbuf_closed_elsewhere(void)
{
    enum { ROUNDS = 2000 };
    pthread_t th;
    pthread_create(&th, NULL, far_close_thread, (void *)(intptr_t)ROUNDS);
    for (int i = 0; i < ROUNDS; i++) {
        cp_sendbuf *b = cp_sendbuf_open(1000);
        memset(cp_sendbuf_data(b), 'x', 10);
        atomic_store(&far_closed, 0);
        atomic_store(&far_buf, b);
        cp_sendbuf *c = cp_sendbuf_copy("copy", 4);
        while (!atomic_load(&far_closed))
            sleep_us(0);
        CHECK(cp_sendbuf_len(b) == 10, "a buffer closed at 10 on another thread has length %zu",
              cp_sendbuf_len(b));
        cp_sendbuf_unref(c);
        cp_sendbuf_unref(b);
    }
    pthread_join(th, NULL);
}

/* ------------------------------------------------------------------ job queues and timers */

typedef struct qstate {
    cp_jobq *q;
    atomic_int running;
    long counter; /* touched only by the queue's jobs: TSan checks they are ordered */
    atomic_long ran;
} qstate;

static qstate qs[4];

static void job(void *arg)
{
    qstate *q = arg;
    CHECK(atomic_fetch_add(&q->running, 1) == 0, "two jobs of one queue ran at once");
    q->counter++;
    atomic_fetch_sub(&q->running, 1);
    atomic_fetch_add(&q->ran, 1);
}

static atomic_long pushed;

static void *pusher_thread(void *arg)
{
    unsigned seed = (unsigned)(uintptr_t)arg;
    for (int i = 0; i < PUSHES; i++) {
        qstate *q = &qs[next_rand(&seed) % 4];
        if (cp_jobq_push(q->q, job, q) == 0)
            atomic_fetch_add(&pushed, 1);
    }
    return NULL;
}

static atomic_int fired;
static void on_timer(void *arg)
{
    (void)arg;
    atomic_fetch_add(&fired, 1);
}

static cp_port *port;

static void *timer_thread(void *arg)
{
    (void)arg;
    for (int i = 0; i < 2000; i++) {
        cp_timer *t;
        if (cp_timer_start(&t, port, (uint64_t)(i % 3), 0, on_timer, NULL, i % 2 ? qs[0].q : NULL) == 0)
            cp_timer_cancel(t);
    }
    return NULL;
}

/* ------------------------------------------------------------------ lifetimes at close and destroy */

/* Two threads close one queue at once, each with its own on_closed: only the
 * close that returned 0 has its callback run. */
#define LT_CLOSE_ROUNDS 2000

typedef struct lt_close {
    _Atomic(cp_jobq *) q;
    atomic_int round, done, quit;
    atomic_int rc[2];
    atomic_int fired[2];
} lt_close;

typedef struct lt_closer {
    lt_close *c;
    int i;
} lt_closer;

static void lt_fired(void *arg) { atomic_fetch_add((atomic_int *)arg, 1); }

static void *lt_closer_main(void *arg)
{
    lt_closer *me = arg;
    lt_close *c = me->c;
    for (int seen = 0;;) {
        int r;
        /* Spin hot for a while, so that both closers leave at the same moment. */
        for (unsigned spins = 0; (r = atomic_load(&c->round)) == seen && !atomic_load(&c->quit);)
            if (++spins > 20000)
                sched_yield();
        if (atomic_load(&c->quit))
            return NULL;
        seen = r;
        atomic_store(&c->rc[me->i], cp_jobq_close(atomic_load(&c->q), lt_fired, &c->fired[me->i]));
        atomic_fetch_add(&c->done, 1);
    }
}

static void lt_close_race(cp_port *p)
{
    lt_close c = { 0 };
    lt_closer cl[2] = { { &c, 0 }, { &c, 1 } };
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&th[i], NULL, lt_closer_main, &cl[i]);
    int wrong = 0;
    for (int round = 1; round <= LT_CLOSE_ROUNDS; round++) {
        cp_jobq *q;
        cp_jobq_create(&q, p);
        atomic_store(&c.q, q);
        atomic_store(&c.fired[0], 0);
        atomic_store(&c.fired[1], 0);
        atomic_store(&c.round, round);
        while (atomic_load(&c.done) < 2 * round)
            sched_yield();
        cp_jobq_close_wait(q);
        int w = atomic_load(&c.rc[0]) == 0 ? 0 : 1;
        if (atomic_load(&c.rc[w]) != 0 || atomic_load(&c.rc[1 - w]) != -ESHUTDOWN ||
            atomic_load(&c.fired[w]) != 1 || atomic_load(&c.fired[1 - w]) != 0)
            wrong++;
        cp_jobq_unref(q);
    }
    atomic_store(&c.quit, 1);
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    CHECK(wrong == 0, "concurrent closes: %d of %d rounds ran the wrong on_closed", wrong, LT_CLOSE_ROUNDS);
}

/* Posts from two threads while their port is destroyed: each returns
 * -ESHUTDOWN or has run when the destroy returns. The posters run freely
 * across the destroy; a job queue of the port, kept until they have stopped,
 * keeps the port's memory (not its workers), so that a post starting after
 * the destroy returned is refused rather than reading freed memory (how the
 * library is built, not a promise of its API). */
typedef struct lt_posts {
    cp_port *port;
    atomic_long accepted, ran;
} lt_posts;

static void lt_post_ran(void *arg) { atomic_fetch_add(&((lt_posts *)arg)->ran, 1); }

static void *lt_poster(void *arg)
{
    lt_posts *lp = arg;
    while (cp_port_post(lp->port, lt_post_ran, lp) == 0)
        atomic_fetch_add(&lp->accepted, 1);
    return NULL;
}

static void lt_posts_vs_destroy(void)
{
    long lost = 0;
    for (int round = 0; round < 12; round++) {
        lt_posts lp = { 0 };
        if (cp_port_create(&lp.port, &(cp_port_opts){ .workers = 2 + round % 2 }) < 0) {
            CHECK(0, "posts vs destroy: cp_port_create failed");
            return;
        }
        cp_jobq *keep;
        cp_jobq_create(&keep, lp.port);
        pthread_t th[2];
        for (int i = 0; i < 2; i++)
            pthread_create(&th[i], NULL, lt_poster, &lp);
        sleep_us(1000);
        int r = cp_port_destroy(lp.port);
        CHECK(r == 0, "posts vs destroy: cp_port_destroy returned %d", r);
        long ran = atomic_load(&lp.ran);
        for (int i = 0; i < 2; i++)
            pthread_join(th[i], NULL);
        cp_jobq_unref(keep);
        lost += atomic_load(&lp.accepted) - ran;
    }
    CHECK(lost == 0, "posts vs destroy: %ld accepted posts had not run when the destroy returned", lost);
}

/* A port destroyed with work in flight: 300 jobs queued on an open queue, a
 * job that pushes itself again, timers armed (direct and through the queue)
 * whose handles another thread gives back during and after the destroy.
 * Every accepted job has run when the destroy returns; every handle can be
 * given back; a timer that never fired answers 0. */
typedef struct lt_destroy {
    cp_jobq *q;
    atomic_long ran, accepted;
    cp_timer *t[64];
    atomic_int fired[64];
    atomic_int next, lies;
} lt_destroy;

static void lt_job(void *arg) { atomic_fetch_add(&((lt_destroy *)arg)->ran, 1); }

static void lt_repush(void *arg)
{
    lt_destroy *d = arg;
    atomic_fetch_add(&d->ran, 1);
    if (cp_jobq_push(d->q, lt_repush, d) == 0)
        atomic_fetch_add(&d->accepted, 1);
}

static void *lt_giver(void *arg)
{
    lt_destroy *d = arg;
    for (int i; (i = atomic_fetch_add(&d->next, 1)) < 64;) {
        int r = cp_timer_cancel(d->t[i]);
        if (r != (atomic_load(&d->fired[i]) && i % 3 != 1 ? -ENOENT : 0))
            atomic_fetch_add(&d->lies, 1);
        sleep_us(30);
    }
    return NULL;
}

static void lt_destroy_with_work(void)
{
    for (int round = 0; round < 6; round++) {
        cp_port *p;
        if (cp_port_create(&p, &(cp_port_opts){ .workers = 2 + round % 2 }) < 0) {
            CHECK(0, "destroy with work: cp_port_create failed");
            return;
        }
        lt_destroy *d = calloc(1, sizeof *d);
        cp_jobq_create(&d->q, p);
        for (int i = 0; i < 64; i++)
            cp_timer_start(&d->t[i], p, i % 4 ? 60000 : 0, i % 3 == 1 ? 60000 : 0, lt_fired, &d->fired[i],
                           i % 2 ? d->q : NULL);
        sleep_us(5000);
        cp_jobq_push(d->q, lt_repush, d);
        for (int i = 0; i < 300; i++)
            if (cp_jobq_push(d->q, lt_job, d) == 0)
                atomic_fetch_add(&d->accepted, 1);
        cp_jobq_unref(d->q);
        pthread_t th;
        pthread_create(&th, NULL, lt_giver, d);
        int r = cp_port_destroy(p);
        CHECK(r == 0, "destroy with work: cp_port_destroy returned %d", r);
        long ran = atomic_load(&d->ran), accepted = atomic_load(&d->accepted);
        CHECK(ran == accepted + 1, "destroy with work: %ld jobs ran, 1 + %ld pushed", ran, accepted);
        pthread_join(th, NULL);
        CHECK(atomic_load(&d->lies) == 0, "destroy with work: %d cancels misreported", atomic_load(&d->lies));
        free(d);
    }
}

/* One-shots delivered through a queue that closes while they come due:
 * cancel answers -ENOENT exactly for those that ran. */
static void lt_timers_vs_close(cp_port *p)
{
    enum { N = 200 };
    atomic_int *hits = calloc(N, sizeof *hits);
    cp_timer **t = calloc(N, sizeof *t);
    cp_jobq *q;
    cp_jobq_create(&q, p);
    for (int i = 0; i < N; i++)
        cp_timer_start(&t[i], p, (uint64_t)(i % 8), 0, lt_fired, &hits[i], q);
    sleep_us(4000);
    cp_jobq_close_wait(q);
    sleep_us(30000);
    int lies = 0;
    for (int i = 0; i < N; i++) {
        int r = cp_timer_cancel(t[i]);
        if ((r == -ENOENT) != (atomic_load(&hits[i]) == 1))
            lies++;
    }
    CHECK(lies == 0, "timers vs close: cancel misreported %d of %d timers", lies, N);
    cp_jobq_unref(q);
    free(hits);
    free(t);
}

int main(void)
{
#ifdef _WIN32
    WSADATA wsa;
    if (WSAStartup(MAKEWORD(2, 2), &wsa) != 0) {
        fprintf(stderr, "tsan_stress: WSAStartup failed\n");
        return 1;
    }
#endif
    int r = cp_port_create(&port, &(cp_port_opts){ .workers = 2 });
    if (r < 0) {
        fprintf(stderr, "tsan_stress: cp_port_create: %s\n", cp_strerror(r));
        return 1;
    }
    cp_group_create(&room);
    cp_handlers h = { .on_connected = on_connected,
                      .on_packet = on_packet,
                      .on_disconnected = on_disconnected };
    cp_server_opts o = { .host = "127.0.0.1", .port = 0 };
    if ((r = cp_server_start(&svc, port, &o, &h, NULL)) < 0) {
        fprintf(stderr, "tsan_stress: cp_server_start: %s\n", cp_strerror(r));
        return 1;
    }
    server_port = cp_service_listen_port(svc);
    for (int i = 0; i < 4; i++)
        cp_jobq_create(&qs[i].q, port);

    sendbuf_closed_elsewhere();

    pthread_t cl[CLIENTS], snd, kick, push[4], tim[2], sposter[2], watch, flood[2];
    for (int i = 0; i < CLIENTS; i++)
        pthread_create(&cl[i], NULL, client_thread, NULL);
    pthread_create(&snd, NULL, sender_thread, NULL);
    pthread_create(&kick, NULL, kicker_thread, NULL);
    for (int i = 0; i < 4; i++)
        pthread_create(&push[i], NULL, pusher_thread, (void *)(uintptr_t)(i + 10));
    for (int i = 0; i < 2; i++)
        pthread_create(&tim[i], NULL, timer_thread, NULL);
    for (int i = 0; i < 2; i++)
        pthread_create(&sposter[i], NULL, session_poster_thread, (void *)(uintptr_t)(i + 20));
    pthread_create(&watch, NULL, service_watch_thread, (void *)(uintptr_t)30);
    for (int i = 0; i < 2; i++)
        pthread_create(&flood[i], NULL, room_flood_thread, NULL);

    for (int i = 0; i < 4; i++)
        pthread_join(push[i], NULL);
    for (int i = 0; i < 2; i++)
        pthread_join(tim[i], NULL);
    sleep_us(2000000);

    /* The service handle is the caller's to stop: threads that use it end
     * first. The clients, queued sends and group broadcasts in flight do not. */
    atomic_store(&stop_users, 1);
    pthread_join(snd, NULL);
    pthread_join(kick, NULL);
    for (int i = 0; i < 2; i++)
        pthread_join(sposter[i], NULL);
    r = cp_service_stop(svc);
    CHECK(r == 0, "cp_service_stop returned %d", r);
    atomic_store(&stop_watch, 1);
    pthread_join(watch, NULL);
    atomic_store(&stop_flood, 1);
    for (int i = 0; i < 2; i++)
        pthread_join(flood[i], NULL);
    CHECK(cp_group_size(room) == 0, "%zu stopped sessions are still in the room", cp_group_size(room));
    for (int i = 0; i < nkept; i++)
        CHECK(cp_session_service(kept[i]) == NULL, "a session names its stopped service");
    atomic_store(&stop_clients, 1);
    for (int i = 0; i < CLIENTS; i++)
        pthread_join(cl[i], NULL);

    CHECK(atomic_load(&connected) == atomic_load(&disconnected), "%d connected but %d disconnected",
          atomic_load(&connected), atomic_load(&disconnected));
    CHECK(atomic_load(&connected) > 0, "no session ever connected");
    CHECK(atomic_load(&posts_ran) == atomic_load(&posts_made), "%ld session posts made, %ld ran",
          atomic_load(&posts_made), atomic_load(&posts_ran));
    for (int i = 0; i < nkept; i++)
        cp_session_unref(kept[i]);
    for (int i = 0; i < 4; i++)
        cp_jobq_close(qs[i].q, NULL, NULL);
    cp_port_destroy(port);
    long ran = 0;
    for (int i = 0; i < 4; i++) {
        ran += atomic_load(&qs[i].ran);
        CHECK(qs[i].counter == atomic_load(&qs[i].ran), "queue %d lost an update", i);
        cp_jobq_unref(qs[i].q);
    }
    CHECK(ran == atomic_load(&pushed), "%ld jobs pushed, %ld ran", atomic_load(&pushed), ran);
    cp_group_destroy(room);

    /* Lifetimes at close and destroy, on ports of their own. */
    cp_port *lp;
    if ((r = cp_port_create(&lp, &(cp_port_opts){ .workers = 2 })) == 0) {
        lt_close_race(lp);
        lt_timers_vs_close(lp);
        CHECK(cp_port_destroy(lp) == 0, "lifetimes: cp_port_destroy failed");
    } else {
        CHECK(0, "lifetimes: cp_port_create: %d", r);
    }
    lt_posts_vs_destroy();
    lt_destroy_with_work();

    printf("tsan_stress: %d sessions, %ld jobs, %d timers fired of 4000 cancelled-at-once, %ld session "
           "posts: %s\n",
           atomic_load(&connected), ran, atomic_load(&fired), atomic_load(&posts_ran),
           atomic_load(&failures) ? "FAILED" : "ok");
    return atomic_load(&failures) ? 1 : 0;
}
