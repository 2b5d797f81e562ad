/* SPDX-License-Identifier: MIT */
/*
 * cport-server --metrics HOST:PORT: the library's metrics over HTTP.
 *
 *   GET /metrics  the Prometheus text format (version 0.0.4)
 *   GET /         a live page (tools/metrics.html) that polls /metrics
 *                 every second and charts the last five minutes
 *   anything else 404; every answer ends the connection
 *
 * The endpoint is one more cport service on the server's own port (raw
 * framing; llhttp, the parser the WebSocket upgrade uses, reads the
 * requests), not a thread of its own with plain sockets: it is then
 * portable as the library is (IOCP too) and needs no second event loop. A
 * scrape costs the workers a few hundred microseconds a second; its rounds
 * are in the loop metrics it reports, as any other work of the workers.
 * Included once, by cport-server.c.
 */
#ifndef CPORT_SERVER_METRICS_H
#define CPORT_SERVER_METRICS_H

#include "common.h"

/* What /metrics reports: the services (their label) and the port. */
#define METRICS_SERVICES 2
typedef struct metrics_src {
    cp_port *port;
    cp_service *svc[METRICS_SERVICES];
    const char *name[METRICS_SERVICES]; /* the service label: "tcp", "ws" */
    const char *mode, *backend;
} metrics_src;

#ifdef CP_HAVE_LLHTTP
#  include "metrics_page.h" /* generated from tools/metrics.html (CMakeLists.txt) */

#  include <llhttp.h>
#  include <stddef.h>

/* ------------------------------------------------------------------ text */

typedef struct mbuf {
    char *p;
    size_t n, cap;
    int failed; /* out of memory: the answer is a 500 */
} mbuf;

