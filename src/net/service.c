/* SPDX-License-Identifier: MIT */
/*
 * Services own sessions. A server service has a listener; a client service
 * connects sessions to one address. Both keep the live-session table: slot
 * plus generation make the 64-bit session id, so an id kept by game code
 * never reaches a different session that later reuses the slot.
 *
 * Stopping: the service refuses new sessions, closes its listener, asks every
 * session's worker to disconnect it, and waits until every session (and the
 * listener) has finished, i.e. every callback has run and every completion
 * has drained. Only then is the service freed.
 */
#include "net/net.h"

#include <errno.h>
#include <time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SLOT_NONE UINT32_MAX

int cp__addr_str(const struct sockaddr *sa, socklen_t len, char *buf, size_t size)
{
    char ip[INET6_ADDRSTRLEN];
    int n;
    if (sa->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, ip, sizeof ip);
        n = snprintf(buf, size, "%s:%u", ip, ntohs(in->sin_port));
    } else if (sa->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof ip);
        n = snprintf(buf, size, "[%s]:%u", ip, ntohs(in6->sin6_port));
    } else {
        return -EAFNOSUPPORT;
    }
    return n < 0 || (size_t)n >= size ? -ENOBUFS : n;
}

int cp__resolve(const char *host, uint16_t port, bool passive, struct sockaddr_storage *ss, socklen_t *len)
{
    struct addrinfo hints = { .ai_family = AF_UNSPEC,
                              .ai_socktype = SOCK_STREAM,
                              .ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0) };
    char serv[8];
    snprintf(serv, sizeof serv, "%u", port);
    if (passive && (!host || !*host))
        host = "0.0.0.0";
    if (!host || !*host)
        return -EINVAL;
    struct addrinfo *res = NULL;
    int r = getaddrinfo(host, serv, &hints, &res);
    if (r != 0 || !res)
        return r == EAI_MEMORY ? -ENOMEM : -EADDRNOTAVAIL;
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *len = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

/* ------------------------------------------------------------------ table */

int cp__service_add_session(cp_service *svc, cp_session *s)
{
    pthread_mutex_lock(&svc->lock);
    int r = 0;
    if (atomic_load(&svc->stopping)) {
        r = -ESHUTDOWN;
    } else if (svc->free_head == SLOT_NONE) {
        r = -EMFILE;
    } else {
        uint32_t i = svc->free_head;
        cp_slot *slot = &svc->slots[i];
        svc->free_head = slot->next_free;
        slot->s = s;
        s->id = ((uint64_t)slot->gen << 32) | i;
        svc->live++;
        svc->objects++;
    }
    pthread_mutex_unlock(&svc->lock);
    return r;
}

void cp__service_listener_done(cp_service *svc)
{
    pthread_mutex_lock(&svc->lock);
    svc->listener_closed = true;
    pthread_cond_broadcast(&svc->drained);
    pthread_mutex_unlock(&svc->lock);
}

void cp__service_object_done(cp_service *svc)
{
    pthread_mutex_lock(&svc->lock);
    if (--svc->objects == 0)
        pthread_cond_broadcast(&svc->drained);
    pthread_mutex_unlock(&svc->lock);
    /* svc may be freed by the stopping thread from here on. */
}

void cp__service_refused(cp_service *svc, int cause)
{
    cp__stat_add(cause == CP_REFUSED_MAX_SESSIONS ? &svc->st.rejected : &svc->st.refused[cause], 1);
}

int cp__service_admit_accept(cp_service *svc, const cp_sockaddr *peer, socklen_t len, bool *counted)
{
    *counted = false;
    /* An untrusted source costs the total rate nothing: it never was a client. */
    if (svc->proxy && !cp__cidr_match(svc->trusted, svc->ntrusted, &peer->sa, len))
        return CP_REFUSED_UNTRUSTED;
    if (!svc->caps)
        return -1;
    uint64_t now = cp__now_ns();
    if (!cp__addrcap_total(svc->caps, now))
        return CP_REFUSED_RATE;
    /* Behind a proxy the socket's address is the proxy's: the caps by
     * address wait for the header (cp__service_admit_session). */
    cp_addr_key k;
    if (svc->proxy || !cp__addrcap_by_addr(svc->caps) || !cp__addr_key(&peer->sa, len, &k))
        return -1;
    int r = cp__addrcap_admit(svc->caps, k, now);
    *counted = r < 0;
    return r;
}

