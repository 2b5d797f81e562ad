/* SPDX-License-Identifier: MIT */
/*
 * The Redis driver: pub/sub over two cport client sessions, a subscribing
 * one (in subscribe mode Redis accepts nothing but (UN)SUBSCRIBE and PING)
 * and a publishing one. RESP goes through hiredis's reader and command
 * formatter (libhiredis-dev); only the sockets are cport's. hiredis's
 * reader keeps its own buffer, allocated with plain malloc (hiredis 0.14
 * has no allocator hooks), and bounded here.
 *
 * Redis has no "echo off": a server gets its own publishes back. Every
 * payload the bus publishes carries its origin, so they are dropped: a room
 * message in its envelope (bridge.c), any other behind a 12-byte tag
 * ("cpo\x01" and the origin) that subscribers here remove. A payload
 * without either (from a publisher that is not cport) is delivered as is.
 */
#include "bus/bus.h"
#include "bus/nats_wire.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>

#include <hiredis/hiredis.h>

#define TAG_MAGIC "cpo\x01"
#define TAG_LEN 12u
/* Unconsumed bytes the reader may hold: a whole message of the largest
 * payload, and its framing. */
#define READER_MAX ((1u << 20) + 8192u)

/* A command in RESP through hiredis's formatter, queued on connection i. */
static int send_command(cp_bus *bus, int i, int argc, const char **argv, const size_t *lens)
{
    char *cmd = NULL;
    int n = redisFormatCommandArgv(&cmd, argc, argv, lens);
    if (n < 0)
        return -ENOMEM;
    int r = cp__bus_send_copy(bus, i, cmd, (size_t)n);
    redisFreeCommand(cmd);
    return r;
}

static int command1(cp_bus *bus, int i, const char *verb, const char *arg)
{
    const char *argv[2] = { verb, arg };
    size_t lens[2] = { strlen(verb), arg ? strlen(arg) : 0 };
    return send_command(bus, i, arg ? 2 : 1, argv, lens);
}

/* Whether another live subscription has sub's subject: Redis subscribes a
 * channel once, however many subscriptions share it. Under the bus's lock. */
static bool subject_shared(const cp_bus *bus, const cp_bus_sub *sub)
{
    for (uint32_t i = 0; i < bus->capsubs; i++) {
        const cp_bus_sub *o = bus->subs[i];
        if (o && o != sub && !strcmp(o->subject, sub->subject))
            return true;
    }
    return false;
}

static int redis_subscribe(cp_bus *bus, cp_bus_sub *sub)
{
    return subject_shared(bus, sub) ? 0 : command1(bus, 0, "SUBSCRIBE", sub->subject);
}

static int redis_unsubscribe(cp_bus *bus, cp_bus_sub *sub)
{
    /* sub has left the table: another subscription still named is shared. */
    return subject_shared(bus, sub) ? 0 : command1(bus, 0, "UNSUBSCRIBE", sub->subject);
}

/* After a connect: each subject once, sent by the first of its
 * subscriptions in the table. */
static int resubscribe(cp_bus *bus, cp_bus_sub *sub)
{
    for (uint32_t i = 0; i < bus->capsubs && bus->subs[i] != sub; i++)
        if (bus->subs[i] && !strcmp(bus->subs[i]->subject, sub->subject))
            return 0;
    return command1(bus, 0, "SUBSCRIBE", sub->subject);
}

static int redis_hello(cp_bus *bus)
{
    const char *argv[3] = { "CLIENT", "SETNAME", bus->name };
    size_t lens[3] = { 6, 7, strlen(bus->name) };
    int r = send_command(bus, 0, 3, argv, lens);
    if (r == 0)
        r = send_command(bus, 1, 3, argv, lens);
    return r == 0 ? cp__bus_each_sub(bus, resubscribe) : r;
}

static int redis_ping(cp_bus *bus) { return command1(bus, 0, "PING", NULL); }

static int redis_publish(cp_bus *bus, const char *subject, const uint8_t *head, size_t head_len,
                         const cp_bus_payload *p)
{
    uint8_t tag[TAG_LEN];
    if (!head_len) {
        /* NOLINTNEXTLINE(bugprone-not-null-terminated-result): bytes on the wire, not a C string */
        memcpy(tag, TAG_MAGIC, 4);
        cp_put_u64(tag + 4, bus->origin);
        head = tag;
        head_len = sizeof tag;
    }
    size_t len = head_len + p->len;
    uint8_t *msg = cp__malloc(len);
    if (!msg)
        return -ENOMEM;
    memcpy(msg, head, head_len);
    if (p->len) /* data may be NULL then */
        memcpy(msg + head_len, p->data, p->len);
    const char *argv[3] = { "PUBLISH", subject, (const char *)msg };
    size_t lens[3] = { 7, strlen(subject), len };
    char *cmd = NULL;
    int n = redisFormatCommandArgv(&cmd, 3, argv, lens);
    cp__free(msg);
    if (n < 0)
        return -ENOMEM;
    int r = cp__bus_append(bus, 1, cmd, (size_t)n, true);
    redisFreeCommand(cmd);
    return r;
}

static int redis_sub_ok(const char *subject, const char *queue)
{
    if (queue)
        return -ENOTSUP; /* Redis pub/sub has no queue groups */
    if (!cp__nats_subject_ok(subject, 1))
        return -EINVAL;
    return cp__nats_subject_ok(subject, 0) ? 0 : -ENOTSUP; /* nor NATS's wildcards */
}

