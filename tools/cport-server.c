/* SPDX-License-Identifier: MIT */
/*
 * cport-server — a ready-to-run cport server for tests, demos and stress runs.
 *
 *   echo    raw bytes: whatever arrives is sent straight back
 *   packet  {u16 size, u16 id} packets: every packet is sent back unchanged
 *   chat    packets: every session joins one room; every packet is broadcast,
 *           unchanged, to every session in the room, the sender included. The
 *           room is a job queue: join, leave and broadcast are its jobs, run
 *           one at a time, so no lock guards its member list. With --bus,
 *           the room spans every server on the same bus with the same
 *           --room: it is then a cp_group bridged to the subject
 *           "room.NAME" (cp_group_bridge), and each sender's order is kept
 *           across servers too.
 *
 * It prints one line when it listens and one stats line when SIGINT/SIGTERM
 * (Windows: Ctrl-C, Ctrl-Break, closing the console) stops it. Exit status: 0
 * after a clean stop, 1 on a runtime failure, 2 for a bad command line or a
 * backend that is not available.
 */
#include "common.h"
#include "server_metrics.h" /* --metrics: the HTTP endpoint and its page */
#include "ws_chat_page.h"   /* generated from tools/ws_chat.html (CMakeLists.txt) */

#include <stdarg.h>
#include <stdatomic.h>

static const char *const prog = "cport-server";

typedef enum server_mode { MODE_ECHO, MODE_PACKET, MODE_CHAT } server_mode;
static const char *const mode_names[] = { "echo", "packet", "chat" };

typedef struct server_config {
    const char *host;
    uint16_t port;
    server_mode mode;
    cp_backend backend;
    int workers;
    int fanout_pause_pct; /* cp_port_opts: 0 = the library's default, -1 = off */
    uint32_t max_sessions;
    uint32_t max_packet;
    size_t send_queue_limit;
    uint32_t idle_timeout_ms;
    uint32_t packet_timeout_ms;
    uint32_t first_packet_ms;         /* no whole packet this long after connecting: cut */
    uint32_t keepalive_ms;            /* TCP keepalive: idle this long, then probes */
    uint32_t user_timeout_ms;         /* TCP_USER_TIMEOUT */
    int64_t rate_limit;               /* packets/s per session; -1 = the mode's default */
    cp_route_limit route_limits[254]; /* --route-rate, as many as cp_session_opts takes */
    size_t nroute_limits;
    uint32_t flood_ms;              /* --flood: held back this long without a break: cut */
    const char *bus_url;            /* chat across servers: nats://... or redis://...; NULL = off */
    const char *room;               /* the room's name on the bus */
    const char *tls_cert, *tls_key; /* both: the listener speaks TLS */
    int ws_port;                    /* a WebSocket listener on this port too; -1 = none */
    uint32_t max_per_ip;            /* live sessions per source address; 0 = off */
    uint32_t accept_rate_per_ip;    /* new connections a second per source address; 0 = off */
    uint32_t accept_rate;           /* new connections a second in all; 0 = off */
    bool proxy_protocol;            /* every connection begins with a PROXY header */
    const char *proxy_trusted;      /* the proxies' ranges (CIDRs, comma-separated) */
    bool verbose;                   /* a line per connection, with the peer's address */
    int reuseport;                  /* SO_REUSEPORT: a new server may share the port */
    uint32_t drain_ms;              /* stop signal: drain sessions this long; 0 = hard stop */
    char metrics_host[64];          /* --metrics HOST:PORT; metrics_port -1 = off */
    int metrics_port;
} server_config;

/* The chat room. Only its own jobs touch members, and they never run two at a
 * time, so the list needs no lock. Each member is referenced by the room from
 * its join job to its leave job. */
typedef struct chat_room {
    cp_jobq *q;
    cp_session **members;
    size_t n, cap;
} chat_room;

/* The one chat room of this process. */
static chat_room the_room;

/* Everything the callbacks share: handed to cp_server_start as the service ctx. */
typedef struct server_state {
    chat_room *room; /* chat mode only: &the_room */
    cp_group *group; /* chat mode with --bus: the room, bridged */
    bool verbose;    /* --verbose */
    /* Counted here rather than read from cp_service_stats because the final
     * line is printed after cp_service_stop has freed the service, and it must
     * include the sessions that the stop itself disconnected. */
    atomic_uint_fast64_t connected;
    atomic_uint_fast64_t disconnected;
    atomic_uint_fast64_t by_reason[CP_REASON_COUNT_];
    atomic_uint_fast64_t stop_cut; /* CP_REASON_STOPPING with an error: the drain's deadline */
} server_state;

/* The WebSocket listener: the same handlers, room and options as the main
 * port (so over TLS too when it is), on cfg->ws_port. */
static int ws_listen(const server_config *cfg, cp_port *port, const cp_server_opts *main_opts,
                     const cp_handlers *h, server_state *state, cp_service **out)
{
    cp_ws *ws = NULL;
    cp_ws_opts wo = { .page = ws_chat_page }; /* GET / without an upgrade: the room in a browser */
    int rc = cp_ws_create(&ws, &wo);
    if (rc != 0) {
        fprintf(stderr, "%s: cannot set up WebSocket: %s\n", prog, cp_strerror(rc));
        return rc;
    }
    cp_server_opts o = *main_opts;
    o.port = (uint16_t)cfg->ws_port;
    o.session.ws = ws;
    rc = cp_server_start(out, port, &o, h, state);
    cp_ws_unref(ws); /* the service keeps its own */
    if (rc != 0)
        fprintf(stderr, "%s: cannot listen for WebSocket on %s:%d: %s\n", prog, cfg->host, cfg->ws_port,
                cp_strerror(rc));
    return rc;
}

