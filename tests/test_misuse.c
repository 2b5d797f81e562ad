/* SPDX-License-Identifier: MIT */
/*
 * Misuse of the API caught by the library's own checks (CP_ASSERT, on in
 * Debug and sanitizer builds: make check). Each misuse runs in a forked
 * child whose stderr is captured: the child must die of SIGABRT after
 * printing "cport: misuse: " and words naming the misuse. The objects a
 * misuse touches a second time are freed, so these checks must not read
 * them: the sanitizers of make check would report such a read instead.
 * Skipped where the checks are compiled out, and on Windows (no fork).
 */
#include "helpers.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifndef _WIN32
#  include <signal.h>
#  include <sys/wait.h>
#endif

int cp__asserts_on(void); /* src/core.c: 1 when built with CP_ASSERTS */

typedef void (*misuse_fn)(void);

#ifndef _WIN32
/* Runs fn in a child with stderr into a pipe; fails the test unless the
 * child was killed by SIGABRT and its stderr holds every one of the words. */
static void expect_misuse(misuse_fn fn, const char *const *words, size_t nwords)
{
    int pfd[2];
    cr_assert_eq(pipe(pfd), 0);
    fflush(NULL);
    pid_t pid = fork();
    cr_assert_geq(pid, 0, "fork: %s", strerror(errno));
    if (pid == 0) {
        dup2(pfd[1], 2);
        close(pfd[0]);
        close(pfd[1]);
        fn();
        _exit(0); /* not caught: the parent sees a normal exit */
    }
    close(pfd[1]);
    char out[4096];
    size_t n = 0;
    ssize_t r;
    while (n < sizeof out - 1 && (r = read(pfd[0], out + n, sizeof out - 1 - n)) != 0) {
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            break;
        n += (size_t)r;
    }
    out[n] = 0;
    close(pfd[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    cr_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT,
              "the misuse was not caught (child %s %d); its stderr:\n%s",
              WIFSIGNALED(status) ? "killed by signal" : "exited with",
              WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status), out);
    cr_assert(strstr(out, "cport: misuse: "), "no misuse message; stderr:\n%s", out);
    for (size_t i = 0; i < nwords; i++)
        cr_assert(strstr(out, words[i]), "the message does not name the misuse (\"%s\"):\n%s", words[i], out);
}
#endif

#define EXPECT_MISUSE(fn, ...)                                                                               \
  do {                                                                                                       \
    static const char *const words_[] = { __VA_ARGS__ };                                                     \
    run_misuse(fn, words_, sizeof words_ / sizeof words_[0]);                                                \
  } while (0)

static void run_misuse(misuse_fn fn, const char *const *words, size_t nwords)
{
#ifdef _WIN32
    (void)fn, (void)words, (void)nwords;
    cr_skip_test("misuse checks are tested with fork, which Windows lacks");
#else
    if (!cp__asserts_on())
        cr_skip_test("built without CP_ASSERTS (a release build): the checks are compiled out");
    expect_misuse(fn, words, nwords);
#endif
}

/* ------------------------------------------------------------------ the misuses */

static void destroy_port_twice(void)
{
    cp_port *port;
    cp_port_opts o = { .workers = 1, .backend = cpt_env_backend() };
    if (cp_port_create(&port, &o) != 0)
        _exit(3);
    if (cp_port_destroy(port) != 0)
        _exit(4);
    cp_port_destroy(port);
}

static void stop_service_twice(void)
{
    cp_port *port;
    cp_port_opts o = { .workers = 1, .backend = cpt_env_backend() };
    if (cp_port_create(&port, &o) != 0)
        _exit(3);
    cp_handlers h = { 0 };
    cp_server_opts so = { .host = CPT_HOST4 };
    cp_service *svc;
    if (cp_server_start(&svc, port, &so, &h, NULL) != 0)
        _exit(4);
    if (cp_service_stop(svc) != 0)
        _exit(5);
    cp_service_stop(svc);
}

static void unref_buffer_twice(void)
{
    cp_sendbuf *b = cp_sendbuf_copy("x", 1);
    if (!b)
        _exit(3);
    cp_sendbuf_unref(b);
    cp_sendbuf_unref(b);
}

static void unref_shared_buffer_below_zero(void)
{
    cp_sendbuf *b = cp_sendbuf_copy("x", 1);
    if (!b)
        _exit(3);
    cp_sendbuf_ref(b);
    cp_sendbuf_unref(b); /* the decrementing path */
    cp_sendbuf_unref(b); /* the last reference */
    cp_sendbuf_unref(b);
}

static void open_two_buffers(void)
{
    cp_sendbuf *a = cp_sendbuf_open(16);
    if (!a)
        _exit(3);
    cp_sendbuf_open(16);
}