static void mbuf_printf(mbuf *b, const char *fmt, ...) __attribute__((format(TOOL_PRINTF, 2, 3)));
static void mbuf_printf(mbuf *b, const char *fmt, ...)
{
    for (;;) {
        if (b->failed)
            return;
        va_list ap;
        va_start(ap, fmt);
        int w = vsnprintf(b->p ? b->p + b->n : NULL, b->p ? b->cap - b->n : 0, fmt, ap);
        va_end(ap);
        if (w < 0) {
            b->failed = 1;
            return;
        }
        if (b->p && b->n + (size_t)w < b->cap) {
            b->n += (size_t)w;
            return;
        }
        size_t cap = b->cap ? b->cap * 2 : 16384;
        while (cap <= b->n + (size_t)w)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (p == NULL) {
            b->failed = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
}

/* A label value as the text format wants it: backslash, quote and newline escaped. */
static void mbuf_label(mbuf *b, const char *v)
{
    for (; *v; v++) {
        if (*v == '\\' || *v == '"')
            mbuf_printf(b, "\\%c", *v);
        else if (*v == '\n')
            mbuf_printf(b, "\\n");
        else
            mbuf_printf(b, "%c", *v);
    }
}

static void metric_head(mbuf *b, const char *name, const char *type, const char *help)
{
    mbuf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* One sample per worker of the uint64_t at offset off in its metrics: a
 * count, or (scale non-zero) a quantity times scale (1e-9: ns to s). */
static void worker_metric(mbuf *b, const char *name, const char *type, const char *help,
                          const cp_worker_metrics *wm, int nw, size_t off, double scale)
{
    metric_head(b, name, type, help);
    for (int w = 0; w < nw; w++) {
        uint64_t v;
        memcpy(&v, (const char *)&wm[w] + off, sizeof v);
        if (scale != 0)
            mbuf_printf(b, "%s{worker=\"%d\"} %.9f\n", name, w, (double)v * scale);
        else
            mbuf_printf(b, "%s{worker=\"%d\"} %llu\n", name, w, (unsigned long long)v);
    }
}

/* A histogram of the library's (cp_histogram) as a Prometheus one: the
 * buckets cumulative, each bound times scale (1e-9: nanoseconds to seconds). */
static void metric_histogram(mbuf *b, const char *name, const char *labels, const cp_histogram *h,
                             double scale)
{
    uint64_t cum = 0;
    for (int k = 0; k < CP_METRICS_BUCKETS - 1; k++) {
        cum += h->buckets[k];
        mbuf_printf(b, "%s_bucket{%s,le=\"%.10g\"} %llu\n", name, labels,
                    (double)cp_metrics_bucket_le(k) * scale, (unsigned long long)cum);
    }
    cum += h->buckets[CP_METRICS_BUCKETS - 1];
    mbuf_printf(b, "%s_bucket{%s,le=\"+Inf\"} %llu\n", name, labels, (unsigned long long)cum);
    mbuf_printf(b, "%s_sum{%s} %.10g\n", name, labels, (double)h->sum * scale);
    mbuf_printf(b, "%s_count{%s} %llu\n", name, labels, (unsigned long long)h->count);
}

/* Every field of cp_service_stats, by one line each here, but by_reason
 * and refused (labelled by their enums' strings below) and rejected (the
 * max sessions entry of refused): a field added to the struct is one more
 * line. Entries of one name are next to each other (the name's HELP and
 * TYPE come once). */
typedef struct stat_field {
    const char *name, *label, *type, *help;
    size_t off;
} stat_field;
#  define STAT(name, label, type, field, help)                                                               \
    {                                                                                                        \
      name, label, type, help, offsetof(cp_service_stats, field)                                             \
    }
static const stat_field stat_fields[] = {
    STAT("cport_sessions", NULL, "gauge", sessions, "Live sessions."),
    STAT("cport_accepted_total", NULL, "counter", accepted, "Connections accepted, refused or not."),
    STAT("cport_connected_total", NULL, "counter", connected, "Sessions connected (on_connected calls)."),
    STAT("cport_disconnected_total", NULL, "counter", disconnected,
         "Sessions disconnected (on_disconnected calls)."),
    STAT("cport_connect_failed_total", NULL, "counter", connect_failed, "Client connects that failed."),
    STAT("cport_accept_errors_total", NULL, "counter", accept_errors,
         "Accept failures (EMFILE, ENFILE, ENOBUFS...), each backoff once."),
    STAT("cport_received_bytes_total", NULL, "counter", bytes_in, "Bytes received."),
    STAT("cport_sent_bytes_total", NULL, "counter", bytes_out, "Bytes written to sockets."),
    STAT("cport_received_packets_total", NULL, "counter", packets_in, "Packets received (packet framing)."),
    STAT("cport_sent_packets_total", NULL, "counter", packets_out,
         "Buffers queued to send (packet framing: packets)."),
};
#  undef STAT

typedef struct svc_snap {
    cp_service_metrics m;
    uint64_t *routes;
} svc_snap;

static void metrics_render(const metrics_src *src, mbuf *b)
{
    svc_snap snap[METRICS_SERVICES];
    memset(snap, 0, sizeof snap);
    int n = 0;
    for (; n < METRICS_SERVICES && src->svc[n] != NULL; n++) {
        cp_service_metrics_get(src->svc[n], &snap[n].m, NULL, 0);
        if (snap[n].m.nroutes) {
            snap[n].routes = calloc(snap[n].m.nroutes, sizeof *snap[n].routes);
            if (snap[n].routes != NULL)
                cp_service_metrics_get(src->svc[n], &snap[n].m, snap[n].routes, snap[n].m.nroutes);
        }
    }
    metric_head(b, "cport_server_info", "gauge", "The server's mode and backend (always 1).");
    mbuf_printf(b, "cport_server_info{mode=\"%s\",backend=\"%s\"} 1\n", src->mode, src->backend);
    for (size_t f = 0; f < sizeof stat_fields / sizeof stat_fields[0]; f++) {
        const stat_field *sf = &stat_fields[f];
        if (f == 0 || strcmp(stat_fields[f - 1].name, sf->name) != 0)
            metric_head(b, sf->name, sf->type, sf->help);
        for (int i = 0; i < n; i++) {
            uint64_t v;
            memcpy(&v, (const char *)&snap[i].m.stats + sf->off, sizeof v);
            mbuf_printf(b, "%s{service=\"%s\"%s%s} %llu\n", sf->name, src->name[i], sf->label ? "," : "",
                        sf->label ? sf->label : "", (unsigned long long)v);
        }
    }
    metric_head(b, "cport_refused_total", "counter",
                "Connections closed at accept time, by cause (cp_refusal_str).");
    for (int i = 0; i < n; i++)
        for (int c = 0; c < CP_REFUSED_COUNT_; c++) {
            mbuf_printf(b, "cport_refused_total{service=\"%s\",cause=\"", src->name[i]);
            mbuf_label(b, cp_refusal_str((cp_refusal)c));
            mbuf_printf(b, "\"} %llu\n", (unsigned long long)snap[i].m.stats.refused[c]);
        }
    metric_head(b, "cport_disconnects_total", "counter", "Sessions disconnected, by reason (cp_reason_str).");
    for (int i = 0; i < n; i++)
        for (int r = 0; r < CP_REASON_COUNT_; r++) {
            mbuf_printf(b, "cport_disconnects_total{service=\"%s\",reason=\"", src->name[i]);
            mbuf_label(b, cp_reason_str((cp_reason)r));
            mbuf_printf(b, "\"} %llu\n", (unsigned long long)snap[i].m.stats.by_reason[r]);
        }
    metric_head(b, "cport_route_packets_total", "counter",
                "Packets received by route id; route=\"none\": ids without a route of their own.");
    for (int i = 0; i < n; i++) {
        for (uint32_t id = 0; snap[i].routes != NULL && id < snap[i].m.nroutes; id++)
            mbuf_printf(b, "cport_route_packets_total{service=\"%s\",route=\"%u\"} %llu\n", src->name[i], id,
                        (unsigned long long)snap[i].routes[id]);
        mbuf_printf(b, "cport_route_packets_total{service=\"%s\",route=\"none\"} %llu\n", src->name[i],
                    (unsigned long long)snap[i].m.unrouted_packets);
    }
    metric_head(b, "cport_send_queue_bytes", "histogram",
                "Live sessions by the memory their send queues hold now (a gauge histogram).");
    for (int i = 0; i < n; i++) {
        char labels[64];
        snprintf(labels, sizeof labels, "service=\"%s\"", src->name[i]);
        metric_histogram(b, "cport_send_queue_bytes", labels, &snap[i].m.send_queue, 1.0);
        free(snap[i].routes);
    }

    int nw = cp_port_workers(src->port);
    cp_worker_metrics *wm = calloc((size_t)nw, sizeof *wm);
    if (wm == NULL) {
        b->failed = 1;
        return;
    }
    for (int w = 0; w < nw; w++)
        (void)cp_port_metrics_get(src->port, w, &wm[w]);
    static const struct {
        const char *name, *help;
        size_t off;
    } hists[] = {
        { "cport_worker_round_seconds",
          "Worker rounds by duration, from the poll's return to the round's end.",
          offsetof(cp_worker_metrics, round_ns) },
        { "cport_worker_completion_wait_seconds",
          "Polls that found completions, by the longest those can have waited.",
          offsetof(cp_worker_metrics, wait_ns) },
        { "cport_job_wait_seconds",
          "Jobs by the time from their push to their start, on the worker that ran them.",
          offsetof(cp_worker_metrics, job_wait_ns) },
    };
    for (size_t h = 0; h < sizeof hists / sizeof hists[0]; h++) {
        metric_head(b, hists[h].name, "histogram", hists[h].help);
        for (int w = 0; w < nw; w++) {
            char labels[32];
            snprintf(labels, sizeof labels, "worker=\"%d\"", w);
            metric_histogram(b, hists[h].name, labels,
                             (const cp_histogram *)(const void *)((const char *)&wm[w] + hists[h].off), 1e-9);
        }
    }
    worker_metric(b, "cport_worker_inbox_messages", "gauge", "Messages sent to the worker and not run yet.",
                  wm, nw, offsetof(cp_worker_metrics, inbox_depth), 0);
    worker_metric(b, "cport_worker_timers", "gauge",
                  "Timers armed on the worker at the end of its last round.", wm, nw,
                  offsetof(cp_worker_metrics, timers_armed), 0);
    metric_head(b, "cport_worker_recv_buffers", "gauge",
                "io_uring receive buffers of the worker by state: free, held for paused sessions, lent to "
                "forwarded send buffers, or in use.");
    for (int w = 0; w < nw; w++) {
        unsigned long long all = wm[w].recv_bufs, fr = wm[w].recv_bufs_free, held = wm[w].recv_bufs_held,
                           lent = wm[w].recv_bufs_lent;
        mbuf_printf(b, "cport_worker_recv_buffers{worker=\"%d\",state=\"free\"} %llu\n", w, fr);
        mbuf_printf(b, "cport_worker_recv_buffers{worker=\"%d\",state=\"held\"} %llu\n", w, held);
        mbuf_printf(b, "cport_worker_recv_buffers{worker=\"%d\",state=\"lent\"} %llu\n", w, lent);
        mbuf_printf(b, "cport_worker_recv_buffers{worker=\"%d\",state=\"in_use\"} %llu\n", w,
                    all >= fr + held + lent ? all - fr - held - lent : 0);
    }
    worker_metric(b, "cport_worker_fanout_pauses_total", "counter",
                  "Pauses the worker made after rounds that fanned out (broadcasts), so that its next writes "
                  "carry more.",
                  wm, nw, offsetof(cp_worker_metrics, fanout_pauses), 0);
    worker_metric(b, "cport_worker_fanout_pause_seconds_total", "counter",
                  "Time the worker spent in those pauses.", wm, nw,
                  offsetof(cp_worker_metrics, fanout_pause_ns), 1e-9);
    free(wm);
}

/* ------------------------------------------------------------------ HTTP */

/* A request larger than this is refused (431). */
#  define METRICS_REQUEST_MAX 8192
/* An answered connection is shut down gracefully within this. */
#  define METRICS_LINGER_MS 2000

typedef struct http_conn {
    llhttp_t p;
    char url[256];
    size_t url_len, seen;
    int url_long, done, answered;
} http_conn;

static llhttp_settings_t http_settings;

static int http_on_url(llhttp_t *p, const char *at, size_t n)
{
    http_conn *c = (http_conn *)(void *)p;
    if (c->url_len + n >= sizeof c->url) {
        c->url_long = 1;
        return 0;
    }
    memcpy(c->url + c->url_len, at, n);
    c->url_len += n;
    c->url[c->url_len] = '\0';
    return 0;
}

static int http_on_complete(llhttp_t *p)
{
    ((http_conn *)(void *)p)->done = 1;
    return HPE_PAUSED; /* one request per connection: the rest is not read */
}

static void http_answer(cp_session *s, int status, const char *type, const char *body, size_t len)
{
    static const struct {
        int code;
        const char *text;
    } texts[] = { { 200, "OK" },
                  { 400, "Bad Request" },
                  { 404, "Not Found" },
                  { 405, "Method Not Allowed" },
                  { 431, "Request Header Fields Too Large" },
                  { 500, "Internal Server Error" } };
    const char *text = "Error";
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++)
        if (texts[i].code == status)
            text = texts[i].text;
    mbuf out = { 0 };
    mbuf_printf(&out,
                "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nCache-Control: no-store\r\n"
                "Connection: close\r\n\r\n",
                status, text, type, len);
    if (!out.failed && out.n + len + 1 > out.cap) {
        char *p = realloc(out.p, out.n + len + 1);
        if (p == NULL)
            out.failed = 1;
        else
            out.p = p, out.cap = out.n + len + 1;
    }
    if (!out.failed) {
        memcpy(out.p + out.n, body, len);
        out.n += len;
        (void)cp_session_send_copy(s, out.p, out.n);
    }
    free(out.p);
    (void)cp_session_shutdown(s, METRICS_LINGER_MS);
}

static void http_respond(cp_session *s, http_conn *c)
{
    static const char text[] = "text/plain; charset=utf-8";
    const metrics_src *src = cp_session_ctx(s);
    int method = (int)llhttp_get_method(&c->p);
    char *q = strchr(c->url, '?');
    if (q != NULL)
        *q = '\0';
    if (method != HTTP_GET && method != HTTP_HEAD) {
        http_answer(s, 405, text, "GET only\n", 9);
    } else if (!c->url_long && strcmp(c->url, "/metrics") == 0) {
        mbuf b = { 0 };
        metrics_render(src, &b);
        if (b.failed)
            http_answer(s, 500, text, "out of memory\n", 14);
        else
            http_answer(s, 200, "text/plain; version=0.0.4; charset=utf-8", b.p,
                        method == HTTP_HEAD ? 0 : b.n);
        free(b.p);
    } else if (!c->url_long && strcmp(c->url, "/") == 0) {
        http_answer(s, 200, "text/html; charset=utf-8", metrics_page,
                    method == HTTP_HEAD ? 0 : strlen(metrics_page));
    } else {
        http_answer(s, 404, text, "not found\n", 10);
    }
}

static void http_on_connected(cp_session *s)
{
    http_conn *c = calloc(1, sizeof *c);
    if (c == NULL) {
        cp_session_disconnect(s);
        return;
    }
    llhttp_init(&c->p, HTTP_REQUEST, &http_settings);
    cp_session_set_data(s, c);
}

static size_t http_on_recv(cp_session *s, const uint8_t *data, size_t len)
{
    http_conn *c = cp_session_data(s);
    if (c == NULL || c->answered)
        return len; /* read and dropped until the peer's FIN */
    c->seen += len;
    llhttp_errno_t e = llhttp_execute(&c->p, (const char *)data, len);
    if (c->done) {
        c->answered = 1;
        http_respond(s, c);
    } else if (e != HPE_OK) {
        c->answered = 1;
        http_answer(s, 400, "text/plain; charset=utf-8", "bad request\n", 12);
    } else if (c->seen > METRICS_REQUEST_MAX) {
        c->answered = 1;
        http_answer(s, 431, "text/plain; charset=utf-8", "request too large\n", 18);
    }
    return len;
}

static void http_on_disconnected(cp_session *s, cp_reason reason, int err)
{
    (void)reason, (void)err;
    free(cp_session_data(s));
    cp_session_set_data(s, NULL);
}

/* Starts the endpoint on host:port of port; *out is its service. 0 or a
 * negative errno. */
static int metrics_start(cp_port *port, const char *host, uint16_t listen_port, metrics_src *src,
                         cp_service **out)
{
    llhttp_settings_init(&http_settings);
    http_settings.on_url = http_on_url;
    http_settings.on_message_complete = http_on_complete;
    cp_handlers h = { .on_connected = http_on_connected,
                      .on_disconnected = http_on_disconnected,
                      .on_recv = http_on_recv };
    cp_server_opts o = {
        .host = host,
        .port = listen_port,
        .max_sessions = 64,
        .session = { .framing = CP_FRAMING_RAW, .idle_timeout_ms = 10000, .send_queue_limit = 16u << 20 },
    };
    return cp_server_start(out, port, &o, &h, src);
}

#else

static int metrics_start(cp_port *port, const char *host, uint16_t listen_port, metrics_src *src,
                         cp_service **out)
{
    (void)port, (void)host, (void)listen_port, (void)src, (void)out;
    return -ENOTSUP; /* built without llhttp (Debian: node-llhttp) */
}

#endif /* CP_HAVE_LLHTTP */

#endif /* CPORT_SERVER_METRICS_H */