static void usage(FILE *out)
{
    fprintf(out,
            "usage: %s [options]\n"
            "  --host H              address to listen on (default 0.0.0.0)\n"
            "  --port P              TCP port, 0 picks a free one (default 7777)\n"
            "  --mode M              echo | packet | chat (default echo)\n"
            "  --backend B           " TOOL_BACKEND_CHOICES " (default auto)\n"
            "  --workers N           worker threads, 0 = one per CPU (default 0)\n"
            "  --fanout-pause PCT    a worker busy with broadcasts pauses PCT%% of the CPU\n"
            "                        time of a round before its next poll, so that its\n"
            "                        writes carry more: 1..100, or off (default 25 on\n"
            "                        epoll, 50 on io_uring)\n"
            "  --max-sessions M      live sessions at most (default 10000)\n"
            "  --max-packet B        largest packet in bytes, header included, 4..65535\n"
            "                        (default 4096)\n"
            "  --send-queue-limit B  memory a session's send queue may hold before it\n"
            "                        is disconnected; k/m/g suffixes allowed (default 1M)\n"
            "  --idle-timeout MS     disconnect a session that sent nothing for MS (0 = off)\n"
            "  --packet-timeout MS   disconnect a session whose packet stays unfinished\n"
            "                        for MS (0 = off)\n"
            "  --first-packet-timeout MS\n"
            "                        disconnect a session that sent no whole packet\n"
            "                        within MS of connecting (a login; 0 = off)\n"
            "  --keepalive MS        probe a connection silent for MS (TCP keepalive, 3\n"
            "                        probes 1 s apart): a peer that vanished without a\n"
            "                        FIN is cut (0 = off, the default)\n"
            "  --user-timeout MS     cut a peer that leaves sent data unacknowledged for\n"
            "                        MS (TCP_USER_TIMEOUT; 0 = off, the default)\n"
            "  --rate-limit N        packets a second a session may send, on average,\n"
            "                        with bursts of 2N; more are not read until it is\n"
            "                        back under (TCP pushes back on it); 0 = off\n"
            "                        (default 1000 in chat mode, else 0; not in echo mode)\n"
            "  --route-rate ID:RATE[:BURST]\n"
            "                        packets a second a session may send with packet id\n"
            "                        ID (0..65535), with bursts of BURST (default 2*RATE),\n"
            "                        beside --rate-limit; more wait unread, in order, as\n"
            "                        with --rate-limit. Repeatable, one per id (e.g.\n"
            "                        --route-rate 10:5 --route-rate 11:30); not in echo mode\n"
            "  --flood MS            disconnect a session held back by --rate-limit or a\n"
            "                        --route-rate without a break for MS (reason \"flood\":\n"
            "                        a flooder; an honest burst is calm again once drained);\n"
            "                        needs a rate limit (0 = off, the default)\n"
            "  --bus URL             chat mode: one room across every server on this bus,\n"
            "                        nats://host:port[,host:port...] or redis://host:port\n"
            "  --room NAME           the room's name on the bus: letters, digits, '-', '_'\n"
            "                        (default lobby)\n"
            "  --tls-cert FILE       PEM certificate chain: the listener speaks TLS\n"
            "  --tls-key FILE        PEM private key of --tls-cert (both or neither)\n"
            "  --ws-port P           also listen for WebSocket clients on port P (0 picks a\n"
            "                        free one), same mode and room; wss with --tls-cert\n"
            "  --max-per-ip N        live sessions from one address at most (IPv6: one\n"
            "                        /64); more are closed at once and counted (0 = off)\n"
            "  --accept-rate-per-ip N\n"
            "                        new connections a second from one address, bursts\n"
            "                        of N; more are closed at once and counted (0 = off)\n"
            "  --accept-rate N       new connections a second in all, bursts of N (0 = off)\n"
            "  --proxy-protocol      every connection begins with a PROXY header (v1 or v2,\n"
            "                        HAProxy's send-proxy / send-proxy-v2): sessions get\n"
            "                        the client's address, and the caps above count it;\n"
            "                        needs --proxy-trusted\n"
            "  --proxy-trusted CIDR[,CIDR...]\n"
            "                        the proxies' addresses (e.g. 10.0.0.0/8,::1/128);\n"
            "                        connections from elsewhere are refused\n"
            "  --verbose             print a line per connection with the peer's address\n"
            "  --reuseport           share the port with another server (SO_REUSEPORT;\n"
            "                        Linux): start a new one, then stop this one with\n"
            "                        --drain for a restart that refuses no connection\n"
            "                        (set net.ipv4.tcp_migrate_req=1, see the README)\n"
            "  --drain MS            on SIGINT/SIGTERM stop accepting, let sessions\n"
            "                        finish what is queued and close gracefully within\n"
            "                        MS, then exit (0 = close them at once, the default)\n"
            "  --metrics HOST:PORT   serve metrics over HTTP on HOST:PORT ([::1]:PORT for\n"
            "                        IPv6; port 0 picks a free one): /metrics in the\n"
            "                        Prometheus text format, / a live page (off by default)\n"
            "  --help                show this text\n",
            prog);
}

/* Prints what was wrong, then the usage, and exits with status 2. */
static void usage_error(const char *fmt, ...) __attribute__((format(TOOL_PRINTF, 1, 2), noreturn));
static void usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    tool_usage_vexit(prog, usage, fmt, ap);
    /* cppcheck-suppress va_end_missing ; tool_usage_vexit does not return (noreturn) */
}

static int room_name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 64)
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') || *s == '-' ||
              *s == '_'))
            return 0;
    return 1;
}

/* One range: an address, or an address and a prefix length no longer than
 * its family's, with no bit set past the prefix (the library's rule). */