int cp__service_admit_session(cp_service *svc, cp_session *s)
{
    cp_addr_key k;
    if (!cp__addrcap_by_addr(svc->caps) || !cp__addr_key(&s->peer.sa, s->peer_len, &k))
        return -1;
    int r = cp__addrcap_admit(svc->caps, k, cp__now_ns());
    s->addr_counted = r < 0;
    return r;
}

void cp__service_session_done(cp_service *svc, cp_session *s)
{
    uint32_t i = (uint32_t)s->id;
    cp_addr_key k;
    if (s->addr_counted && cp__addr_key(&s->peer.sa, s->peer_len, &k))
        cp__addrcap_release(svc->caps, k);
    pthread_mutex_lock(&svc->lock);
    cp_slot *slot = &svc->slots[i];
    slot->s = NULL;
    if (++slot->gen == 0)
        slot->gen = 1;
    slot->next_free = svc->free_head;
    svc->free_head = i;
    svc->live--;
    if (--svc->objects == 0)
        pthread_cond_broadcast(&svc->drained);
    pthread_mutex_unlock(&svc->lock);
    cp__session_unref(s); /* the table's reference */
}

/* The session with this id, referenced, or NULL. */
static cp_session *lookup(cp_service *svc, uint64_t id)
{
    uint32_t i = (uint32_t)id, gen = (uint32_t)(id >> 32);
    cp_session *s = NULL;
    pthread_mutex_lock(&svc->lock);
    if (i < svc->nslots && svc->slots[i].gen == gen && svc->slots[i].s) {
        s = svc->slots[i].s;
        cp__session_ref(s);
    }
    pthread_mutex_unlock(&svc->lock);
    return s;
}

/* Every live session, referenced; the caller unrefs each and frees the array. */
static cp_session **snapshot(cp_service *svc, size_t *n)
{
    pthread_mutex_lock(&svc->lock);
    /* NOLINTNEXTLINE(bugprone-sizeof-expression): an array of pointers: the element size is a pointer's */
    cp_session **all = cp__malloc(sizeof *all * (svc->live ? svc->live : 1));
    size_t k = 0;
    if (all) {
        for (uint32_t i = 0; i < svc->nslots && k < svc->live; i++) {
            cp_session *s = svc->slots[i].s;
            if (s) {
                cp__session_ref(s);
                all[k++] = s;
            }
        }
    }
    pthread_mutex_unlock(&svc->lock);
    *n = k;
    return all;
}

/* ------------------------------------------------------------------ create */

/* Options that cannot work are refused at start rather than ignored
 * (include/cport.h lists them); o has its defaults filled in. Duplicate and
 * empty routes are found while copying them (routes_copy). */
/* Limits in range and options that agree with each other. */
static bool session_opts_consistent(const cp_session_opts *o)
{
    if (o->max_packet < CP_PACKET_HEADER || o->max_packet > CP_PACKET_MAX)
        return false;
    if (o->nroutes && !o->routes)
        return false;
    if (o->send_queue_high > o->send_queue_limit || o->send_queue_low >= o->send_queue_high)
        return false;
    if ((o->keepalive_interval_ms || o->keepalive_probes) && !o->keepalive_idle_ms)
        return false;
    if (o->keepalive_probes > 127 || o->user_timeout_ms > INT32_MAX)
        return false;
    if (o->nroute_limits && !o->route_limits)
        return false;
    /* flood_by (net.h) names a limit in a byte: two for the session's own. */
    if (o->nroute_limits > 254)
        return false;
    for (size_t i = 0; i < o->nroute_limits; i++)
        if (!o->route_limits[i].rate_packets)
            return false;
    /* The second threshold needs a first one. */
    if (o->flood_ms && !o->recv_rate_packets && !o->recv_rate_bytes && !o->nroute_limits)
        return false;
    return !(o->recv_burst_packets && !o->recv_rate_packets) && !(o->recv_burst_bytes && !o->recv_rate_bytes);
}

