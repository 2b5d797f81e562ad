/* SPDX-License-Identifier: MIT */
/*
 * Source addresses: the key the caps count by, trusted ranges (CIDR), and
 * the table of caps by address (docs/design.md, "Caps by source address").
 *
 * The table is a hash of live-session counts and accept-rate state keyed by
 * address (an IPv4 address, or an IPv6 /64), shared by every worker under
 * one lock: it is touched only when a connection is accepted, when its
 * PROXY header is read and when its session finishes, never per message.
 * Its memory is bounded whatever addresses an attacker sprays: an entry is
 * freed once it holds no session and its rate state has run out (at most a
 * second after its last connection), an incremental sweep finds those, and
 * at most max_sessions + ADDR_SLACK entries exist: entries with live
 * sessions are at most max_sessions, so when the table is full one with
 * only rate state is forgotten (that address's rate starts afresh, which an
 * attacker spraying that many addresses gains nothing from: the total rate
 * cap still holds).
 */
#include "net/net.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Entries beyond max_sessions, for addresses with rate state alone. */
#define ADDR_SLACK 4096u
#define ADDR_MIN_CAP 64u
/* Slots the sweep looks at per new entry. */
#define SWEEP_STEP 4u

static uint64_t load_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

static bool v4_mapped(const struct in6_addr *a)
{
    static const uint8_t prefix[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };
    return memcmp(a->s6_addr, prefix, sizeof prefix) == 0;
}

/* IPv4 keys sit in ::ffff:0:0/96, where no /64 key can land (a /64 key's
 * low half is 0). */
static cp_addr_key key_v4(const uint8_t *ip4)
{
    return (cp_addr_key){ .hi = 0,
                          .lo = UINT64_C(0xffff00000000) | (uint64_t)ip4[0] << 24 | (uint64_t)ip4[1] << 16 |
                                (uint64_t)ip4[2] << 8 | ip4[3] };
}

bool cp__addr_key(const struct sockaddr *sa, socklen_t len, cp_addr_key *k)
{
    if (sa->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        *k = key_v4((const uint8_t *)&((const struct sockaddr_in *)sa)->sin_addr);
        return true;
    }
    if (sa->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        if (v4_mapped(a))
            *k = key_v4(a->s6_addr + 12);
        else
            *k = (cp_addr_key){ .hi = load_be64(a->s6_addr), .lo = 0 };
        return true;
    }
    return false;
}

/* ------------------------------------------------------------------ trusted ranges */

/* One range: an IPv4 range is kept as IPv4-mapped IPv6 (prefix + 96), so
 * that one comparison serves both families. */
struct cp_cidr {
    uint8_t a[16];
    uint8_t bits;
};

static bool cidr_one(const char *s, size_t n, cp_cidr *out)
{
    char buf[INET6_ADDRSTRLEN + 8];
    if (n == 0 || n >= sizeof buf)
        return false;
    memcpy(buf, s, n);
    buf[n] = '\0';
    char *slash = strchr(buf, '/');
    long bits = -1;
    if (slash) {
        *slash = '\0';
        const char *d = slash + 1;
        if (!*d || strlen(d) > 3)
            return false;
        bits = 0;
        for (; *d; d++) {
            if (*d < '0' || *d > '9')
                return false;
            bits = bits * 10 + (*d - '0');
        }
    }
    memset(out, 0, sizeof *out);
    uint8_t v4[4];
    if (inet_pton(AF_INET, buf, v4) == 1) {
        if (bits > 32)
            return false;
        out->a[10] = out->a[11] = 0xff;
        memcpy(out->a + 12, v4, 4);
        out->bits = (uint8_t)(96 + (bits < 0 ? 32 : bits));
    } else if (inet_pton(AF_INET6, buf, out->a) == 1) {
        if (bits > 128)
            return false;
        out->bits = (uint8_t)(bits < 0 ? 128 : bits);
    } else {
        return false;
    }
    /* Host bits set are a typing error more often than not ("10.0.0.1/8"). */
    for (int i = out->bits; i < 128; i++)
        if (out->a[i / 8] & (0x80 >> (i % 8)))
            return false;
    return true;
}

int cp__cidr_parse(const char *list, cp_cidr **out, uint32_t *n)
{
    *out = NULL;
    *n = 0;
    if (!list || !*list)
        return -EINVAL;
    uint32_t count = 1;
    for (const char *p = list; *p; p++)
        count += *p == ',';
    cp_cidr *v = cp__malloc(sizeof *v * count);
    if (!v)
        return -ENOMEM;
    uint32_t k = 0;
    for (const char *p = list;;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (!cidr_one(p, len, &v[k++])) {
            cp__free(v);
            return -EINVAL;
        }
        if (!e)
            break;
        p = e + 1;
    }
    *out = v;
    *n = k;
    return 0;
}

