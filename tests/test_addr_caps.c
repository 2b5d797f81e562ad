/* SPDX-License-Identifier: MIT */
/*
 * Caps by source address and the accept rate (cp_server_opts
 * max_sessions_per_addr, accept_rate_per_addr, accept_rate): a connection
 * over a cap is closed at once, never reaches on_connected, and is counted
 * by cause in cp_service_stats.refused. Clients bind 127.0.0.2, 127.0.0.3...
 * (all of 127/8 is loopback) to be different sources.
 */
#include "helpers.h"
#include "net/net.h"

#include <stdio.h>
#include <string.h>

static const uint8_t ping[] = "ping";

/* A connection that is served: the echo comes back. */
static int xserved_from(const char *src, uint16_t port)
{
    int fd = cpt_connect_from(src, CPT_HOST4, port);
    cr_assert_geq(fd, 0, "connect from %s: %s", src, strerror(-fd));
    cpt_xsend_packet(fd, 1, ping, sizeof ping);
    cpt_xrecv_packet_eq(fd, 1, ping, sizeof ping);
    return fd;
}

static uint64_t refused(const cp_service *svc, cp_refusal c) { return cpt_stats(svc).refused[c]; }

Test(addr_caps, sessions_per_addr_refuses_the_21st_and_serves_others)
{
    cpt_env e;
    cp_server_opts o = { .max_sessions_per_addr = 20 };
    cpt_env_start(&e, 2, &o, NULL, 64, 0);
    int fd[20];
    for (int i = 0; i < 20; i++)
        fd[i] = xserved_from("127.0.0.2", e.sport);

    /* The 21st from 127.0.0.2: the kernel completes the handshake, the
     * server closes it at once and counts it. */
    int over = cpt_connect_from("127.0.0.2", CPT_HOST4, e.sport);
    cr_assert_geq(over, 0);
    cpt_xclosed(over, 5000);
    cpt_close(over);
    CPT_AWAIT(refused(e.svc, CP_REFUSED_PER_ADDR) == 1, 5000, "the 21st is counted");
    cr_assert_eq(atomic_load(&e.t->connected), 20, "the 21st never reached on_connected");

    /* Another address is served meanwhile. */
    int other = xserved_from("127.0.0.3", e.sport);

    /* A session that ends frees its place: 127.0.0.2 is served again. */
    cpt_close(fd[0]);
    CPT_AWAIT(cpt_stats(e.svc).sessions == 20, 5000, "the closed session finished");
    fd[0] = xserved_from("127.0.0.2", e.sport);
    cp_service_stats st = cpt_stats(e.svc);
    cr_assert_eq(st.refused[CP_REFUSED_PER_ADDR], 1);
    cr_assert_eq(st.refused[CP_REFUSED_ADDR_RATE] + st.refused[CP_REFUSED_RATE] + st.rejected, 0);
    cr_assert_eq(st.refused[CP_REFUSED_MAX_SESSIONS], st.rejected);
    for (int i = 0; i < 20; i++)
        cpt_close(fd[i]);
    cpt_close(other);
    cpt_env_stop(&e);
}

/* max_sessions refusals are the old counter and one cause among the others. */
Test(addr_caps, max_sessions_is_a_cause_and_still_rejected)
{
    cpt_env e;
    cp_server_opts o = { .max_sessions = 2 };
    cpt_env_start(&e, 1, &o, NULL, 8, 0);
    int a = xserved_from("127.0.0.2", e.sport), b = xserved_from("127.0.0.3", e.sport);
    int c = cpt_connect_from("127.0.0.4", CPT_HOST4, e.sport);
    cr_assert_geq(c, 0);
    cpt_xclosed(c, 5000);
    CPT_AWAIT(cpt_stats(e.svc).rejected == 1, 5000, "rejected");
    cr_assert_eq(cpt_stats(e.svc).refused[CP_REFUSED_MAX_SESSIONS], 1);
    cpt_close(a);
    cpt_close(b);
    cpt_close(c);
    cpt_env_stop(&e);
}

/* n connects as fast as they go (from src, or from 127.0.0.2, .3, ... when
 * src is NULL), kept open; then waits until the server has dealt with each
 * (served or refused) and returns the seconds that took. */
static double storm(cpt_env *e, const char *src, int n, int *fds, cp_refusal cause, int base_connected)
{
    uint64_t t0 = cpt_now_ns();
    for (int i = 0; i < n; i++) {
        char a[32];
        if (!src)
            snprintf(a, sizeof a, "127.0.%d.%d", 1 + i / 200, 2 + i % 200);
        fds[i] = cpt_connect_from(src ? src : a, CPT_HOST4, e->sport);
        cr_assert_geq(fds[i], 0, "connect %d: %s", i, strerror(-fds[i]));
    }
    CPT_AWAIT((uint64_t)(atomic_load(&e->t->connected) - base_connected) + refused(e->svc, cause) ==
                  (uint64_t)n,
              10000, "every connect served or refused");
    return (double)(cpt_now_ns() - t0) / 1e9;
}

Test(addr_caps, accept_rate_per_addr_holds_under_a_burst)
{
    cpt_env e;
    cp_server_opts o = { .accept_rate_per_addr = 5 };
    cpt_env_start(&e, 2, &o, NULL, 128, 0);
    int fds[60];
    double secs = storm(&e, "127.0.0.2", 60, fds, CP_REFUSED_ADDR_RATE, 0);
    int served = atomic_load(&e.t->connected);
    /* A burst of 5, then 5 a second over however long the server took. */
    double most = 5 + 5 * secs + 1;
    cr_assert(served >= 5 && served <= most, "served %d of 60 in %.3f s (5 + 5/s allows %.1f)", served, secs,
              most);
    /* Another address has a rate of its own. */
    int other = xserved_from("127.0.0.3", e.sport);
    for (int i = 0; i < 60; i++)
        cpt_close(fds[i]);
    cpt_close(other);
    cpt_env_stop(&e);
}