static int check_session_opts(const cp_session_opts *o, const cp_handlers *h)
{
    if (o->framing != CP_FRAMING_PACKET && o->framing != CP_FRAMING_RAW)
        return -EINVAL;
    if (!session_opts_consistent(o))
        return -EINVAL;
    if (o->framing == CP_FRAMING_RAW)
        return h->on_recv && !o->nroutes && !o->recv_rate_packets && !o->nroute_limits ? 0 : -EINVAL;
    /* A packet the service accepts must fit its own send queue, or echoing
     * or relaying it would disconnect the session. */
    return o->send_queue_limit >= o->max_packet ? 0 : -EINVAL;
}

/* The routes as a table indexed by id. -EINVAL for a route without a
 * handler or an id given twice. */
static int routes_copy(cp_service *svc, const cp_session_opts *o)
{
    uint32_t top = 0;
    for (size_t i = 0; i < o->nroutes; i++) {
        if (!o->routes[i].fn)
            return -EINVAL;
        if ((uint32_t)o->routes[i].id + 1 > top)
            top = (uint32_t)o->routes[i].id + 1;
    }
    if (!top)
        return 0;
    cp_packet_fn *table = cp__zalloc(sizeof *table * top);
    if (!table)
        return -ENOMEM;
    for (size_t i = 0; i < o->nroutes; i++) {
        if (table[o->routes[i].id]) {
            cp__free(table);
            return -EINVAL;
        }
        table[o->routes[i].id] = o->routes[i].fn;
    }
    svc->routes = table;
    svc->nroutes = top;
    return 0;
}

/* The per-id limits as a table indexed by id (limit_of) and the limits'
 * costs and windows. -EINVAL for an id given twice. */
static int limits_copy(cp_service *svc, const cp_session_opts *o)
{
    uint32_t top = 0;
    for (size_t i = 0; i < o->nroute_limits; i++)
        if ((uint32_t)o->route_limits[i].id + 1 > top)
            top = (uint32_t)o->route_limits[i].id + 1;
    if (!top)
        return 0;
    uint16_t *of = cp__zalloc(sizeof *of * top);
    struct cp_id_limit *l = cp__zalloc(sizeof *l * o->nroute_limits);
    if (!of || !l) {
        cp__free(of);
        cp__free(l);
        return -ENOMEM;
    }
    for (size_t i = 0; i < o->nroute_limits; i++) {
        const cp_route_limit *rl = &o->route_limits[i];
        if (of[rl->id]) {
            cp__free(of);
            cp__free(l);
            return -EINVAL;
        }
        of[rl->id] = (uint16_t)(i + 1);
        uint64_t burst = rl->burst_packets ? rl->burst_packets : (uint64_t)rl->rate_packets * 2;
        l[i].cost_ns = 1000000000u / rl->rate_packets;
        l[i].win_ns = burst * 1000000000u / rl->rate_packets;
    }
    svc->limit_of = of;
    svc->limits = l;
    svc->nlimit_ids = top;
    svc->nlimits = (uint32_t)o->nroute_limits;
    return 0;
}

static void limits_free(cp_service *svc)
{
    cp__free(svc->limit_of);
    cp__free(svc->limits);
}

/* The defaults of the options left at 0. */
static void session_opts_default(cp_session_opts *o)
{
    if (o->max_packet == 0)
        o->max_packet = 4096;
    if (o->send_queue_limit == 0)
        o->send_queue_limit = 1u << 20;
    if (o->send_queue_high == 0)
        o->send_queue_high = o->send_queue_limit / 2;
    if (o->send_queue_low == 0 && o->send_queue_high <= o->send_queue_limit)
        o->send_queue_low = o->send_queue_high / 2;
    if (o->recv_rate_packets && !o->recv_burst_packets)
        o->recv_burst_packets = o->recv_rate_packets > UINT32_MAX / 2 ? UINT32_MAX : o->recv_rate_packets * 2;
    if (o->recv_rate_bytes && !o->recv_burst_bytes)
        o->recv_burst_bytes = o->recv_rate_bytes > UINT32_MAX / 2 ? UINT32_MAX : o->recv_rate_bytes * 2;
    if (o->keepalive_idle_ms && !o->keepalive_interval_ms)
        o->keepalive_interval_ms = 1000;
    if (o->keepalive_idle_ms && !o->keepalive_probes)
        o->keepalive_probes = 3;
}

