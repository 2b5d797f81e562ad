/* SPDX-License-Identifier: MIT */
/*
 * Echo: byte-exact round trips in packet and raw framing, many connections
 * pipelining, large packets from several threads, peer names, counters.
 */
#include "helpers.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

Test(echo, single_round_trip, .timeout = 10)
{
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 4, 0);
    int fd = cpt_xconnect(e.sport);
    cpt_xsend_packet(fd, 42, "ping", 4);
    cpt_xrecv_packet_eq(fd, 42, "ping", 4);
    cpt_xsend_packet(fd, 43, NULL, 0);
    cpt_xrecv_packet_eq(fd, 43, NULL, 0);
    cpt_close(fd);
    CPT_AWAIT(atomic_load(&e.t->disconnected) == 1, 5000, "not disconnected");
    cr_assert_eq(atomic_load(&e.t->recs[0].reason), CP_REASON_PEER_CLOSED);
    cpt_env_stop(&e);
}

/* 200 connections each pipeline 50 packets of 64 bytes before reading any
 * reply; every reply is byte-exact and in order. */
Test(echo, pipelined_200_connections_64_bytes, .timeout = 60)
{
    enum { C = 200, P = 50, B = 64 };
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, C + 4, 0);
    int fds[C];
    uint8_t *out = malloc((size_t)P * (B + 4));
    for (int c = 0; c < C; c++) {
        fds[c] = cpt_xconnect(e.sport);
        for (int p = 0; p < P; p++) {
            uint8_t *q = out + (size_t)p * (B + 4);
            cpt_put_header(q, B + 4, (uint16_t)p);
            cpt_fill(q + 4, B, (uint64_t)p * B, (uint32_t)c);
        }
        cpt_xsend(fds[c], out, (size_t)P * (B + 4));
    }
    uint8_t *in = malloc((size_t)P * (B + 4));
    for (int c = 0; c < C; c++) {
        cpt_xrecv(fds[c], in, (size_t)P * (B + 4));
        for (int p = 0; p < P; p++) {
            uint8_t *q = out + (size_t)p * (B + 4);
            cpt_put_header(q, B + 4, (uint16_t)p);
            cpt_fill(q + 4, B, (uint64_t)p * B, (uint32_t)c);
        }
        cr_assert_eq(memcmp(in, out, (size_t)P * (B + 4)), 0, "connection %d: echo differs", c);
    }
    free(in);
    free(out);
    cpt_xsettle(e.svc, e.t);
    cp_service_stats st = cpt_stats(e.svc);
    cr_assert_eq(st.packets_in, (uint64_t)C * P);
    cr_assert_eq(st.bytes_in, (uint64_t)C * P * (B + 4), "bytes_in %llu", (unsigned long long)st.bytes_in);
    CPT_AWAIT(cpt_stats(e.svc).bytes_out == (uint64_t)C * P * (B + 4), 2000, "bytes_out %llu",
              (unsigned long long)cpt_stats(e.svc).bytes_out);
    for (int c = 0; c < C; c++)
        cpt_close(fds[c]);
    cpt_env_stop(&e);
}

typedef struct big_client {
    uint16_t port;
    int idx;
    int rounds;
    int bad;
    int rc;
} big_client;

static void *big_client_main(void *arg)
{
    big_client *bc = arg;
    enum { B = 16384 };
    int fd = cpt_connect(CPT_HOST4, bc->port, 0);
    if (fd < 0) {
        bc->rc = fd;
        return NULL;
    }
    uint8_t *out = malloc(B), *in = malloc(B);
    for (int r = 0; r < bc->rounds && !bc->rc; r++) {
        uint32_t seed = (uint32_t)(bc->idx * 1000 + r);
        cpt_fill(out, B, 0, seed);
        /* two packets in flight at once */
        if ((bc->rc = cpt_send_packet(fd, (uint16_t)r, out, B)) != 0)
            break;
        if ((bc->rc = cpt_send_packet(fd, (uint16_t)(r + 1000), out, B)) != 0)
            break;
        for (int k = 0; k < 2; k++) {
            uint16_t id;
            size_t len;
            if ((bc->rc = cpt_recv_packet(fd, &id, in, B, &len)) != 0)
                break;
            if (id != (uint16_t)(r + k * 1000) || len != B || cpt_check_pattern(in, B, 0, seed) != -1)
                bc->bad++;
        }
    }
    free(out);
    free(in);
    cpt_close(fd);
    return NULL;
}

/* 8 threads, each a connection exchanging 16 KiB packets (max_packet 65535). */
Test(echo, eight_threads_16k_packets, .timeout = 60)
{
    enum { T = 8 };
    cp_server_opts o = { .session.max_packet = 65535 };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, T + 4, 0);
    big_client bc[T];
    pthread_t th[T];
    for (int i = 0; i < T; i++) {
        bc[i] = (big_client){ .port = e.sport, .idx = i, .rounds = 64 };
        cr_assert_eq(pthread_create(&th[i], NULL, big_client_main, &bc[i]), 0);
    }
    for (int i = 0; i < T; i++) {
        pthread_join(th[i], NULL);
        cr_assert_eq(bc[i].rc, 0, "thread %d: %s", i, bc[i].rc == 1 ? "closed" : strerror(-bc[i].rc));
        cr_assert_eq(bc[i].bad, 0, "thread %d: %d bad echoes", i, bc[i].bad);
    }
    CPT_AWAIT(atomic_load(&e.t->disconnected) == T, 5000, "not all disconnected");
    cpt_env_stop(&e);
}

/* Raw framing: on_recv gets the bytes, echoes them, consumes all. Byte-exact
 * over 1 MiB sent in random-size pieces. */