static int cidr_ok(const char *s, size_t n)
{
    char buf[INET6_ADDRSTRLEN + 8];
    if (n == 0 || n >= sizeof buf)
        return 0;
    memcpy(buf, s, n);
    buf[n] = '\0';
    char *slash = strchr(buf, '/');
    uint64_t bits = UINT64_MAX;
    if (slash) {
        *slash = '\0';
        if (tool_parse_u64(slash + 1, 0, 128, 0, &bits) != 0)
            return 0;
    }
    unsigned char a[16];
    unsigned max;
    if (inet_pton(AF_INET, buf, a) == 1)
        max = 32;
    else if (inet_pton(AF_INET6, buf, a) == 1)
        max = 128;
    else
        return 0;
    if (bits == UINT64_MAX)
        return 1;
    if (bits > max)
        return 0;
    for (unsigned i = (unsigned)bits; i < max; i++)
        if (a[i / 8] & (0x80 >> (i % 8)))
            return 0;
    return 1;
}

static int cidr_list_ok(const char *s)
{
    for (;;) {
        const char *e = strchr(s, ',');
        size_t n = e ? (size_t)(e - s) : strlen(s);
        if (!cidr_ok(s, n))
            return 0;
        if (!e)
            return 1;
        s = e + 1;
    }
}

/* HOST:PORT or [HOST]:PORT into host (at most size - 1 bytes) and *port;
 * -1 if malformed. */
static int parse_host_port(const char *val, char *host, size_t size, uint64_t *port)
{
    const char *colon = strrchr(val, ':');
    if (colon == NULL || tool_parse_u64(colon + 1, 0, 65535, 0, port) != 0)
        return -1;
    const char *h = val;
    size_t n = (size_t)(colon - val);
    if (n >= 2 && h[0] == '[' && h[n - 1] == ']')
        h++, n -= 2;
    else if (memchr(h, ':', n) != NULL)
        return -1; /* an IPv6 address goes in brackets */
    if (n == 0 || n >= size)
        return -1;
    memcpy(host, h, n);
    host[n] = '\0';
    return 0;
}

/* "ID:RATE[:BURST]" into l; 0, or -1 if malformed or out of range. */
static int parse_route_rate(const char *val, cp_route_limit *l)
{
    char buf[64];
    size_t len = strlen(val);
    if (len >= sizeof buf)
        return -1;
    memcpy(buf, val, len + 1);
    char *rate = strchr(buf, ':');
    if (rate == NULL)
        return -1;
    *rate++ = '\0';
    char *burst = strchr(rate, ':');
    if (burst != NULL)
        *burst++ = '\0';
    uint64_t id, r, b = 0;
    if (tool_parse_u64(buf, 0, 65535, 0, &id) != 0 || tool_parse_u64(rate, 1, 100000000, 0, &r) != 0 ||
        (burst != NULL && tool_parse_u64(burst, 1, 100000000, 0, &b) != 0))
        return -1;
    *l = (cp_route_limit){ .id = (uint16_t)id, .rate_packets = (uint32_t)r, .burst_packets = (uint32_t)b };
    return 0;
}