/* The service's settings, from the checked options. */
static void service_configure(cp_service *svc, const cp_session_opts *o)
{
    svc->framing = o->framing;
    svc->max_packet = o->max_packet;
    svc->send_queue_limit = o->send_queue_limit;
    svc->nodelay = !o->no_nodelay;
    svc->ka_idle_ms = o->keepalive_idle_ms;
    svc->ka_interval_ms = o->keepalive_interval_ms;
    svc->ka_probes = o->keepalive_probes;
    svc->user_timeout_ms = o->user_timeout_ms;
    svc->idle_timeout_ns = (uint64_t)o->idle_timeout_ms * 1000000u;
    svc->packet_timeout_ns = (uint64_t)o->packet_timeout_ms * 1000000u;
    svc->first_packet_ns = (uint64_t)o->first_packet_timeout_ms * 1000000u;
    svc->sq_high = o->send_queue_high;
    svc->sq_low = o->send_queue_low;
    svc->rate_pkts = o->recv_rate_packets;
    svc->rate_bytes = o->recv_rate_bytes;
    if (o->recv_rate_packets) {
        svc->win_pkts_ns = (uint64_t)o->recv_burst_packets * 1000000000u / o->recv_rate_packets;
        svc->pkt_cost_ns = 1000000000u / o->recv_rate_packets;
    }
    if (o->recv_rate_bytes)
        svc->win_bytes_ns = (uint64_t)o->recv_burst_bytes * 1000000000u / o->recv_rate_bytes;
    svc->flood_ms = o->flood_ms;
    /* A cp_tls begins with its filter kind (the TLS layer, above this one,
     * promises it), so net can hold one without knowing TLS. TLS is the
     * outermost filter. The references: service_open. */
    if (o->tls)
        svc->filters[svc->nfilters++] = (cp_filter_kind *)(void *)o->tls;
    if (o->ws) /* the same promise from the WebSocket layer; inside TLS */
        svc->filters[svc->nfilters++] = (cp_filter_kind *)(void *)o->ws;
}

/* The session table (every slot free) and the per-worker traffic counters,
 * each on its own cache lines. -ENOMEM with neither allocated. */
static int tables_alloc(cp_service *svc, uint32_t max_sessions)
{
    svc->nslots = max_sessions;
    svc->slots = cp__malloc(sizeof *svc->slots * max_sessions);
    /* The packets by route id: a row per worker, in whole cache lines. */
    size_t nw = (size_t)svc->port->nworkers;
    svc->route_stride = (svc->nroutes + 7) & ~7u;
    size_t traffic = CP_TRAFFIC_STRIDE * nw, routes = sizeof(atomic_uint_fast64_t) * svc->route_stride * nw;
    svc->traffic_mem = cp__zalloc(traffic + routes + 63);
    if (!svc->slots || !svc->traffic_mem) {
        cp__free(svc->traffic_mem);
        cp__free(svc->slots);
        return -ENOMEM;
    }
    svc->traffic = (uint8_t *)(((uintptr_t)svc->traffic_mem + 63) & ~(uintptr_t)63);
    svc->route_pkts = (atomic_uint_fast64_t *)(void *)(svc->traffic + traffic);
    for (uint32_t i = 0; i < max_sessions; i++)
        svc->slots[i] = (cp_slot){ .s = NULL,
                                   .gen = 1,
                                   .next_free = i + 1 < max_sessions ? i + 1 : SLOT_NONE };
    svc->free_head = 0;
    return 0;
}

/* The service exists from here on: it holds its port, and is counted. */
static void service_open(cp_service *svc)
{
    pthread_mutex_init(&svc->lock, NULL);
    pthread_cond_init(&svc->drained, NULL);
    atomic_fetch_add(&svc->port->users, 1);
    for (int i = 0; i < svc->nfilters; i++)
        svc->filters[i]->ops->kind_ref(svc->filters[i]);
    cp__port_on_trim(svc->port, cp__sendbuf_trim); /* the buffers its sessions send */
    cp__live_add(CP_LIVE_SERVICE, svc);
}