Test(echo, raw_framing_byte_exact, .timeout = 30)
{
    cp_server_opts o = { .session.framing = CP_FRAMING_RAW };
    cpt_env e;
    cpt_env_start(&e, 2, &o, NULL, 4, CPT_RAW);
    int fd = cpt_xconnect(e.sport);
    const size_t total = 1u << 20;
    uint8_t *out = malloc(total), *in = malloc(total);
    cpt_fill(out, total, 0, 77);
    size_t off = 0;
    unsigned rnd = 1;
    while (off < total) {
        rnd = rnd * 1103515245u + 12345u;
        size_t n = 1 + (rnd >> 8) % 20000;
        if (n > total - off)
            n = total - off;
        cpt_xsend(fd, out + off, n);
        cpt_xrecv(fd, in + off, n);
        off += n;
    }
    cr_assert_eq(memcmp(in, out, total), 0);
    free(in);
    free(out);
    cpt_xsettle(e.svc, e.t);
    cr_assert_eq(cpt_stats(e.svc).bytes_in, total);
    cr_assert_eq(cpt_stats(e.svc).packets_in, 0, "raw framing counted packets");
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* Raw framing, partial consumption: on_recv consumes only whole 10-byte
 * records; the rest is offered again, in front of the next bytes. */
typedef struct rec10 {
    atomic_int calls, bad;
} rec10;

static size_t recv_records(cp_session *s, const uint8_t *data, size_t len)
{
    cpt_track *t = cp_session_ctx(s);
    rec10 *r = t->user;
    cpt_enter(s);
    atomic_fetch_add(&r->calls, 1);
    size_t whole = len - len % 10;
    for (size_t i = 0; i < whole; i += 10)
        if (data[i] != 'R')
            atomic_fetch_add(&r->bad, 1);
    if (whole)
        cp_session_send_copy(s, data, whole);
    cpt_leave(s);
    return whole;
}

Test(echo, raw_partial_consumption_offers_the_rest_again, .timeout = 20)
{
    rec10 r = { 0 };
    cp_server_opts o = { .session.framing = CP_FRAMING_RAW };
    cp_handlers h = cpt_track_handlers();
    h.on_packet = NULL;
    h.on_recv = recv_records;
    cpt_env e;
    cpt_env_start(&e, 2, &o, &h, 4, CPT_NO_ECHO);
    e.t->user = &r;
    int fd = cpt_xconnect(e.sport);
    char recs[101]; /* snprintf writes a terminator after the last record */
    for (int i = 0; i < 10; i++)
        snprintf(recs + i * 10, 11, "R%09d", i);
    cpt_xsend(fd, recs, 25); /* 2 whole records + 5 bytes */
    char got[100];
    cpt_xrecv(fd, got, 20);
    cr_assert_eq(memcmp(got, recs, 20), 0);
    cpt_xbytes_in(e.svc, 25);    /* the 5 bytes are kept: the rest comes in a read of its own */
    cpt_xsend(fd, recs + 25, 5); /* completes record 3 */
    cpt_xrecv(fd, got, 10);
    cr_assert_eq(memcmp(got, recs + 20, 10), 0, "the kept 5 bytes were not offered again in order");
    for (int i = 30; i < 100; i++) { /* byte by byte */
        cpt_xsend(fd, recs + i, 1);
        if ((i + 1) % 10 == 0) {
            cpt_xrecv(fd, got, 10);
            cr_assert_eq(memcmp(got, recs + i - 9, 10), 0);
        }
    }
    cr_assert_eq(atomic_load(&r.bad), 0);
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* The peer name of a session is the client's address. */
Test(echo, session_peer_names_the_client, .timeout = 10)
{
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 4, CPT_KEEP_REFS);
    int fd = cpt_xconnect(e.sport);
    CPT_AWAIT(atomic_load(&e.t->connected) == 1, 5000, "not connected");
    char buf[64], want[64];
    snprintf(want, sizeof want, "127.0.0.1:%u", cpt_local_port(fd));
    int n = cp_session_peer(e.t->recs[0].s, buf, sizeof buf);
    cr_assert_eq(n, (int)strlen(want), "cp_session_peer returned %d", n);
    cr_assert_str_eq(buf, want);
    /* A buffer too small: refused or truncated, never overrun. */
    memset(buf, 'S', sizeof buf);
    int small = cp_session_peer(e.t->recs[0].s, buf, 4);
    cr_assert(small < 0 || buf[3] == '\0' || memchr(buf, '\0', 4), "no terminator within 4 bytes");
    for (size_t i = 4; i < sizeof buf; i++)
        cr_assert_eq(buf[i], 'S', "cp_session_peer wrote past the 4-byte buffer");
    cpt_close(fd);
    cpt_env_stop(&e);
}

/* on_sent reports exactly the bytes written; bytes_out agrees. */
Test(echo, on_sent_accounts_every_byte, .timeout = 20)
{
    cpt_env e;
    cpt_env_start(&e, 2, NULL, NULL, 4, 0);
    int fd = cpt_xconnect(e.sport);
    uint8_t body[1000];
    long long expect = 0;
    for (int i = 0; i < 100; i++) {
        size_t len = (size_t)(i * 9) % sizeof body;
        cpt_fill(body, len, 0, (uint32_t)i);
        cpt_xsend_packet(fd, (uint16_t)i, body, len);
        cpt_xrecv_packet_eq(fd, (uint16_t)i, body, len);
        expect += (long long)len + 4;
    }
    CPT_AWAIT(atomic_load(&e.t->bytes_sent) == expect, 2000, "on_sent reported %lld of %lld bytes",
              atomic_load(&e.t->bytes_sent), expect);
    cr_assert_eq(cpt_stats(e.svc).bytes_out, (uint64_t)expect);
    cpt_close(fd);
    cpt_env_stop(&e);
}