static void parse_args(int argc, char **argv, server_config *cfg)
{
    *cfg = (server_config){
        .host = "0.0.0.0",
        .port = 7777,
        .mode = MODE_ECHO,
        .backend = CP_BACKEND_AUTO,
        .workers = 0,
        .max_sessions = 10000,
        .max_packet = 4096,
        .send_queue_limit = 1u << 20,
        .rate_limit = -1,
        .room = "lobby",
        .ws_port = -1,
        .metrics_port = -1,
    };
    static const char *const value_options[] = { "--host",
                                                 "--port",
                                                 "--mode",
                                                 "--backend",
                                                 "--workers",
                                                 "--fanout-pause",
                                                 "--max-sessions",
                                                 "--max-packet",
                                                 "--send-queue-limit",
                                                 "--idle-timeout",
                                                 "--packet-timeout",
                                                 "--first-packet-timeout",
                                                 "--keepalive",
                                                 "--user-timeout",
                                                 "--rate-limit",
                                                 "--route-rate",
                                                 "--flood",
                                                 "--bus",
                                                 "--room",
                                                 "--tls-cert",
                                                 "--tls-key",
                                                 "--ws-port",
                                                 "--drain",
                                                 "--max-per-ip",
                                                 "--accept-rate-per-ip",
                                                 "--accept-rate",
                                                 "--proxy-trusted",
                                                 "--metrics",
                                                 NULL };
    for (int i = 1; i < argc; i++) {
        const char *opt = argv[i];
        if (strcmp(opt, "--help") == 0 || strcmp(opt, "-h") == 0) {
            usage(stdout);
            /* NOLINTNEXTLINE(concurrency-mt-unsafe): option parsing, before any other thread starts */
            exit(0);
        }
        if (strcmp(opt, "--reuseport") == 0) {
            cfg->reuseport = 1;
            continue;
        }
        if (strcmp(opt, "--proxy-protocol") == 0 || strcmp(opt, "--verbose") == 0) {
            *(opt[2] == 'p' ? &cfg->proxy_protocol : &cfg->verbose) = true;
            continue;
        }
        if (!tool_is_option(opt, value_options))
            usage_error(strncmp(opt, "-", 1) == 0 ? "unknown option '%s'" : "unexpected argument '%s'", opt);
        if (i + 1 >= argc)
            usage_error("option %s needs a value", opt);
        const char *val = argv[++i];
        uint64_t n;
        if (strcmp(opt, "--host") == 0) {
            if (*val == '\0')
                usage_error("empty --host");
            cfg->host = val;
        } else if (strcmp(opt, "--port") == 0) {
            if (tool_parse_u64(val, 0, 65535, 0, &n) != 0)
                usage_error("bad --port '%s' (0..65535)", val);
            cfg->port = (uint16_t)n;
        } else if (strcmp(opt, "--mode") == 0) {
            if (strcmp(val, "echo") == 0)
                cfg->mode = MODE_ECHO;
            else if (strcmp(val, "packet") == 0)
                cfg->mode = MODE_PACKET;
            else if (strcmp(val, "chat") == 0)
                cfg->mode = MODE_CHAT;
            else
                usage_error("bad --mode '%s' (echo, packet or chat)", val);
        } else if (strcmp(opt, "--backend") == 0) {
            if (tool_parse_backend(val, &cfg->backend) != 0)
                usage_error("bad --backend '%s' (" TOOL_BACKEND_LIST ")", val);
        } else if (strcmp(opt, "--workers") == 0) {
            if (tool_parse_u64(val, 0, 1024, 0, &n) != 0)
                usage_error("bad --workers '%s' (0..1024)", val);
            cfg->workers = (int)n;
        } else if (strcmp(opt, "--fanout-pause") == 0) {
            if (strcmp(val, "off") == 0)
                cfg->fanout_pause_pct = -1;
            else if (tool_parse_u64(val, 1, 100, 0, &n) == 0)
                cfg->fanout_pause_pct = (int)n;
            else
                usage_error("bad --fanout-pause '%s' (1..100 or off)", val);
        } else if (strcmp(opt, "--max-sessions") == 0) {
            if (tool_parse_u64(val, 1, 10000000, 0, &n) != 0)
                usage_error("bad --max-sessions '%s' (1..10000000)", val);
            cfg->max_sessions = (uint32_t)n;
        } else if (strcmp(opt, "--max-packet") == 0) {
            /* At least a header and one body byte; at most what u16 size can say. */
            if (tool_parse_u64(val, CP_PACKET_HEADER, CP_PACKET_MAX, 0, &n) != 0)
                usage_error("bad --max-packet '%s' (4..65535)", val);
            cfg->max_packet = (uint32_t)n;
        } else if (strcmp(opt, "--send-queue-limit") == 0) {
            if (tool_parse_u64(val, 1, (uint64_t)1 << 40, 1, &n) != 0)
                usage_error("bad --send-queue-limit '%s' (bytes, e.g. 65536 or 1M)", val);
            cfg->send_queue_limit = (size_t)n;
        } else if (strcmp(opt, "--rate-limit") == 0) {
            if (tool_parse_u64(val, 0, 100000000, 0, &n) != 0)
                usage_error("bad --rate-limit '%s' (packets a second per session, 0 = off)", val);
            cfg->rate_limit = (int64_t)n;
        } else if (strcmp(opt, "--route-rate") == 0) {
            if (cfg->nroute_limits == sizeof cfg->route_limits / sizeof cfg->route_limits[0])
                usage_error("too many --route-rate (at most %zu)", cfg->nroute_limits);
            cp_route_limit *l = &cfg->route_limits[cfg->nroute_limits];
            if (parse_route_rate(val, l) != 0)
                usage_error(
                    "bad --route-rate '%s' (ID:RATE[:BURST], id 0..65535, rate and burst 1..100000000)", val);
            for (size_t k = 0; k < cfg->nroute_limits; k++)
                if (cfg->route_limits[k].id == l->id)
                    usage_error("--route-rate: id %u given twice", (unsigned)l->id);
            cfg->nroute_limits++;
        } else if (strcmp(opt, "--flood") == 0) {
            if (tool_parse_u64(val, 0, 86400000, 0, &n) != 0)
                usage_error("bad --flood '%s' (milliseconds, 0..86400000)", val);
            cfg->flood_ms = (uint32_t)n;
        } else if (strcmp(opt, "--bus") == 0) {
            if (strncmp(val, "nats://", 7) != 0 && strncmp(val, "redis://", 8) != 0)
                usage_error("bad --bus '%s' (nats://host:port[,host:port...] or redis://host:port)", val);
            cfg->bus_url = val;
        } else if (strcmp(opt, "--room") == 0) {
            if (!room_name_ok(val))
                usage_error("bad --room '%s' (1 to 64 letters, digits, '-' or '_')", val);
            cfg->room = val;
        } else if (strcmp(opt, "--ws-port") == 0) {
            if (tool_parse_u64(val, 0, 65535, 0, &n) != 0)
                usage_error("bad --ws-port '%s' (0..65535)", val);
            cfg->ws_port = (int)n;
        } else if (strcmp(opt, "--metrics") == 0) {
            if (parse_host_port(val, cfg->metrics_host, sizeof cfg->metrics_host, &n) != 0)
                usage_error("bad --metrics '%s' (HOST:PORT, [IPv6]:PORT; port 0..65535)", val);
            cfg->metrics_port = (int)n;
        } else if (strcmp(opt, "--tls-cert") == 0 || strcmp(opt, "--tls-key") == 0) {
            if (*val == '\0')
                usage_error("empty %s", opt);
            *(opt[6] == 'c' ? &cfg->tls_cert : &cfg->tls_key) = val;
        } else if (strcmp(opt, "--idle-timeout") == 0 || strcmp(opt, "--packet-timeout") == 0) {
            if (tool_parse_u64(val, 0, 86400000, 0, &n) != 0)
                usage_error("bad %s '%s' (milliseconds, 0..86400000)", opt, val);
            if (opt[2] == 'i')
                cfg->idle_timeout_ms = (uint32_t)n;
            else
                cfg->packet_timeout_ms = (uint32_t)n;
        } else if (strcmp(opt, "--first-packet-timeout") == 0) {
            if (tool_parse_u64(val, 0, 86400000, 0, &n) != 0)
                usage_error("bad %s '%s' (milliseconds, 0..86400000)", opt, val);
            cfg->first_packet_ms = (uint32_t)n;
        } else if (strcmp(opt, "--drain") == 0) {
            if (tool_parse_u64(val, 0, 3600000, 0, &n) != 0)
                usage_error("bad --drain '%s' (milliseconds, 0..3600000)", val);
            cfg->drain_ms = (uint32_t)n;
        } else if (strcmp(opt, "--max-per-ip") == 0 || strcmp(opt, "--accept-rate-per-ip") == 0 ||
                   strcmp(opt, "--accept-rate") == 0) {
            if (tool_parse_u64(val, 0, 100000000, 0, &n) != 0)
                usage_error("bad %s '%s' (0..100000000, 0 = off)", opt, val);
            *(opt[2] == 'm'                           ? &cfg->max_per_ip
              : strlen(opt) > strlen("--accept-rate") ? &cfg->accept_rate_per_ip
                                                      : &cfg->accept_rate) = (uint32_t)n;
        } else if (strcmp(opt, "--proxy-trusted") == 0) {
            if (!cidr_list_ok(val))
                usage_error("bad --proxy-trusted '%s' (CIDR[,CIDR...], e.g. 10.0.0.0/8,::1/128)", val);
            cfg->proxy_trusted = val;
        } else if (strcmp(opt, "--keepalive") == 0 || strcmp(opt, "--user-timeout") == 0) {
            if (tool_parse_u64(val, 0, 86400000, 0, &n) != 0)
                usage_error("bad %s '%s' (milliseconds, 0..86400000)", opt, val);
            *(opt[2] == 'k' ? &cfg->keepalive_ms : &cfg->user_timeout_ms) = (uint32_t)n;
        } else {
            usage_error("unknown option '%s'", opt);
        }
    }
}

