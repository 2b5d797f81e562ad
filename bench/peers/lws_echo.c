/* SPDX-License-Identifier: MIT */
/*
 * lws_echo — the libwebsockets echo peer: what a libwebsockets user writes
 * for an echo server, the way libwebsockets' own minimal example does
 * (minimal-examples/ws-server/minimal-ws-server-echo).
 *
 *   lws_echo --port P [--host H]
 *
 * One service thread. Every WebSocket upgrade (any path, no subprotocol, no
 * extension: permessage-deflate is not offered by the server) binds to the
 * echo protocol. Each piece of a message that lws hands to RECEIVE is copied
 * into a buffer with LWS_PRE bytes of headroom and queued on the connection's
 * lws_ring; on WRITEABLE the queue is written in order with lws_write, the
 * same opcode, first and final flags as received, so each message goes back
 * as it came. When the queue is nearly full, the connection stops reading
 * (lws_rx_flow_control) until it drains, as the example does.
 *
 * The event loop is lws's default, poll(), as in the example (the libuv and
 * libev plugins Debian ships were slower here, and their loops do not stop on
 * lws_cancel_service).
 *
 * Prints "listening on H:P (libwebsockets VERSION)" once ready;
 * exits 0 on SIGINT/SIGTERM; bad arguments print the usage and exit 2.
 */
#ifndef _GNU_SOURCE
#  define _GNU_SOURCE
#endif
#include <libwebsockets.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* echo at depth D needs D messages queued at most; the rest is slack */
#define RING_DEPTH 256

struct msg {
    unsigned char *payload; /* LWS_PRE of headroom, then len bytes */
    size_t len;
    int flags; /* lws_write_ws_flags: opcode, first and final */
};

struct pss {
    struct lws_ring *ring;
    uint32_t tail;
    int flow_controlled;
};

static volatile sig_atomic_t interrupted;
static struct lws_context *context;

static void msg_destroy(void *p)
{
    struct msg *m = p;
    free(m->payload);
    m->payload = NULL;
    m->len = 0;
}

static int on_writeable(struct lws *wsi, struct pss *pss)
{
    const struct msg *m;
    while ((m = lws_ring_get_element(pss->ring, &pss->tail)) != NULL) {
        /* the payload was allocated with LWS_PRE in front, as lws_write needs */
        int n = lws_write(wsi, m->payload + LWS_PRE, m->len, (enum lws_write_protocol)m->flags);
        if (n < (int)m->len) {
            lwsl_err("lws_echo: lws_write: %d of %zu\n", n, m->len);
            return -1;
        }
        lws_ring_consume_single_tail(pss->ring, &pss->tail, 1);
        if (lws_send_pipe_choked(wsi))
            break;
    }
    if (lws_ring_get_element(pss->ring, &pss->tail))
        lws_callback_on_writable(wsi);
    if (pss->flow_controlled && lws_ring_get_count_free_elements(pss->ring) > RING_DEPTH - 5) {
        lws_rx_flow_control(wsi, 1);
        pss->flow_controlled = 0;
    }
    return 0;
}

static int on_receive(struct lws *wsi, struct pss *pss, const void *in, size_t len)
{
    size_t free_n = lws_ring_get_count_free_elements(pss->ring);
    if (!free_n) {
        /* flow control stops reading long before this */
        lwsl_err("lws_echo: ring full\n");
        return -1;
    }
    struct msg m = {
        .len = len,
        .flags = lws_write_ws_flags(lws_frame_is_binary(wsi) ? LWS_WRITE_BINARY : LWS_WRITE_TEXT,
                                    lws_is_first_fragment(wsi), lws_is_final_fragment(wsi)),
    };
    m.payload = malloc(LWS_PRE + len);
    if (!m.payload)
        return -1;
    if (len)
        memcpy(m.payload + LWS_PRE, in, len);
    if (!lws_ring_insert(pss->ring, &m, 1)) {
        msg_destroy(&m);
        return -1;
    }
    lws_callback_on_writable(wsi);
    if (free_n < 3 && !pss->flow_controlled) {
        pss->flow_controlled = 1;
        lws_rx_flow_control(wsi, 0);
    }
    return 0;
}

static int callback_echo(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in, size_t len)
{
    struct pss *pss = user;
    switch (reason) {
    case LWS_CALLBACK_ESTABLISHED:
        pss->ring = lws_ring_create(sizeof(struct msg), RING_DEPTH, msg_destroy);
        pss->tail = 0;
        pss->flow_controlled = 0;
        return pss->ring ? 0 : -1;
    case LWS_CALLBACK_SERVER_WRITEABLE: return on_writeable(wsi, pss);
    case LWS_CALLBACK_RECEIVE: return on_receive(wsi, pss, in, len);
    case LWS_CALLBACK_CLOSED:
        lws_ring_destroy(pss->ring);
        pss->ring = NULL;
        return 0;
    default:
        /* the first protocol also serves plain HTTP: lws's own default answers */
        return lws_callback_http_dummy(wsi, reason, user, in, len);
    }
}

/* The first protocol is the one an upgrade without a subprotocol binds to. */
static const struct lws_protocols protocols[] = {
    { "lws-echo", callback_echo, sizeof(struct pss), 0, 0, NULL, 0 },
    { NULL, NULL, 0, 0, 0, NULL, 0 },
};

static void on_signal(int sig)
{
    (void)sig;
    interrupted = 1;
    /* wakes the service thread (a write to lws's event pipe) */
    if (context)
        lws_cancel_service(context);
}

static void usage(FILE *f)
{
    fprintf(f, "usage: lws_echo --port P [--host H]\n"
               "  one-thread libwebsockets echo server (benchmark peer)\n"
               "  --host H     address to bind (default: all)\n");
}

int main(int argc, char **argv)
{
    const char *host = NULL;
    long port = -1;
    static const struct option lo[] = {
        { "port", required_argument, NULL, 'p' },
        { "host", required_argument, NULL, 'H' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int o;
    while ((o = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        char *end;
        switch (o) {
        case 'p':
            port = strtol(optarg, &end, 10);
            if (*end || end == optarg || port < 1 || port > 65535) {
                usage(stderr);
                return 2;
            }
            break;
        case 'H': host = strcmp(optarg, "0.0.0.0") == 0 ? NULL : optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (port < 0 || optind != argc) {
        usage(stderr);
        return 2;
    }

    lws_set_log_level(LLL_ERR | LLL_WARN, NULL);
    struct lws_context_creation_info info;
    memset(&info, 0, sizeof info);
    info.port = (int)port;
    info.iface = host;
    info.protocols = protocols;
    info.pt_serv_buf_size = 32 * 1024; /* as the example: the service thread's read buffer */
    info.count_threads = 1;

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    context = lws_create_context(&info);
    if (!context) {
        fprintf(stderr, "lws_echo: lws_create_context failed (port %ld busy?)\n", port);
        return 1;
    }
    printf("listening on %s:%ld (libwebsockets %s)\n", host ? host : "0.0.0.0", port,
           lws_get_library_version());
    fflush(stdout);
    while (!interrupted && lws_service(context, 0) >= 0)
        ;
    lws_context_destroy(context);
    return 0;
}