/* ------------------------------------------------------------------ input */

static bool is_str(const redisReply *r, const char *s)
{
    return r->type == REDIS_REPLY_STRING && r->len == strlen(s) && !memcmp(r->str, s, r->len);
}

/* A "message" push: the payload without this bus's tag, or dropped when it is
 * this bus's own. */
static void on_message(cp_bus *bus, const redisReply *channel, const redisReply *payload)
{
    const uint8_t *data = (const uint8_t *)payload->str;
    size_t len = payload->len;
    if (len >= TAG_LEN && !memcmp(data, TAG_MAGIC, 4)) {
        if (cp_get_u64(data + 4) == bus->origin)
            return;
        data += TAG_LEN;
        len -= TAG_LEN;
    } else if (len >= CP_BUS_ENVELOPE && !memcmp(data, CP_BUS_MAGIC, 4) &&
               cp_get_u64(data + 4) == bus->origin) {
        return;
    }
    if (channel->len > CP_NATS_CONTROL_MAX)
        return;
    char subject[CP_NATS_CONTROL_MAX + 1];
    memcpy(subject, channel->str, channel->len);
    subject[channel->len] = '\0';
    cp_bus_msg m = { .subject = subject, .data = data, .len = len, .reply = "" };
    cp__bus_deliver_subject(bus, &m);
}

static void on_reply(cp_bus *bus, int i, const redisReply *r)
{
    if (r->type == REDIS_REPLY_ERROR) {
        cp__log(CP_LOG_WARN, "bus: Redis says: %.*s", (int)(r->len > 200 ? 200 : r->len), r->str);
        return;
    }
    if (i != 0 || r->type != REDIS_REPLY_ARRAY || r->elements < 2)
        return; /* PUBLISH counts, +OK */
    const redisReply *kind = r->element[0];
    if (is_str(kind, "message") && r->elements == 3 && r->element[1]->type == REDIS_REPLY_STRING &&
        r->element[2]->type == REDIS_REPLY_STRING)
        on_message(bus, r->element[1], r->element[2]);
    else if (is_str(kind, "pong"))
        cp__bus_pong(bus);
}

/* The reader of each connection lives in its slot of the driver state, made
 * on the first bytes and freed when the connection ends. */
/*
 * hiredis 0.14 (Debian 12) allocates an array reply's element table as soon
 * as it reads the header, for any count: "*300000000" from the server asked
 * for 2.4 GB (found by fuzz_redis). The replies the bus reads are pushes of
 * 3 or 4 elements and (p)subscribe confirmations, so an array longer than
 * READER_MAX_ELEMENTS is refused before the allocation: the reader reports
 * an error and the connection ends with -EPROTO.
 */
#define READER_MAX_ELEMENTS 64
static redisReplyObjectFunctions reader_fns;
static void *(*reader_create_array)(const redisReadTask *, int);
static pthread_once_t reader_fns_once = PTHREAD_ONCE_INIT;

static void *create_array_bounded(const redisReadTask *task, int elements)
{
    if (elements < 0 || elements > READER_MAX_ELEMENTS)
        return NULL; /* hiredis: out of memory, the reader's error */
    return reader_create_array(task, elements);
}

static void reader_fns_init(void)
{
    redisReader *probe = redisReaderCreate();
    if (!probe)
        return;
    reader_fns = *probe->fn;
    reader_create_array = reader_fns.createArray;
    reader_fns.createArray = create_array_bounded;
    redisReaderFree(probe);
}

int cp__bus_redis_feed(cp_bus *bus, int i, const uint8_t *p, size_t n)
{
    redisReader *rd = bus->drv_state[i];
    if (!rd) {
        pthread_once(&reader_fns_once, reader_fns_init);
        if (!reader_create_array)
            return -ENOMEM;
        rd = redisReaderCreateWithFunctions(&reader_fns);
        if (!rd)
            return -ENOMEM;
        bus->drv_state[i] = rd;
    }
    if (redisReaderFeed(rd, (const char *)p, n) != REDIS_OK || rd->len - rd->pos > READER_MAX)
        return -EMSGSIZE;
    for (;;) {
        void *reply;
        if (redisReaderGetReply(rd, &reply) != REDIS_OK)
            return -EPROTO;
        if (!reply)
            return 0;
        on_reply(bus, i, reply);
        freeReplyObject(reply);
    }
}

static size_t redis_input(cp_bus *bus, cp_session *s, int i, const uint8_t *p, size_t n)
{
    int r = cp__bus_redis_feed(bus, i, p, n);
    if (r < 0) {
        cp__log(CP_LOG_WARN, "bus: %s from Redis: reconnecting",
                r == -EPROTO     ? "not RESP"
                : r == -EMSGSIZE ? "more than a message's limit"
                                 : "out of memory");
        cp_session_disconnect(s);
    }
    return n;
}

void cp__bus_redis_conn_closed(cp_bus *bus, int i)
{
    if (bus->drv_state[i])
        redisReaderFree(bus->drv_state[i]);
    bus->drv_state[i] = NULL;
}

const cp_bus_driver cp__bus_redis = {
    .conns = 2,
    .hello = redis_hello,
    .input = redis_input,
    .publish = redis_publish,
    .subscribe = redis_subscribe,
    .unsubscribe = redis_unsubscribe,
    .ping = redis_ping,
    .sub_ok = redis_sub_ok,
    .conn_closed = cp__bus_redis_conn_closed,
};
