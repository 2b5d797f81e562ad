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
              WIFSIGNALED(status) ? "killed by signal" : "exited with", WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status), out);
    cr_assert(strstr(out, "cport: misuse: "), "no misuse message; stderr:\n%s", out);
    for (size_t i = 0; i < nwords; i++)
        cr_assert(strstr(out, words[i]), "the message does not name the misuse (\"%s\"):\n%s", words[i], out);
}
#endif

#define EXPECT_MISUSE(fn, ...)                                                         \
    do {                                                                               \
        static const char *const words_[] = {__VA_ARGS__};                             \
        run_misuse(fn, words_, sizeof words_ / sizeof words_[0]);                      \
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
    cp_handlers h = {0};
    cp_server_opts so = { .host = CPT_HOST4 };
    cp_service *svc;
    if (cp_server_start(&svc, port, &so, &h, NULL) != 0)
        _exit(4);
    if (cp_service_stop(svc) != 0)
        _exit(5);
    cp_service_stop(svc);
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

/* The checks must not fire on correct use: a refused stop or destroy keeps
 * the object live. Runs in every build. */
Test(misuse, correct_use_is_not_flagged, .timeout = 20)
{
    cp_port *port = cpt_xport(1);
    cp_handlers h = {0};
    cp_server_opts so = { .host = CPT_HOST4 };
    cp_service *svc;
    cr_assert_eq(cp_server_start(&svc, port, &so, &h, NULL), 0);
    cr_assert_eq(cp_port_destroy(port), -EBUSY);
    cr_assert_eq(cp_service_stop_ex(svc, 1, NULL), -ENOTSUP);
    cr_assert_eq(cp_service_stop(svc), 0);
    cpt_xport_destroy(port);
}