/* ------------------------------------------------------------------ callbacks */

/* ------------------------------------------------------------------ chat room jobs */

static void room_join(void *arg)
{
    cp_session *s = arg;
    chat_room *room = ((server_state *)cp_session_ctx(s))->room;
    if (room->n == room->cap) {
        size_t cap = room->cap ? room->cap * 2 : 64;
        /* NOLINTNEXTLINE(bugprone-sizeof-expression): an array of pointers: the element size is a pointer's */
        cp_session **m = realloc(room->members, cap * sizeof *m);
        if (m == NULL) {
            tool_log_sink(CP_LOG_ERROR, "chat room: out of memory, refusing a member", (void *)prog);
            cp_session_disconnect(s);
            cp_session_unref(s);
            return;
        }
        room->members = m;
        room->cap = cap;
    }
    room->members[room->n++] = s; /* keeps the join job's reference */
}

static void room_leave(void *arg)
{
    cp_session *s = arg;
    chat_room *room = ((server_state *)cp_session_ctx(s))->room;
    for (size_t i = 0; i < room->n; i++) {
        if (room->members[i] == s) {
            room->members[i] = room->members[--room->n];
            cp_session_unref(s); /* the room's reference */
            break;
        }
    }
    cp_session_unref(s); /* the leave job's reference */
}

/* Runs in the room's queue: one buffer, queued on every member. A member that
 * is already disconnecting refuses it; its leave job is on its way. */
static void room_broadcast(void *arg)
{
    cp_sendbuf *b = arg;
    chat_room *room = &the_room; /* a job carries one pointer: the buffer */
    for (size_t i = 0; i < room->n; i++)
        (void)cp_session_send(room->members[i], b);
    cp_sendbuf_unref(b);
}

static void room_closed(void *arg)
{
    chat_room *room = arg;
    for (size_t i = 0; i < room->n; i++) /* none left after a clean stop */
        cp_session_unref(room->members[i]);
    free(room->members);
    room->members = NULL;
    room->n = room->cap = 0;
}

static void room_close(chat_room *room) { (void)cp_jobq_close(room->q, room_closed, room); }

static void on_connected(cp_session *s)
{
    server_state *st = cp_session_ctx(s);
    atomic_fetch_add_explicit(&st->connected, 1, memory_order_relaxed);
    if (st->verbose) {
        /* With --proxy-protocol, the client's address from the header. */
        char peer[96];
        if (cp_session_peer(s, peer, sizeof peer) < 0)
            snprintf(peer, sizeof peer, "?");
        printf("%s: connected %s\n", prog, peer);
        fflush(stdout);
    }
    if (st->group != NULL) {
        /* A member leaves every group by itself when it disconnects. */
        if (cp_group_add(st->group, s) != 0)
            cp_session_disconnect(s);
    } else if (st->room != NULL) {
        /* Pushed before any packet job of this session can be (its callbacks
         * are serialized), so its own packets reach it too. */
        cp_session_ref(s);
        if (cp_jobq_push(st->room->q, room_join, s) != 0) {
            cp_session_unref(s);
            cp_session_disconnect(s);
        }
    }
}

static void on_disconnected(cp_session *s, cp_reason reason, int err)
{
    server_state *st = cp_session_ctx(s);
    if (reason == CP_REASON_STOPPING && err != 0)
        atomic_fetch_add_explicit(&st->stop_cut, 1, memory_order_relaxed);
    if (st->room != NULL) {
        cp_session_ref(s);
        if (cp_jobq_push(st->room->q, room_leave, s) != 0)
            cp_session_unref(s);
    }
    if ((unsigned)reason < CP_REASON_COUNT_)
        atomic_fetch_add_explicit(&st->by_reason[reason], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&st->disconnected, 1, memory_order_relaxed);
}

/* echo: raw bytes back as they came, in the very buffer they were received
 * into where the backend can lend it (cp_sendbuf_from_recv: no copy).
 * Everything offered is consumed, so the session never keeps a carry
 * buffer. A failed allocation disconnects the session: silently dropping
 * bytes would corrupt the client's stream. */