bool cp__cidr_match(const cp_cidr *v, uint32_t n, const struct sockaddr *sa, socklen_t len)
{
    uint8_t a[16] = { 0 };
    if (sa->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        a[10] = a[11] = 0xff;
        memcpy(a + 12, &((const struct sockaddr_in *)sa)->sin_addr, 4);
    } else if (sa->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        memcpy(a, &((const struct sockaddr_in6 *)sa)->sin6_addr, 16);
    } else {
        return false;
    }
    for (uint32_t i = 0; i < n; i++) {
        int full = v[i].bits / 8, rest = v[i].bits % 8;
        if (memcmp(a, v[i].a, (size_t)full) != 0)
            continue;
        if (rest && ((a[full] ^ v[i].a[full]) & (uint8_t)(0xff00 >> rest)))
            continue;
        return true;
    }
    return false;
}

/* ------------------------------------------------------------------ the table */

typedef struct addr_ent {
    cp_addr_key k;
    uint64_t tat;  /* GCRA: the theoretical arrival time of the next connection */
    uint32_t live; /* sessions counted under this address */
    bool used;
} addr_ent;

struct cp_addrcap {
    pthread_mutex_t lock;
    bool by_addr;                       /* a cap by address is on: t exists (fixed at creation) */
    uint32_t per_addr;                  /* live sessions per address; 0 = off */
    uint64_t addr_cost_ns, addr_win_ns; /* rate per address: one connection, the burst; 0 = off */
    uint64_t cost_ns, win_ns;           /* total rate; 0 = off */
    uint64_t tat;                       /* the total rate's */
    uint64_t seed;
    addr_ent *t;
    size_t cap, n, limit, max_cap, sweep;
};

/* GCRA with a burst of as many connections as a second's rate: true (and
 * the connection taken from the rate) if one more fits now. */
static bool rate_take(uint64_t *tat, uint64_t cost, uint64_t win, uint64_t now)
{
    uint64_t t = *tat > now ? *tat : now;
    if (t + cost - now > win)
        return false;
    *tat = t + cost;
    return true;
}

static size_t pow2_at_least(size_t v)
{
    size_t p = ADDR_MIN_CAP;
    while (p < v)
        p *= 2;
    return p;
}

int cp__addrcap_new(cp_addrcap **out, uint32_t per_addr, uint32_t rate_per_addr, uint32_t rate,
                    uint32_t max_sessions)
{
    *out = NULL;
    cp_addrcap *c = cp__zalloc(sizeof *c);
    if (!c)
        return -ENOMEM;
    c->per_addr = per_addr;
    if (rate_per_addr) {
        c->addr_cost_ns = 1000000000u / rate_per_addr;
        c->addr_win_ns = c->addr_cost_ns * rate_per_addr;
    }
    if (rate) {
        c->cost_ns = 1000000000u / rate;
        c->win_ns = c->cost_ns * rate;
    }
    if (per_addr || rate_per_addr) {
        c->by_addr = true;
        c->limit = (size_t)max_sessions + ADDR_SLACK;
        c->max_cap = pow2_at_least(c->limit * 2);
        c->cap = ADDR_MIN_CAP;
        c->t = cp__zalloc(sizeof *c->t * c->cap);
        if (!c->t) {
            cp__free(c);
            return -ENOMEM;
        }
    }
    /* Addresses are the attacker's choice: where they land is not. */
    c->seed = cp__now_ns() * UINT64_C(0x9e3779b97f4a7c15) ^ (uint64_t)(uintptr_t)c;
    pthread_mutex_init(&c->lock, NULL);
    *out = c;
    return 0;
}

void cp__addrcap_free(cp_addrcap *c)
{
    if (!c)
        return;
    pthread_mutex_destroy(&c->lock);
    cp__free(c->t);
    cp__free(c);
}

/* Not c->t, which a growing table replaces under the lock. */
bool cp__addrcap_by_addr(const cp_addrcap *c) { return c && c->by_addr; }

static uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= UINT64_C(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x *= UINT64_C(0xc4ceb9fe1a85ec53);
    return x ^ (x >> 33);
}

static size_t home(const cp_addrcap *c, cp_addr_key k)
{
    return (size_t)mix(k.hi ^ mix(k.lo ^ c->seed)) & (c->cap - 1);
}

static bool key_eq(cp_addr_key a, cp_addr_key b) { return a.hi == b.hi && a.lo == b.lo; }

static size_t find(const cp_addrcap *c, cp_addr_key k)
{
    for (size_t i = home(c, k);; i = (i + 1) & (c->cap - 1)) {
        if (!c->t[i].used || key_eq(c->t[i].k, k))
            return i;
    }
}