static void open_after_a_large_one(void)
{
    cp_sendbuf *a = cp_sendbuf_open(64u << 10); /* allocated alone, not carved */
    if (!a)
        _exit(3);
    cp_sendbuf_open(16);
}

static _Atomic(cp_session *) connected_session;

static void keep_connected(cp_session *s) { atomic_store(&connected_session, s); }

/* A session the caller never took a reference on, released anyway (as if
 * the session pointer of a callback were the caller's to drop). */
static void unref_session_not_referenced(void)
{
    cp_port *port;
    cp_port_opts o = { .workers = 2, .backend = cpt_env_backend() };
    if (cp_port_create(&port, &o) != 0)
        _exit(3);
    cp_handlers h = { .on_connected = keep_connected };
    cp_server_opts so = { .host = CPT_HOST4 };
    cp_service *svc;
    if (cp_server_start(&svc, port, &so, &h, NULL) != 0)
        _exit(4);
    int fd = cpt_connect(CPT_HOST4, cp_service_listen_port(svc), 0);
    if (fd < 0)
        _exit(5);
    for (int i = 0; i < 5000 && !atomic_load(&connected_session); i++)
        cpt_sleep_ms(1);
    cp_session *s = atomic_load(&connected_session);
    if (!s)
        _exit(6);
    cp_session_ref(s);
    cp_session_unref(s);
    cp_session_unref(s);
}

/* ------------------------------------------------------------------ the tests */

Test(misuse, port_destroyed_twice, .timeout = 20)
{
    EXPECT_MISUSE(destroy_port_twice, "cp_port_destroy", "destroyed twice");
}

Test(misuse, service_stopped_twice, .timeout = 20)
{
    EXPECT_MISUSE(stop_service_twice, "cp_service_stop", "stopped twice");
}

Test(misuse, send_buffer_released_twice, .timeout = 20)
{
    EXPECT_MISUSE(unref_buffer_twice, "cp_sendbuf_unref", "released twice");
}

Test(misuse, shared_send_buffer_released_once_too_often, .timeout = 20)
{
    EXPECT_MISUSE(unref_shared_buffer_below_zero, "cp_sendbuf_unref", "released twice");
}

Test(misuse, second_send_buffer_opened_on_one_thread, .timeout = 20)
{
    EXPECT_MISUSE(open_two_buffers, "cp_sendbuf_open", "already open");
}

Test(misuse, second_send_buffer_opened_after_a_large_one, .timeout = 20)
{
    EXPECT_MISUSE(open_after_a_large_one, "cp_sendbuf_open", "already open");
}

Test(misuse, session_released_more_often_than_referenced, .timeout = 20)
{
    EXPECT_MISUSE(unref_session_not_referenced, "cp_session_unref", "more references dropped");
}

/* The checks must not fire on correct use: the shortcuts (copy, packet,
 * send_copy's copy) are allowed while a buffer is open, and a buffer may be
 * opened again once closed. Runs in every build. */
Test(misuse, correct_use_is_not_flagged, .timeout = 20)
{
    cp_sendbuf *a = cp_sendbuf_open(16);
    cr_assert_not_null(a);
    cp_sendbuf *c = cp_sendbuf_copy("abc", 3);
    cp_sendbuf *p = cp_packet_make(1, "x", 1);
    cr_assert(c && p);
    memcpy(cp_sendbuf_data(a), "0123456789abcdef", 16);
    cp_sendbuf_close(a, 16);
    cp_sendbuf *a2 = cp_sendbuf_open(64u << 10);
    cr_assert_not_null(a2);
    cp_sendbuf_close(a2, 10);
    cp_sendbuf *a3 = cp_sendbuf_open(16);
    cr_assert_not_null(a3);
    cp_sendbuf_close(a3, 1);
    cr_assert_eq(memcmp(cp_sendbuf_data(c), "abc", 3), 0);
    cr_assert_eq(memcmp(cp_sendbuf_data(a), "0123456789abcdef", 16), 0);
    cp_sendbuf_unref(a);
    cp_sendbuf_unref(a2);
    cp_sendbuf_unref(a3);
    cp_sendbuf_unref(c);
    cp_sendbuf_unref(p);
    /* Stop and destroy once each, and a refused destroy keeps the port live. */
    cp_port *port = cpt_xport(1);
    cp_handlers h = { 0 };
    cp_server_opts so = { .host = CPT_HOST4 };
    cp_service *svc;
    cr_assert_eq(cp_server_start(&svc, port, &so, &h, NULL), 0);
    cr_assert_eq(cp_port_destroy(port), -EBUSY);
    cr_assert_eq(cp_service_stop(svc), 0);
    cpt_xport_destroy(port);
}