static size_t echo_on_recv(cp_session *s, const uint8_t *data, size_t len)
{
    cp_sendbuf *b = cp_sendbuf_from_recv(s, data, len);
    if (b == NULL) {
        cp_session_disconnect(s);
        return len;
    }
    /* Any error means the session is already going away (or just
     * overflowed its send queue and is being disconnected for it). */
    (void)cp_session_send(s, b);
    cp_sendbuf_unref(b);
    return len;
}

/* packet: the same packet back, header and all, as it came. Returning < 0
 * disconnects (CP_REASON_HANDLER). */
static int packet_on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    (void)id;
    cp_sendbuf *b = cp_sendbuf_from_recv(s, body - CP_PACKET_HEADER, len + CP_PACKET_HEADER);
    if (b == NULL)
        return -1;
    (void)cp_session_send(s, b);
    cp_sendbuf_unref(b);
    return 0;
}

/* chat: encode once, and let the room's queue put the one buffer on every
 * member (sender included). The sender's packets reach every member in order:
 * this session's callbacks are serialized, the room runs its jobs in push
 * order, and every member's send queue is FIFO. */
static int chat_on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    server_state *st = cp_session_ctx(s);
    cp_sendbuf *b = cp_packet_make(id, body, len);
    if (b == NULL)
        return -1;
    if (cp_jobq_push(st->room->q, room_broadcast, b) != 0) {
        cp_sendbuf_unref(b);
        return -1;
    }
    return 0;
}

/* chat across servers: the group's broadcast reaches the local members and,
 * through the bridge, every other server's. A sender's packets leave in
 * order: this session's callbacks are serialized. */
static int bus_chat_on_packet(cp_session *s, uint16_t id, const uint8_t *body, size_t len)
{
    server_state *st = cp_session_ctx(s);
    cp_sendbuf *b = cp_packet_make(id, body, len);
    if (b == NULL)
        return -1;
    cp_group_broadcast(st->group, b);
    cp_sendbuf_unref(b);
    return 0;
}

/* The bus and the bridged room; 0, or 1 after saying what failed. */
static int bus_room_start(const server_config *cfg, cp_port *port, server_state *st, cp_bus **bus)
{
    char subject[80];
    snprintf(subject, sizeof subject, "room.%s", cfg->room);
    cp_bus_opts bo = { .url = cfg->bus_url, .name = prog };
    int rc = cp_bus_create(bus, port, &bo);
    if (rc != 0) {
        fprintf(stderr, "%s: --bus %s: %s\n", prog, cfg->bus_url, cp_strerror(rc));
        return 1;
    }
    rc = cp_group_create(&st->group);
    if (rc == 0)
        rc = cp_group_bridge(st->group, *bus, subject);
    if (rc != 0) {
        fprintf(stderr, "%s: cannot bridge the room: %s\n", prog, cp_strerror(rc));
        return 1;
    }
    return 0;
}

static void print_bus_stats(cp_bus *bus)
{
    cp_bus_stats bs;
    cp_bus_stats_get(bus, &bs);
    printf("cport-server bus: published=%llu delivered=%llu dropped=%llu gaps=%llu reconnects=%llu "
           "slow_consumer=%llu\n",
           (unsigned long long)bs.published, (unsigned long long)bs.delivered, (unsigned long long)bs.dropped,
           (unsigned long long)bs.gaps, (unsigned long long)bs.reconnects,
           (unsigned long long)bs.slow_consumer);
}

/* ------------------------------------------------------------------ main */

/* With reuseport, connections the kernel has queued to this listener when
 * it closes are reset, unless net.ipv4.tcp_migrate_req moves them to the
 * server that shares the port (Linux 5.14+). Says so when it will not. */
static void warn_unmigrated(uint32_t drain_ms)
{
    FILE *f = fopen("/proc/sys/net/ipv4/tcp_migrate_req", "r");
    int c = f != NULL ? fgetc(f) : EOF;
    if (f != NULL)
        fclose(f);
    if (c != '1')
        fprintf(stderr,
                "%s: --reuseport: net.ipv4.tcp_migrate_req is not 1, so connections queued to this "
                "listener when it stops are reset%s\n",
                prog, drain_ms ? "" : " (and without --drain its sessions are cut)");
}

static void print_final_stats(const server_state *st, const cp_service_stats *lib, double uptime_s)
{
    char reasons[512];
    size_t used = 0;
    reasons[0] = '\0';
    for (int r = 0; r < CP_REASON_COUNT_; r++) {
        uint64_t n = atomic_load_explicit(&st->by_reason[r], memory_order_relaxed);
        if (n == 0 || used >= sizeof reasons)
            continue;
        int w = snprintf(reasons + used, sizeof reasons - used, "%s%s=%llu", used ? "," : "",
                         cp_reason_str((cp_reason)r), (unsigned long long)n);
        if (w > 0)
            used += (size_t)w;
    }
    /* Refusals at accept by cause, max sessions being rejected= already;
     * the PROXY header's failures are among the reasons. */
    char refused[256];
    used = 0;
    refused[0] = '\0';
    for (int c = 1; c < CP_REFUSED_COUNT_; c++) {
        if (lib->refused[c] == 0 || used >= sizeof refused)
            continue;
        int w = snprintf(refused + used, sizeof refused - used, "%s%s=%llu", used ? "," : "",
                         cp_refusal_str((cp_refusal)c), (unsigned long long)lib->refused[c]);
        if (w > 0)
            used += (size_t)w;
    }
    printf("cport-server stopped after %.1fs: connected=%llu disconnected=%llu rejected=%llu "
           "accept_errors=%llu bytes_in=%llu bytes_out=%llu packets_in=%llu refused={%s} reasons={%s} "
           "drain_cut=%llu\n",
           uptime_s, (unsigned long long)atomic_load(&st->connected),
           (unsigned long long)atomic_load(&st->disconnected), (unsigned long long)lib->rejected,
           (unsigned long long)lib->accept_errors, (unsigned long long)lib->bytes_in,
           (unsigned long long)lib->bytes_out, (unsigned long long)lib->packets_in, refused, reasons,
           (unsigned long long)atomic_load(&st->stop_cut));
    fflush(stdout);
}

