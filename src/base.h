/* SPDX-License-Identifier: MIT */
/*
 * What every layer of cport shares: the log, the clock, allocation, the
 * misuse checks, and the intrusive list (queue.h). Nothing here is public.
 */
#ifndef CP_BASE_H
#define CP_BASE_H

#include "cport.h"
#include "queue.h"
#include "sys.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#define CP_UNUSED(x) ((void)(x))

/* ------------------------------------------------------------------ core.c */

void cp__log(cp_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
uint64_t cp__now_ns(void);
/* Every allocation of the library goes through these (cp_set_allocator):
 * NULL when out of memory, as malloc's. cp__zalloc is zeroed (calloc(1, n)).
 * The page cache and slabs map their own pages (mem/). */
void *cp__malloc(size_t n);
void *cp__calloc(size_t n, size_t size);
void *cp__realloc(void *p, size_t n);
void cp__free(void *p);
static inline void *cp__zalloc(size_t n) { return cp__calloc(1, n); }

/* ------------------------------------------------------------------ misuse checks */

/* CP_ASSERT(cond, "message"): a check of the caller's side of a contract
 * (a misuse of the API, not an internal invariant). In builds with the CMake
 * option CP_ASSERTS (on by default for Debug, sanitizer, fuzz and soak
 * builds) a false cond prints "cport: misuse: message (file:line)" to stderr
 * and aborts, so a fuzzer or a sanitizer run names the misuse instead of
 * finding corrupted memory later. Elsewhere it compiles to nothing and cond
 * is not evaluated. */
_Noreturn void cp__misuse(const char *msg, const char *file, int line);
int cp__asserts_on(void); /* 1 when built with CP_ASSERTS (for tests) */
#ifdef CP_ASSERTS
#  define CP_ASSERT(cond, msg) ((cond) ? (void)0 : cp__misuse((msg), __FILE__, __LINE__))
#else
#  define CP_ASSERT(cond, msg) ((void)sizeof(!(cond)))
#endif

/* Live-object registry for the misuse checks: ports and services are added
 * when created and removed just before they are freed, so that a second
 * cp_port_destroy or cp_service_stop is caught on entry without reading the
 * freed object. Only in CP_ASSERTS builds; elsewhere it costs nothing. */
enum { CP_LIVE_PORT, CP_LIVE_SERVICE };
#ifdef CP_ASSERTS
void cp__live_add(int kind, const void *p);
void cp__live_del(int kind, const void *p);
bool cp__live_has(int kind, const void *p);
#else
static inline void cp__live_add(int kind, const void *p) { (void)kind, (void)p; }
static inline void cp__live_del(int kind, const void *p) { (void)kind, (void)p; }
static inline bool cp__live_has(int kind, const void *p) { return (void)kind, (void)p, true; }
#endif

#endif