static int service_new(cp_service **out, cp_port *port, const cp_session_opts *so, const cp_handlers *h,
                       void *ctx, uint32_t max_sessions, bool is_client)
{
    *out = NULL;
    if (!port || !h || atomic_load(&port->stopping))
        return port && atomic_load(&port->stopping) ? -ESHUTDOWN : -EINVAL;
    cp_session_opts o = so ? *so : (cp_session_opts){ 0 };
    session_opts_default(&o);
    int r = check_session_opts(&o, h);
    if (r < 0)
        return r;

    cp_service *svc = cp__zalloc(sizeof *svc);
    if (!svc)
        return -ENOMEM;
    svc->port = port;
    svc->h = *h;
    svc->ctx = ctx;
    svc->is_client = is_client;
    service_configure(svc, &o);
    if ((r = routes_copy(svc, &o)) < 0) {
        cp__free(svc);
        return r;
    }
    if ((r = limits_copy(svc, &o)) < 0 || (r = tables_alloc(svc, max_sessions)) < 0) {
        limits_free(svc);
        cp__free(svc->routes);
        cp__free(svc);
        return r;
    }
    service_open(svc);
    *out = svc;
    return 0;
}

static void service_free(cp_service *svc)
{
    cp__live_del(CP_LIVE_SERVICE, svc);
    atomic_fetch_sub(&svc->port->users, 1);
    pthread_mutex_destroy(&svc->lock);
    pthread_cond_destroy(&svc->drained);
    cp__free(svc->traffic_mem);
    cp__free(svc->slots);
    cp__free(svc->routes);
    cp__addrcap_free(svc->caps);
    cp__free(svc->trusted);
    limits_free(svc);
    for (int i = 0; i < svc->nfilters; i++)
        svc->filters[i]->ops->kind_unref(svc->filters[i]);
    cp__free(svc);
}

int cp_server_start(cp_service **out, cp_port *port, const cp_server_opts *opts, const cp_handlers *h,
                    void *ctx)
{
    if (!out || !opts)
        return -EINVAL;
    *out = NULL;
    if (opts->backlog < 0 || opts->accepts < 0 || opts->accepts > 65535 || (unsigned)opts->reuseport > 1)
        return -EINVAL;
    if ((opts->proxy_protocol != 0) != (opts->proxy_trusted != NULL) || (unsigned)opts->proxy_protocol > 1)
        return -EINVAL; /* a header with no one to trust, or ranges with no header */
    uint32_t max = opts->max_sessions ? opts->max_sessions : 10000;
    cp_service *svc;
    int r = service_new(&svc, port, &opts->session, h, ctx, max, false);
    if (r < 0)
        return r;
    if (opts->proxy_protocol) {
        svc->proxy = true;
        svc->proxy_timeout_ms = opts->proxy_timeout_ms ? opts->proxy_timeout_ms : 5000;
        r = cp__cidr_parse(opts->proxy_trusted, &svc->trusted, &svc->ntrusted);
    }
    if (r == 0 && (opts->max_sessions_per_addr || opts->accept_rate_per_addr || opts->accept_rate))
        r = cp__addrcap_new(&svc->caps, opts->max_sessions_per_addr, opts->accept_rate_per_addr,
                            opts->accept_rate, max);
    if (r == 0)
        r = cp__resolve(opts->host, opts->port, true, &svc->addr, &svc->addr_len);
    if (r == 0)
        r = cp__listener_start(svc, opts->backlog ? opts->backlog : 1024, opts->accepts ? opts->accepts : 64,
                               opts->reuseport != 0);
    if (r < 0) {
        service_free(svc);
        return r;
    }
    *out = svc;
    return 0;
}

/* A client connect is made in two steps, so that cp_client_start can make
 * every socket of its first connects before it starts any of them. prepare
 * makes the socket and puts a new session in the table; launch hands both to
 * the session's worker; cancel undoes a prepared connect that was never
 * launched. */