int main(int argc, char **argv)
{
    server_config cfg;
    parse_args(argc, argv, &cfg);
    /* A chat room multiplies every packet by its members: its default limit
     * is far above real play and keeps one flooder from filling the room. */
    if (cfg.rate_limit < 0)
        cfg.rate_limit = cfg.mode == MODE_CHAT ? 1000 : 0;
    if (cfg.rate_limit > 0 && cfg.mode == MODE_ECHO)
        usage_error("--rate-limit counts packets: not in echo mode");
    if (cfg.nroute_limits > 0 && cfg.mode == MODE_ECHO)
        usage_error("--route-rate counts packets by id: not in echo mode");
    if (cfg.flood_ms > 0 && cfg.rate_limit == 0 && cfg.nroute_limits == 0)
        usage_error("--flood needs a rate limit (--rate-limit or --route-rate)");
    if (cfg.bus_url != NULL && cfg.mode != MODE_CHAT)
        usage_error("--bus joins chat rooms: only with --mode chat");
    if ((cfg.tls_cert == NULL) != (cfg.tls_key == NULL))
        usage_error("--tls-cert and --tls-key go together");
    if (cfg.proxy_protocol != (cfg.proxy_trusted != NULL))
        usage_error("--proxy-protocol and --proxy-trusted go together");

    /* Before any other thread exists: from here on SIGINT/SIGTERM (Windows:
     * Ctrl-C, console close) are caught, and only by the watcher thread. */
    int rc = tool_stop_init();
    if (rc != 0) {
        fprintf(stderr, "%s: cannot watch for stop signals: %s\n", prog, cp_strerror(rc));
        return 1;
    }
    cp_set_log(tool_log_sink, (void *)prog);

    /* Each session is one descriptor; leave room for the listener, the
     * backend's own descriptors and the sessions rejected beyond the limit. */
    uint64_t want = (uint64_t)cfg.max_sessions + 1024;
    uint64_t have = tool_raise_nofile(want);
    if (have < want)
        fprintf(stderr,
                "%s: open-file limit is %llu, below the %llu that --max-sessions %u needs; "
                "accepts will back off when it is reached\n",
                prog, (unsigned long long)have, (unsigned long long)want, cfg.max_sessions);

    static server_state state; /* static: zero-initialised atomics, lives past main's frame */
    state.verbose = cfg.verbose;
    cp_tls *tls = NULL;
    if (cfg.tls_cert != NULL) {
        cp_tls_opts to = { .cert_file = cfg.tls_cert, .key_file = cfg.tls_key };
        rc = cp_tls_create(&tls, &to);
        if (rc != 0) {
            fprintf(stderr, "%s: cannot set up TLS with %s and %s: %s\n", prog, cfg.tls_cert, cfg.tls_key,
                    cp_strerror(rc));
            return 1;
        }
    }
    cp_port *port = NULL;
    int status = tool_create_port(prog, &port,
                                  &(cp_port_opts){ .workers = cfg.workers,
                                                   .backend = cfg.backend,
                                                   .fanout_pause_pct = cfg.fanout_pause_pct });
    if (status != 0)
        return status;
    cp_bus *bus = NULL;
    if (cfg.bus_url != NULL) {
        if (bus_room_start(&cfg, port, &state, &bus) != 0) {
            if (bus != NULL)
                cp_bus_destroy(bus);
            if (state.group != NULL)
                cp_group_destroy(state.group);
            cp_port_destroy(port);
            return 1;
        }
    } else if (cfg.mode == MODE_CHAT) {
        rc = cp_jobq_create(&the_room.q, port);
        if (rc != 0) {
            fprintf(stderr, "%s: cannot create the chat room: %s\n", prog, cp_strerror(rc));
            cp_port_destroy(port);
            return 1;
        }
        state.room = &the_room;
    }

    cp_handlers handlers = {
        .on_connected = on_connected,
        .on_disconnected = on_disconnected,
    };
    switch (cfg.mode) {
    case MODE_ECHO: handlers.on_recv = echo_on_recv; break;
    case MODE_PACKET: handlers.on_packet = packet_on_packet; break;
    case MODE_CHAT: handlers.on_packet = bus != NULL ? bus_chat_on_packet : chat_on_packet; break;
    }
    cp_server_opts opts = {
        .host = cfg.host,
        .port = cfg.port,
        .max_sessions = cfg.max_sessions,
        .reuseport = cfg.reuseport,
        .max_sessions_per_addr = cfg.max_per_ip,
        .accept_rate_per_addr = cfg.accept_rate_per_ip,
        .accept_rate = cfg.accept_rate,
        .proxy_protocol = cfg.proxy_protocol ? 1 : 0,
        .proxy_trusted = cfg.proxy_trusted,
        .session = {
            .framing = cfg.mode == MODE_ECHO ? CP_FRAMING_RAW : CP_FRAMING_PACKET,
            .max_packet = cfg.max_packet,
            .send_queue_limit = cfg.send_queue_limit,
            .idle_timeout_ms = cfg.idle_timeout_ms,
            .packet_timeout_ms = cfg.packet_timeout_ms,
            .first_packet_timeout_ms = cfg.first_packet_ms,
            .keepalive_idle_ms = cfg.keepalive_ms,
            .user_timeout_ms = cfg.user_timeout_ms,
            .recv_rate_packets = (uint32_t)cfg.rate_limit,
            .route_limits = cfg.route_limits,
            .nroute_limits = cfg.nroute_limits,
            .flood_ms = cfg.flood_ms,
            .tls = tls,
        },
    };
    cp_service *svc = NULL, *ws_svc = NULL;
    rc = cp_server_start(&svc, port, &opts, &handlers, &state);
    if (rc == 0 && cfg.ws_port >= 0)
        rc = ws_listen(&cfg, port, &opts, &handlers, &state, &ws_svc);
    static metrics_src msrc; /* the metrics service's ctx: lives past main's frame */
    cp_service *metrics_svc = NULL;
    if (rc == 0 && cfg.metrics_port >= 0) {
        msrc = (metrics_src){ .port = port,
                              .svc = { svc, ws_svc },
                              .name = { "tcp", ws_svc != NULL ? "ws" : NULL },
                              .mode = mode_names[cfg.mode],
                              .backend = cp_port_backend_name(port) };
        rc = metrics_start(port, cfg.metrics_host, (uint16_t)cfg.metrics_port, &msrc, &metrics_svc);
        if (rc != 0)
            fprintf(stderr, "%s: cannot serve metrics on %s:%d: %s\n", prog, cfg.metrics_host,
                    cfg.metrics_port, cp_strerror(rc));
    }
    cp_tls_unref(tls); /* the services keep their own */
    if (rc != 0) {
        if (ws_svc != NULL)
            cp_service_stop(ws_svc);
        if (svc != NULL)
            cp_service_stop(svc);
        else
            fprintf(stderr, "%s: cannot listen on %s:%u: %s\n", prog, cfg.host, cfg.port, cp_strerror(rc));
        if (state.room != NULL)
            room_close(state.room);
        if (bus != NULL) {
            cp_bus_destroy(bus);
            cp_group_destroy(state.group);
        }
        cp_port_destroy(port);
        if (state.room != NULL)
            cp_jobq_unref(state.room->q);
        return 1;
    }

    /* Scripts wait for this exact line (and read the port from it with --port 0). */
    const char *fmt = strchr(cfg.host, ':') ? "%s listening on [%s]:%u mode=%s backend=%s workers=%d\n"
                                            : "%s listening on %s:%u mode=%s backend=%s workers=%d\n";
    printf(fmt, prog, cfg.host, (unsigned)cp_service_listen_port(svc), mode_names[cfg.mode],
           cp_port_backend_name(port), cp_port_workers(port));
    if (ws_svc != NULL)
        printf("%s: WebSocket (%s) on port %u\n", prog, tls != NULL ? "wss" : "ws",
               (unsigned)cp_service_listen_port(ws_svc));
    if (tls != NULL)
        printf("%s: TLS with %s\n", prog, cfg.tls_cert);
    if (cfg.reuseport)
        warn_unmigrated(cfg.drain_ms);
    if (metrics_svc != NULL) /* scripts read the port from this line (--metrics HOST:0) */
        printf(strchr(cfg.metrics_host, ':') ? "%s: metrics on http://[%s]:%u/ (Prometheus: /metrics)\n"
                                             : "%s: metrics on http://%s:%u/ (Prometheus: /metrics)\n",
               prog, cfg.metrics_host, (unsigned)cp_service_listen_port(metrics_svc));
    fflush(stdout);
    uint64_t started = tool_now_ns();

    status = 0;
    int sig = tool_stop_wait();
    if (sig < 0) {
        fprintf(stderr, "%s: waiting for a stop signal failed: %s; stopping\n", prog, cp_strerror(sig));
        status = 1;
    } else {
        fprintf(stderr, "%s: %s received, stopping%s\n", prog, sig == SIGINT ? "SIGINT" : "SIGTERM",
                cfg.drain_ms ? " (draining)" : "");
    }

    /* Library counters (bytes, packets, rejected) are read before the stop
     * frees the service; the few bytes that arrive during the stop are not
     * worth a different design. */
    if (metrics_svc != NULL)
        (void)cp_service_stop(metrics_svc); /* first: it reads the others */
    cp_service_stats lib;
    cp_service_stats_get(svc, &lib);
    if (ws_svc != NULL) {
        cp_service_stats w;
        cp_service_stats_get(ws_svc, &w);
        lib.rejected += w.rejected;
        for (int c = 0; c < CP_REFUSED_COUNT_; c++)
            lib.refused[c] += w.refused[c];
        lib.accept_errors += w.accept_errors;
        lib.bytes_in += w.bytes_in;
        lib.bytes_out += w.bytes_out;
        lib.packets_in += w.packets_in;
        rc = cp_service_stop_ex(ws_svc, cfg.drain_ms, NULL);
        if (rc != 0) {
            fprintf(stderr, "%s: cp_service_stop (WebSocket): %s\n", prog, cp_strerror(rc));
            status = 1;
        }
    }
    rc = cp_service_stop_ex(svc, cfg.drain_ms, NULL);
    if (rc != 0) {
        fprintf(stderr, "%s: cp_service_stop: %s\n", prog, cp_strerror(rc));
        status = 1;
    }
    /* Every leave job is pushed by now (each on_disconnected ran); the room
     * drains them, then frees its list. Destroying the port runs what is left. */
    if (state.room != NULL)
        room_close(state.room);
    if (bus != NULL) {
        print_bus_stats(bus);
        cp_bus_destroy(bus);
        cp_group_destroy(state.group);
    }
    rc = cp_port_destroy(port);
    if (rc != 0) {
        fprintf(stderr, "%s: cp_port_destroy: %s\n", prog, cp_strerror(rc));
        status = 1;
    }
    if (state.room != NULL)
        cp_jobq_unref(state.room->q);
    cp_set_log(NULL, NULL);
    print_final_stats(&state, &lib, (double)(tool_now_ns() - started) / 1e9);
    return status;
}