/* Linear probing's deletion by backward shift: the entries after i that
 * would no longer be found move up, so no tombstones build up. */
static void del_at(cp_addrcap *c, size_t i)
{
    size_t mask = c->cap - 1;
    for (size_t j = (i + 1) & mask; c->t[j].used; j = (j + 1) & mask) {
        size_t h = home(c, c->t[j].k);
        /* t[j] stays if its home lies cyclically in (i, j]. */
        bool stays = i <= j ? (h > i && h <= j) : (h > i || h <= j);
        if (!stays) {
            c->t[i] = c->t[j];
            i = j;
        }
    }
    c->t[i].used = false;
    c->n--;
}

static bool idle(const addr_ent *e, uint64_t now) { return e->live == 0 && e->tat <= now; }

/* A few slots on from the sweep's place: idle entries go. */
static void sweep(cp_addrcap *c, uint64_t now)
{
    for (unsigned k = 0; k < SWEEP_STEP; k++) {
        size_t i = c->sweep & (c->cap - 1);
        if (c->t[i].used && idle(&c->t[i], now))
            del_at(c, i); /* what moved into i is looked at next time */
        else
            c->sweep = i + 1;
    }
}

/* The table is full: forget the first entry from the sweep's place that
 * holds no session (there is one while the table has its room: at most
 * max_sessions hold any); false if none does. */
static bool evict(cp_addrcap *c)
{
    for (size_t k = 0; k < c->cap; k++) {
        size_t i = c->sweep++ & (c->cap - 1);
        if (c->t[i].used && c->t[i].live == 0) {
            del_at(c, i);
            return true;
        }
    }
    return false;
}

/* Doubles the table, up to max_cap; false if it cannot (it stays as it is). */
static bool grow(cp_addrcap *c)
{
    if (c->cap >= c->max_cap)
        return false;
    addr_ent *old = c->t;
    size_t ocap = c->cap;
    addr_ent *t = cp__zalloc(sizeof *t * ocap * 2);
    if (!t)
        return false;
    c->t = t;
    c->cap = ocap * 2;
    for (size_t i = 0; i < ocap; i++)
        if (old[i].used)
            c->t[find(c, old[i].k)] = old[i];
    cp__free(old);
    return true;
}

/* The entry for k, made if need be; NULL only when out of memory. Locked. */
static addr_ent *entry(cp_addrcap *c, cp_addr_key k, uint64_t now)
{
    size_t i = find(c, k);
    if (c->t[i].used)
        return &c->t[i];
    sweep(c, now);
    if (c->n + 1 > c->cap / 2)
        grow(c);
    /* Past the limit, or a table that could not grow filling up. */
    if ((c->n >= c->limit || c->n + 1 > c->cap * 3 / 4) && !evict(c) && c->n + 1 >= c->cap)
        return NULL;
    i = find(c, k);
    c->t[i] = (addr_ent){ .k = k, .tat = 0, .live = 0, .used = true };
    c->n++;
    return &c->t[i];
}

bool cp__addrcap_total(cp_addrcap *c, uint64_t now)
{
    if (!c || !c->cost_ns)
        return true;
    pthread_mutex_lock(&c->lock);
    bool ok = rate_take(&c->tat, c->cost_ns, c->win_ns, now);
    pthread_mutex_unlock(&c->lock);
    return ok;
}

int cp__addrcap_admit(cp_addrcap *c, cp_addr_key k, uint64_t now)
{
    pthread_mutex_lock(&c->lock);
    addr_ent *e = entry(c, k, now);
    int r = -1;
    /* No entry: out of memory with every entry holding sessions; refusing
     * is the safe side. */
    if (!e || (c->per_addr && e->live >= c->per_addr))
        r = CP_REFUSED_PER_ADDR;
    else if (c->addr_cost_ns && !rate_take(&e->tat, c->addr_cost_ns, c->addr_win_ns, now))
        r = CP_REFUSED_ADDR_RATE;
    else
        e->live++;
    if (r >= 0 && e && idle(e, now)) /* a refusal leaves nothing to keep */
        del_at(c, (size_t)(e - c->t));
    pthread_mutex_unlock(&c->lock);
    return r;
}

void cp__addrcap_release(cp_addrcap *c, cp_addr_key k)
{
    pthread_mutex_lock(&c->lock);
    size_t i = find(c, k);
    if (c->t[i].used && c->t[i].live > 0 && --c->t[i].live == 0 && c->t[i].tat <= cp__now_ns())
        del_at(c, i);
    pthread_mutex_unlock(&c->lock);
}

size_t cp__addrcap_entries(cp_addrcap *c)
{
    pthread_mutex_lock(&c->lock);
    size_t n = c->n;
    pthread_mutex_unlock(&c->lock);
    return n;
}