static int connect_prepare(cp_service *svc, void *data, cp_session **out, int *fd_out)
{
    int fd = cp__sock_stream(svc->addr.ss_family);
    if (fd < 0)
        return fd;
    cp_session *s = cp__session_new(svc, cp__pick_worker(svc->port), true);
    int r = s ? cp__service_add_session(svc, s) : -ENOMEM;
    if (r < 0) {
        if (s)
            cp__session_unref(s);
        cp__sock_close(fd);
        return r;
    }
    s->data = data; /* before the worker can see the session */
    *out = s;
    *fd_out = fd;
    return 0;
}

static void connect_launch(cp_session *s, int fd)
{
    cp__session_ref(s); /* the start message's reference */
    cp__send_msg(s->owner, cp__session_start_connect, s, (void *)(intptr_t)fd);
}

static void connect_cancel(cp_service *svc, cp_session *s, int fd)
{
    cp__sock_close(fd);
    atomic_store(&s->state, CP_S_CLOSED);
    cp__service_session_done(svc, s); /* drops the table's (and last) reference */
}

int cp_client_connect_data(cp_service *svc, void *data)
{
    if (!svc || !svc->is_client)
        return -EINVAL;
    cp_session *s;
    int fd;
    int r = connect_prepare(svc, data, &s, &fd);
    if (r == 0)
        connect_launch(s, fd);
    return r;
}

int cp_client_connect(cp_service *svc) { return cp_client_connect_data(svc, NULL); }

/* Prepares all n first connects, or none: the first failure undoes the
 * others and is returned. */
static int client_first_connects(cp_service *svc, uint32_t n)
{
    if (n == 0)
        return 0;
    /* NOLINTNEXTLINE(bugprone-sizeof-expression): an array of pointers: the element size is a pointer's */
    cp_session **s = cp__malloc(sizeof *s * n);
    int *fd = cp__malloc(sizeof *fd * n);
    int r = s && fd ? 0 : -ENOMEM;
    uint32_t ready = 0;
    while (r == 0 && ready < n && (r = connect_prepare(svc, NULL, &s[ready], &fd[ready])) == 0)
        ready++;
    if (r < 0) {
        for (uint32_t i = 0; i < ready; i++)
            connect_cancel(svc, s[i], fd[i]);
    } else {
        cp__batch_begin(svc->port);
        for (uint32_t i = 0; i < n; i++)
            connect_launch(s[i], fd[i]);
        cp__batch_end(svc->port);
    }
    cp__free(s);
    cp__free(fd);
    return r;
}

int cp_client_start(cp_service **out, cp_port *port, const cp_client_opts *opts, const cp_handlers *h,
                    void *ctx)
{
    if (!out || !opts)
        return -EINVAL;
    *out = NULL;
    uint32_t max = opts->max_sessions ? opts->max_sessions
                                      : (opts->sessions > 10000 ? opts->sessions : 10000);
    if (opts->sessions > max || opts->port == 0)
        return -EINVAL;
    cp_service *svc;
    int r = service_new(&svc, port, &opts->session, h, ctx, max, true);
    if (r < 0)
        return r;
    r = cp__resolve(opts->host, opts->port, false, &svc->addr, &svc->addr_len);
    if (r == 0)
        r = client_first_connects(svc, opts->sessions);
    if (r < 0) {
        service_free(svc);
        return r;
    }
    *out = svc;
    return 0;
}

int cp_service_stop(cp_service *svc) { return cp_service_stop_ex(svc, 0, NULL); }

/* Every session still in the table: closed hard, or gracefully within
 * drain_ms. A session whose start has not run yet (NEW) drains itself when
 * it does (session_connected); one still connecting, waiting for its PROXY
 * header or in a handshake is closed hard; one draining or closing already
 * is left to it. */
static void close_all(cp_service *svc, uint32_t drain_ms)
{
    size_t n;
    cp_session **all = snapshot(svc, &n);
    cp__batch_begin(svc->port);
    for (size_t i = 0; i < n; i++) {
        cp_session *s = all[i];
        if (!drain_ms) {
            cp__session_request_close(s, CP_REASON_STOPPING);
        } else if (cp__session_shutdown(s, drain_ms, CP_REASON_STOPPING) != 0) {
            int st = atomic_load(&s->state);
            if (st == CP_S_CONNECTING || st == CP_S_HANDSHAKING || st == CP_S_PROXY)
                cp__session_request_close(s, CP_REASON_STOPPING);
        }
        cp__session_unref(s);
    }
    cp__batch_end(svc->port);
    cp__free(all);
}

