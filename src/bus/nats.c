/* SPDX-License-Identifier: MIT */
/*
 * The NATS driver: the client protocol over one cport client session.
 *
 * Why not libnats (the official C client): it brings its own threads, its
 * own sockets and a readiness loop, so every message would cross from its
 * thread to a worker, and the broker connection would live outside the
 * port's rounds, its backpressure and its memory bounds. The protocol is a
 * few text lines (nats_wire.c); over a cport session it is read in place
 * from the worker's receive buffer, and a publish is one line plus the
 * caller's buffer, shared, in the session's gather write.
 */
#include "bus/bus.h"
#include "bus/nats_wire.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

/* A SUB line: the verb, a subject and a queue name of up to a control line,
 * a sid. */
#define LINE_MAX_ (CP_NATS_CONTROL_MAX + 64)

static int send_line(cp_bus *bus, const char *line, size_t n)
{
    return n ? cp__bus_send_copy(bus, 0, line, n) : -EINVAL;
}

static int nats_subscribe(cp_bus *bus, cp_bus_sub *sub)
{
    char line[LINE_MAX_];
    return send_line(bus, line, cp__nats_sub(line, sizeof line, sub->subject, sub->queue, sub->sid));
}

static int nats_unsubscribe(cp_bus *bus, cp_bus_sub *sub)
{
    char line[64];
    return send_line(bus, line, cp__nats_unsub(line, sizeof line, sub->sid));
}

static int nats_hello(cp_bus *bus)
{
    char line[512];
    int r = send_line(bus, line, cp__nats_connect(line, sizeof line, bus->name));
    if (r == 0)
        r = cp__bus_each_sub(bus, nats_subscribe);
    /* The PONG says the server has read all of the above. */
    return r == 0 ? cp__bus_send_copy(bus, 0, "PING\r\n", 6) : r;
}

static int nats_ping(cp_bus *bus) { return cp__bus_send_copy(bus, 0, "PING\r\n", 6); }

/* A payload up to this size, or one without a send buffer, is copied into
 * the connection's open buffer behind its PUB line; a larger send buffer is
 * queued itself. */
#define PUB_COPY_MAX 2048u

/* "PUB subject len\r\n", head, the payload, CRLF. */
static int nats_publish(cp_bus *bus, const char *subject, const uint8_t *head, size_t head_len,
                        const cp_bus_payload *p)
{
    char line[LINE_MAX_ + 64];
    size_t n = cp__nats_pub_head(line, LINE_MAX_, subject, head_len + p->len);
    if (!n || head_len > 64)
        return -EINVAL;
    if (head_len)
        memcpy(line + n, head, head_len);
    int r = cp__bus_append(bus, 0, line, n + head_len, false);
    if (r == 0)
        r = p->buf && p->len > PUB_COPY_MAX ? cp__bus_send(bus, 0, p->buf, false)
                                            : cp__bus_append(bus, 0, p->data, p->len, false);
    return r == 0 ? cp__bus_append(bus, 0, "\r\n", 2, true) : r;
}

static int nats_sub_ok(const char *subject, const char *queue)
{
    if (!cp__nats_subject_ok(subject, 1) || (queue && !cp__nats_queue_ok(queue)))
        return -EINVAL;
    if (strlen(subject) + (queue ? strlen(queue) : 0) > CP_NATS_CONTROL_MAX - 64)
        return -EINVAL;
    return 0;
}

/* INFO's max_payload, read without a JSON parser: the number after the key
 * (the key cannot appear inside another value the server sends). */
static void info_read(cp_bus *bus, const uint8_t *json, size_t len)
{
    static const char key[] = "\"max_payload\":";
    size_t kn = sizeof key - 1;
    for (size_t i = 0; i + kn < len; i++) {
        if (memcmp(json + i, key, kn) != 0)
            continue;
        size_t v = 0, j = i + kn;
        while (j < len && json[j] == ' ')
            j++;
        while (j < len && json[j] >= '0' && json[j] <= '9' && v < ((size_t)1 << 40))
            v = v * 10 + (size_t)(json[j++] - '0');
        if (v)
            cp__bus_set_max_payload(bus, v);
        return;
    }
}

static void on_msg(cp_bus *bus, const cp_nats_op *op)
{
    /* The subject and reply as C strings: they sit in the receive buffer,
     * followed by more of the line. */
    char subject[CP_NATS_CONTROL_MAX + 1], reply[CP_NATS_CONTROL_MAX + 1];
    memcpy(subject, op->subject, op->subject_len);
    subject[op->subject_len] = '\0';
    memcpy(reply, op->reply, op->reply_len);
    reply[op->reply_len] = '\0';
    cp_bus_msg m = { .subject = subject, .data = op->data, .len = op->len, .reply = reply };
    cp__bus_deliver_sid(bus, op->sid, &m);
}

static void on_err(cp_bus *bus, cp_session *s, const cp_nats_op *op)
{
    int len = op->len > 200 ? 200 : (int)op->len;
    cp__log(CP_LOG_WARN, "bus: the NATS server says: %.*s", len, (const char *)op->data);
    if (op->len >= 13 && !memcmp(op->data, "Slow Consumer", 13)) {
        cp__bus_slow_consumer(bus);
        cp_session_disconnect(s); /* it cuts us anyway: reconnect at once */
    }
}

static size_t nats_input(cp_bus *bus, cp_session *s, int i, const uint8_t *p, size_t n)
{
    (void)i;
    size_t used = 0;
    while (used < n && cp_session_connected(s)) {
        cp_nats_op op;
        long r = cp__nats_parse(p + used, n - used, bus->max_payload, &op);
        if (r == 0)
            break;
        if (r < 0) {
            cp__log(CP_LOG_WARN, "bus: not the NATS protocol from the server (%s): reconnecting",
                    cp_strerror((int)r));
            cp_session_disconnect(s);
            return n;
        }
        used += (size_t)r;
        switch (op.kind) {
        case CP_NATS_MSG: on_msg(bus, &op); break;
        case CP_NATS_PING:
            pthread_mutex_lock(&bus->lock);
            cp__bus_send_copy(bus, 0, "PONG\r\n", 6);
            pthread_mutex_unlock(&bus->lock);
            break;
        case CP_NATS_PONG: cp__bus_pong(bus); break;
        case CP_NATS_INFO: info_read(bus, op.data, op.len); break;
        case CP_NATS_ERR: on_err(bus, s, &op); break;
        case CP_NATS_OK: break;
        }
    }
    return used;
}

const cp_bus_driver cp__bus_nats = {
    .conns = 1,
    .hello = nats_hello,
    .input = nats_input,
    .publish = nats_publish,
    .subscribe = nats_subscribe,
    .unsubscribe = nats_unsubscribe,
    .ping = nats_ping,
    .sub_ok = nats_sub_ok,
};
