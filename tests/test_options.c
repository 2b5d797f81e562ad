/* SPDX-License-Identifier: MIT */
/*
 * Service options that cannot work are refused at start with -EINVAL (and
 * leave nothing behind: the port can be destroyed right after); each refusal
 * is paired with the nearest setting that works, so a test fails if the
 * check is missing or if it refuses too much.
 */
#include "helpers.h"

#include <errno.h>
#include <string.h>

static int route_fn(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    (void)s, (void)id, (void)body, (void)len;
    return 0;
}

static size_t recv_fn(cp_session *s, const uint8_t *data, size_t len)
{
    (void)s, (void)data;
    return len;
}

/* Starts a server on 127.0.0.1 with opts and h; stops it again if it
 * started. Returns what cp_server_start returned. */
static int try_server(cp_port *port, cp_server_opts o, cp_handlers h)
{
    if (!o.host)
        o.host = CPT_HOST4;
    cp_service *svc = (cp_service *)&o;
    int rc = cp_server_start(&svc, port, &o, &h, NULL);
    if (rc == 0)
        cpt_xstop(svc);
    else
        cr_assert_null(svc, "a refused start left *out set");
    return rc;
}

static int try_client(cp_port *port, cp_client_opts o, cp_handlers h)
{
    cp_service *svc = (cp_service *)&o;
    int rc = cp_client_start(&svc, port, &o, &h, NULL);
    if (rc == 0)
        cpt_xstop(svc);
    else
        cr_assert_null(svc, "a refused start left *out set");
    return rc;
}

static const cp_handlers packet_h = { .on_packet = route_fn };
static const cp_handlers raw_h = { .on_recv = recv_fn };

Test(options, raw_framing_needs_on_recv, .timeout = 20)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(1);
    cp_server_opts o = { .session.framing = CP_FRAMING_RAW };
    cr_expect_eq(try_server(port, o, packet_h), -EINVAL, "raw framing without on_recv was accepted");
    cr_expect_eq(try_server(port, o, raw_h), 0);
    cp_client_opts c = { .host = CPT_HOST4, .port = 9, .session.framing = CP_FRAMING_RAW };
    cr_expect_eq(try_client(port, c, packet_h), -EINVAL, "a raw client without on_recv was accepted");
    cr_expect_eq(try_client(port, c, raw_h), 0);
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

Test(options, raw_framing_takes_no_routes, .timeout = 20)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(1);
    cp_route routes[] = { { 1, route_fn } };
    cp_server_opts o = { .session.framing = CP_FRAMING_RAW, .session.routes = routes, .session.nroutes = 1 };
    cr_expect_eq(try_server(port, o, raw_h), -EINVAL, "routes that raw framing never calls were accepted");
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

Test(options, routes_need_a_handler_and_distinct_ids, .timeout = 20)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(1);
    cp_route dup[] = { { 5, route_fn }, { 6, route_fn }, { 5, route_fn } };
    cp_route empty[] = { { 5, route_fn }, { 6, NULL } };
    cp_route fine[] = { { 5, route_fn }, { 6, route_fn }, { 65535, route_fn } };
    cp_server_opts o = { .session.routes = dup, .session.nroutes = 3 };
    cr_expect_eq(try_server(port, o, packet_h), -EINVAL, "a route id given twice was accepted");
    o.session.routes = empty;
    o.session.nroutes = 2;
    cr_expect_eq(try_server(port, o, packet_h), -EINVAL, "a route without a handler was accepted");
    o.session.routes = NULL;
    o.session.nroutes = 1;
    cr_expect_eq(try_server(port, o, packet_h), -EINVAL, "nroutes without routes was accepted");
    o.session.routes = fine;
    o.session.nroutes = 3;
    cr_expect_eq(try_server(port, o, packet_h), 0);
    cp_client_opts c = { .host = CPT_HOST4, .port = 9, .session.routes = dup, .session.nroutes = 3 };
    cr_expect_eq(try_client(port, c, packet_h), -EINVAL, "a client with a route id given twice was accepted");
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

Test(options, max_packet_between_4_and_65535, .timeout = 20)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(1);
    cp_server_opts o = { 0 };
    uint32_t bad[] = { 1, 3, 65536, 70000, UINT32_MAX };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        o.session.max_packet = bad[i];
        cr_expect_eq(try_server(port, o, packet_h), -EINVAL, "max_packet %u was accepted", bad[i]);
    }
    uint32_t good[] = { 0, 4, 65535 };
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        o.session.max_packet = good[i];
        cr_expect_eq(try_server(port, o, packet_h), 0, "max_packet %u was refused", good[i]);
    }
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

Test(options, packet_send_queue_holds_the_largest_packet, .timeout = 20)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(1);
    cp_server_opts o = { .session.max_packet = 8192, .session.send_queue_limit = 8191 };
    cr_expect_eq(try_server(port, o, packet_h), -EINVAL, "a send queue smaller than max_packet was accepted");
    o.session.send_queue_limit = 8192;
    cr_expect_eq(try_server(port, o, packet_h), 0);
    /* Against the default max_packet (4096). */
    o.session.max_packet = 0;
    o.session.send_queue_limit = 1000;
    cr_expect_eq(try_server(port, o, packet_h), -EINVAL);
    /* Raw framing has no packets: any limit works. */
    o.session.framing = CP_FRAMING_RAW;
    cr_expect_eq(try_server(port, o, raw_h), 0);
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