Test(addr_caps, accept_rate_in_total_holds_under_a_storm)
{
    cpt_env e;
    cp_server_opts o = { .accept_rate = 20 };
    cpt_env_start(&e, 2, &o, NULL, 400, 0);
    enum { N = 300 };
    static int fds[N];
    double secs = storm(&e, NULL, N, fds, CP_REFUSED_RATE, 0);
    int served = atomic_load(&e.t->connected);
    double most = 20 + 20 * secs + 1;
    cr_assert(served >= 20 && served <= most, "served %d of %d from %d addresses in %.3f s (allowed %.1f)",
              served, N, N, secs, most);
    cr_assert_eq(refused(e.svc, CP_REFUSED_RATE), (uint64_t)(N - served));
    for (int i = 0; i < N; i++)
        cpt_close(fds[i]);
    cpt_env_stop(&e);
}

/* ::1 is one address (its /64): the cap counts IPv6 too. */
Test(addr_caps, sessions_per_addr_on_ipv6_loopback)
{
    cpt_env e;
    cp_server_opts o = { .host = CPT_HOST6, .max_sessions_per_addr = 2 };
    cpt_env_start(&e, 1, &o, NULL, 8, 0);
    int fd[3];
    for (int i = 0; i < 3; i++) {
        fd[i] = cpt_connect(CPT_HOST6, e.sport, 0);
        cr_assert_geq(fd[i], 0);
    }
    for (int i = 0; i < 2; i++) {
        cpt_xsend_packet(fd[i], 1, ping, sizeof ping);
        cpt_xrecv_packet_eq(fd[i], 1, ping, sizeof ping);
    }
    cpt_xclosed(fd[2], 5000);
    CPT_AWAIT(refused(e.svc, CP_REFUSED_PER_ADDR) == 1, 5000, "the third from ::1 refused");
    for (int i = 0; i < 3; i++)
        cpt_close(fd[i]);
    cpt_env_stop(&e);
}

/* ------------------------------------------------------------------ the key and the table */

static cp_addr_key key_of(const char *ip)
{
    cp_sockaddr a;
    memset(&a, 0, sizeof a);
    socklen_t len;
    if (inet_pton(AF_INET, ip, &a.v4.sin_addr) == 1) {
        a.v4.sin_family = AF_INET;
        len = sizeof a.v4;
    } else {
        cr_assert_eq(inet_pton(AF_INET6, ip, &a.v6.sin6_addr), 1, "%s", ip);
        a.v6.sin6_family = AF_INET6;
        len = sizeof a.v6;
    }
    cp_addr_key k;
    cr_assert(cp__addr_key(&a.sa, len, &k));
    return k;
}

static bool same(const char *a, const char *b)
{
    cp_addr_key x = key_of(a), y = key_of(b);
    return x.hi == y.hi && x.lo == y.lo;
}

Test(addr_caps, ipv6_grouped_by_64_and_mapped_ipv4_as_ipv4)
{
    cr_assert(same("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff"), "one /64");
    cr_assert(!same("2001:db8:1:2::1", "2001:db8:1:3::1"), "the next /64");
    cr_assert(same("::ffff:127.0.0.2", "127.0.0.2"), "IPv4-mapped is IPv4");
    cr_assert(!same("127.0.0.2", "127.0.0.3"), "IPv4 by /32");
    cr_assert(!same("::1", "127.0.0.1") && !same("::", "0.0.0.0"), "no IPv4 key is an IPv6 /64's");
}

/* An attacker spraying addresses fills the table with rate state only: it
 * stays bounded (max_sessions + 4096 entries), and the addresses that hold
 * sessions keep their counts. */
Test(addr_caps, table_bounded_under_an_address_spray)
{
    cp_addrcap *c;
    cr_assert_eq(cp__addrcap_new(&c, 1, 10, 0, 16), 0);
    uint64_t now = cp__now_ns();
    char ip[64];
    for (int i = 0; i < 16; i++) {
        snprintf(ip, sizeof ip, "10.0.0.%d", i);
        cr_assert_eq(cp__addrcap_admit(c, key_of(ip), now), -1);
    }
    size_t most = 0;
    for (int i = 0; i < 100000; i++) {
        snprintf(ip, sizeof ip, "2001:db8:%x:%x::1", i >> 16, i & 0xffff);
        cp_addr_key k = key_of(ip);
        cr_assert_eq(cp__addrcap_admit(c, k, now), -1);
        cp__addrcap_release(c, k); /* the rate state stays for a while */
        size_t n = cp__addrcap_entries(c);
        most = n > most ? n : most;
    }
    cr_assert(most <= 16 + 4096, "the table held %zu entries", most);
    for (int i = 0; i < 16; i++) {
        snprintf(ip, sizeof ip, "10.0.0.%d", i);
        cr_assert_eq(cp__addrcap_admit(c, key_of(ip), now), CP_REFUSED_PER_ADDR, "%s kept its session", ip);
        cp__addrcap_release(c, key_of(ip));
    }
    /* Once their rate state has run out (10/s: 1 s at most), entries go. */
    for (int i = 0; i < 16 + 4096 + 64; i++) {
        snprintf(ip, sizeof ip, "192.168.%d.%d", i >> 8, i & 255);
        cp_addr_key k = key_of(ip);
        cp__addrcap_admit(c, k, now + 2000000000u);
        cp__addrcap_release(c, k);
    }
    cr_assert_eq(cp__addrcap_admit(c, key_of("10.0.0.1"), now + 2000000000u), -1, "released counts are gone");
    cp__addrcap_free(c);
}
