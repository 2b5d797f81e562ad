/* SPDX-License-Identifier: MIT */
/*
 * Repro (epoll backend): data and FIN that arrive together are read as data
 * only; the EOF is never seen, the session stays live forever.
 *
 * src/port/epoll.c do_recv() returns after a short read ("a short read drained
 * the socket; the next bytes bring a new edge"). When the FIN is already
 * queued behind the data, the one edge-triggered event (EPOLLIN|EPOLLRDHUP)
 * has been consumed and no new edge ever comes: no read returns 0, no
 * on_disconnected(CP_REASON_PEER_CLOSED), and the client never gets the
 * server's FIN. Closing the client completely does not help (no new segment).
 *
 * Deterministic: one worker; session A's packet handler sleeps 100 ms, and
 * meanwhile client B sends a packet and shutdown(SHUT_WR), so both are queued
 * before the worker polls again.
 *
 *   cc -D_GNU_SOURCE -Iinclude tests/fuzz/repro/epoll_lost_eof.c build/libcport.a -luring -lpthread
 *   CP_BACKEND=epoll ./a.out    -> "B: no EOF within 2 s ... sessions live 1"  (exit 1)
 *   CP_BACKEND=uring ./a.out    -> "B: EOF"                                    (exit 0)
 */
#include <cport.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static atomic_int connected;

static void on_connected(cp_session *s) { atomic_fetch_add(&connected, 1); }

static int on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    if (id == 1)
        usleep(100000); /* keep the only worker busy */
    return 0;
}

static int dial(uint16_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET,
                             .sin_port = htons(port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    connect(fd, (struct sockaddr *)&a, sizeof a);
    return fd;
}

int main(void)
{
    cp_port *port;
    cp_port_opts po = { .workers = 1 };
    cp_port_create(&port, &po);
    cp_handlers h = { .on_connected = on_connected, .on_packet = on_packet };
    cp_server_opts o = { .host = "127.0.0.1" };
    cp_service *svc;
    if (cp_server_start(&svc, port, &o, &h, NULL) != 0)
        return 2;
    uint16_t p = cp_service_listen_port(svc);
    int a = dial(p), b = dial(p);
    while (atomic_load(&connected) < 2)
        usleep(1000);
    usleep(10000);
    uint8_t slow[4] = { 4, 0, 1, 0 }, pkt[8] = { 8, 0, 2, 0, 'd', 'a', 't', 'a' };
    send(a, slow, sizeof slow, 0); /* the worker sleeps 100 ms in A's handler */
    usleep(20000);
    send(b, pkt, sizeof pkt, 0); /* data and FIN both queued meanwhile */
    shutdown(b, SHUT_WR);
    struct pollfd pf = { .fd = b, .events = POLLIN };
    char c;
    int eof = poll(&pf, 1, 2000) == 1 && recv(b, &c, 1, 0) <= 0;
    cp_service_stats st;
    cp_service_stats_get(svc, &st);
    printf("backend %s: B: %s; server: sessions live %llu, disconnected %llu\n", cp_port_backend_name(port),
           eof ? "EOF" : "no EOF within 2 s (the server never saw the FIN)", (unsigned long long)st.sessions,
           (unsigned long long)st.disconnected);
    close(a);
    close(b);
    cp_service_stop(svc);
    cp_port_destroy(port);
    return eof ? 0 : 1;
}