Test(options, framing_must_be_known, .timeout = 20)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(1);
    cp_server_opts o = { .session.framing = (cp_framing)7 };
    cr_expect_eq(try_server(port, o, packet_h), -EINVAL);
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

Test(options, server_backlog_and_accepts_in_range, .timeout = 20)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(1);
    cp_server_opts o = { .backlog = -1 };
    cr_expect_eq(try_server(port, o, packet_h), -EINVAL, "a negative backlog was accepted");
    o = (cp_server_opts){ .accepts = -1 };
    cr_expect_eq(try_server(port, o, packet_h), -EINVAL, "negative accepts were accepted");
    o = (cp_server_opts){ .accepts = 65536 };
    cr_expect_eq(try_server(port, o, packet_h), -EINVAL);
    o = (cp_server_opts){ .backlog = 1, .accepts = 1 };
    cr_expect_eq(try_server(port, o, packet_h), 0);
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

Test(options, client_needs_a_port_a_host_and_room_for_its_sessions, .timeout = 20)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(1);
    cp_client_opts c = { .host = CPT_HOST4, .port = 0 };
    cr_expect_eq(try_client(port, c, packet_h), -EINVAL, "a client towards port 0 was accepted");
    c = (cp_client_opts){ .host = NULL, .port = 9 };
    cr_expect_eq(try_client(port, c, packet_h), -EINVAL, "a client without a host was accepted");
    c = (cp_client_opts){ .host = "", .port = 9 };
    cr_expect_eq(try_client(port, c, packet_h), -EINVAL);
    c = (cp_client_opts){ .host = CPT_HOST4, .port = 9, .sessions = 5, .max_sessions = 4 };
    cr_expect_eq(try_client(port, c, packet_h), -EINVAL, "more sessions than max_sessions was accepted");
    c = (cp_client_opts){ .host = CPT_HOST4, .port = 9 };
    cr_expect_eq(try_client(port, c, packet_h), 0);
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}

Test(options, missing_arguments, .timeout = 20)
{
    cp_port *port = cpt_xport(1);
    cp_service *svc;
    cp_server_opts o = { .host = CPT_HOST4 };
    cr_expect_eq(cp_server_start(&svc, port, &o, NULL, NULL), -EINVAL);
    cr_expect_eq(cp_server_start(&svc, NULL, &o, &packet_h, NULL), -EINVAL);
    cr_expect_eq(cp_server_start(&svc, port, NULL, &packet_h, NULL), -EINVAL);
    cr_expect_eq(cp_server_start(NULL, port, &o, &packet_h, NULL), -EINVAL);
    cpt_xport_destroy(port);
}

/* Flow control (send-queue watermarks, receive rate limits): settings that
 * cannot mean anything are refused, each next to the nearest that works. */
Test(options, flow_control_settings_must_make_sense, .timeout = 20)
{
    cpt_leak_mark m;
    cpt_leak_begin(&m);
    cp_port *port = cpt_xport(1);
    cp_server_opts o = { .session.send_queue_limit = 1u << 20, .session.send_queue_high = (1u << 20) + 1 };
    cr_expect_eq(try_server(port, o, packet_h), -EINVAL, "a high watermark above the limit was accepted");
    o.session.send_queue_high = 1u << 20;
    cr_expect_eq(try_server(port, o, packet_h), 0);
    /* The low watermark must be below the high one, given or by default. */
    o.session.send_queue_high = 4096;
    o.session.send_queue_low = 4096;
    cr_expect_eq(try_server(port, o, packet_h), -EINVAL,
                 "a low watermark equal to the high one was accepted");
    o.session.send_queue_low = 4095;
    cr_expect_eq(try_server(port, o, packet_h), 0);
    o = (cp_server_opts){ .session.send_queue_low = 512u << 10 };
    cr_expect_eq(try_server(port, o, packet_h), -EINVAL,
                 "a low watermark at the default high one was accepted");
    o.session.send_queue_low = (512u << 10) - 1;
    cr_expect_eq(try_server(port, o, packet_h), 0);
    /* A burst without its rate. */
    o = (cp_server_opts){ .session.recv_burst_packets = 10 };
    cr_expect_eq(try_server(port, o, packet_h), -EINVAL, "a packet burst without a packet rate was accepted");
    o.session.recv_rate_packets = 5;
    cr_expect_eq(try_server(port, o, packet_h), 0);
    o = (cp_server_opts){ .session.recv_burst_bytes = 1000 };
    cr_expect_eq(try_server(port, o, packet_h), -EINVAL, "a byte burst without a byte rate was accepted");
    o.session.recv_rate_bytes = 500;
    cr_expect_eq(try_server(port, o, packet_h), 0);
    /* Raw framing has no packets to count, only bytes. */
    o = (cp_server_opts){ .session.framing = CP_FRAMING_RAW, .session.recv_rate_packets = 100 };
    cr_expect_eq(try_server(port, o, raw_h), -EINVAL, "a packet rate limit with raw framing was accepted");
    o.session.recv_rate_packets = 0;
    o.session.recv_rate_bytes = 100000;
    cr_expect_eq(try_server(port, o, raw_h), 0);
    /* The same checks hold for clients. */
    cp_client_opts c = { .host = CPT_HOST4, .port = 9, .session.recv_burst_packets = 10 };
    cr_expect_eq(try_client(port, c, packet_h), -EINVAL,
                 "a client's packet burst without a rate was accepted");
    cpt_xport_destroy(port);
    cpt_leak_end(&m);
}