/* Waits until every session and the listener have finished, or until the
 * deadline (0: none). True if they have. */
static bool wait_drained(cp_service *svc, uint64_t deadline_ns)
{
    pthread_mutex_lock(&svc->lock);
    while (svc->objects > 0) {
        if (!deadline_ns) {
            pthread_cond_wait(&svc->drained, &svc->lock);
            continue;
        }
        uint64_t now = cp__now_ns();
        if (now >= deadline_ns)
            break;
        /* The condition variable's clock is the wall clock: wait for the
         * remaining time measured on it, and recheck against ours. */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t left = deadline_ns - now, ns = (uint64_t)ts.tv_nsec + left % 1000000000u;
        ts.tv_sec += (time_t)(left / 1000000000u + ns / 1000000000u);
        ts.tv_nsec = (long)(ns % 1000000000u);
        pthread_cond_timedwait(&svc->drained, &svc->lock, &ts);
    }
    bool done = svc->objects == 0;
    pthread_mutex_unlock(&svc->lock);
    return done;
}

int cp_service_stop_ex(cp_service *svc, uint32_t drain_ms, cp_service_stats *final)
{
    if (!svc)
        return -EINVAL;
    CP_ASSERT(cp__live_has(CP_LIVE_SERVICE, svc), "cp_service_stop: not a live service (stopped twice?)");
    if (cp__on_worker(svc->port))
        return -EDEADLK;
    if (atomic_exchange(&svc->stop_claimed, true))
        return -EALREADY;
    atomic_store(&svc->stop_drain_ms, drain_ms);
    if (svc->listener) {
        cp__listener_stop(svc);
        /* A draining stop (a rolling restart) loses no connection: what the
         * listener accepted until its socket closed joins the table and is
         * drained with the rest. A hard stop does not wait. */
        if (drain_ms) {
            pthread_mutex_lock(&svc->lock);
            while (!svc->listener_closed)
                pthread_cond_wait(&svc->drained, &svc->lock);
            pthread_mutex_unlock(&svc->lock);
        }
    }
    atomic_store(&svc->stopping, true);
    close_all(svc, drain_ms);
    if (drain_ms) {
        /* Each session's own deadline closes it hard; this one is a backstop
         * for the sessions that were closing already with a longer deadline
         * of their own, or whose close was underway. */
        uint64_t deadline = cp__now_ns() + ((uint64_t)drain_ms + 100u) * 1000000u;
        if (!wait_drained(svc, deadline))
            close_all(svc, 0);
    }
    wait_drained(svc, 0);
    /* Every session has finished, on its worker and before the lock above:
     * the counters are final and their last writes are visible here. */
    if (final)
        cp_service_stats_get(svc, final);
    service_free(svc);
    return 0;
}

/* ------------------------------------------------------------------ by id, broadcast */

int cp_service_send_to(cp_service *svc, uint64_t id, cp_sendbuf *b)
{
    if (!svc || !b)
        return -EINVAL;
    cp_session *s = lookup(svc, id);
    if (!s)
        return -ENOTCONN;
    int r = cp__session_send(s, b);
    cp__session_unref(s);
    return r;
}

int cp_service_disconnect_id(cp_service *svc, uint64_t id)
{
    if (!svc)
        return -EINVAL;
    cp_session *s = lookup(svc, id);
    if (!s)
        return -ENOTCONN;
    int r = cp_session_disconnect(s);
    cp__session_unref(s);
    return r;
}

int cp_service_broadcast(cp_service *svc, cp_sendbuf *b)
{
    if (!svc || !b)
        return -EINVAL;
    size_t n;
    cp_session **all = snapshot(svc, &n);
    if (!all)
        return -ENOMEM;
    int sent = 0;
    cp__batch_begin(svc->port);
    for (size_t i = 0; i < n; i++) {
        if (cp__session_send(all[i], b) == 0)
            sent++;
        cp__session_unref(all[i]);
    }
    cp__batch_end(svc->port);
    cp__free(all);
    return sent;
}

/* ------------------------------------------------------------------ accessors */

void *cp_service_ctx(const cp_service *svc) { return svc->ctx; }
cp_port *cp_service_get_port(const cp_service *svc) { return svc->port; }

uint16_t cp_service_listen_port(const cp_service *svc)
{
    const struct sockaddr *sa = (const struct sockaddr *)&svc->addr;
    if (sa->sa_family == AF_INET)
        return ntohs(((const struct sockaddr_in *)sa)->sin_port);
    if (sa->sa_family == AF_INET6)
        return ntohs(((const struct sockaddr_in6 *)sa)->sin6_port);
    return 0;
}

void cp_service_stats_get(const cp_service *svc, cp_service_stats *out)
{
    memset(out, 0, sizeof *out);
    cp_service *m = (cp_service *)svc; /* the lock is not part of the logical state */
    pthread_mutex_lock(&m->lock);
    out->sessions = svc->live;
    pthread_mutex_unlock(&m->lock);
    out->connected = atomic_load(&svc->st.connected);
    out->disconnected = atomic_load(&svc->st.disconnected);
    out->rejected = atomic_load(&svc->st.rejected);
    out->connect_failed = atomic_load(&svc->st.connect_failed);
    out->accept_errors = atomic_load(&svc->st.accept_errors);
    out->accepted = atomic_load(&svc->st.accepted);
    for (int i = 0; i < svc->port->nworkers; i++) {
        const cp_traffic *t = cp__traffic(m, &svc->port->workers[i]);
        out->bytes_in += atomic_load_explicit(&t->bytes_in, memory_order_relaxed);
        out->bytes_out += atomic_load_explicit(&t->bytes_out, memory_order_relaxed);
        out->packets_in += atomic_load_explicit(&t->packets_in, memory_order_relaxed);
        out->packets_out += atomic_load_explicit(&t->packets_out, memory_order_relaxed);
    }
    for (int i = 0; i < CP_REASON_COUNT_; i++)
        out->by_reason[i] = atomic_load(&svc->st.by_reason[i]);
    for (int i = 1; i < CP_REFUSED_COUNT_; i++)
        out->refused[i] = atomic_load(&svc->st.refused[i]);
    out->refused[CP_REFUSED_MAX_SESSIONS] = out->rejected;
}

void cp_service_metrics_get(const cp_service *svc, cp_service_metrics *out, uint64_t *route_packets, size_t n)
{
    memset(out, 0, sizeof *out);
    cp_service_stats_get(svc, &out->stats);
    cp_service *m = (cp_service *)svc; /* cp__traffic's pointer arithmetic; nothing is written */
    out->nroutes = svc->nroutes;
    for (size_t id = 0; id < n; id++)
        route_packets[id] = 0;
    uint64_t busy = 0; /* sessions with something queued */
    for (int i = 0; i < svc->port->nworkers; i++) {
        const cp_traffic *t = cp__traffic(m, &svc->port->workers[i]);
        out->unrouted_packets += atomic_load_explicit(&t->unrouted, memory_order_relaxed);
        out->send_queue.sum += atomic_load_explicit(&t->sq_mem, memory_order_relaxed);
        for (int k = 1; k < CP_METRICS_BUCKETS; k++)
            out->send_queue.buckets[k] += atomic_load_explicit(&t->sq_hist[k], memory_order_relaxed);
        const atomic_uint_fast64_t *row = svc->route_pkts + (size_t)svc->route_stride * (size_t)i;
        for (size_t id = 0; id < n && id < svc->nroutes; id++)
            route_packets[id] += atomic_load_explicit(&row[id], memory_order_relaxed);
    }
    for (int k = 1; k < CP_METRICS_BUCKETS; k++)
        busy += out->send_queue.buckets[k];
    /* The counts are read one by one while sessions come, go and move
     * between buckets: the live count may be a little below them. */
    out->send_queue.buckets[0] = out->stats.sessions > busy ? out->stats.sessions - busy : 0;
    out->send_queue.count = out->send_queue.buckets[0] + busy;
}

void cp__service_set_raw_limit(cp_service *svc, size_t bytes) { svc->raw_limit = bytes; }
