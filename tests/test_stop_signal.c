/* SPDX-License-Identifier: MIT */
/*
 * cp_wait_stop_signal: it returns the signal that asked the process to stop,
 * a stop request that comes while nobody waits is kept for the next wait, and
 * it works when the process started with the stop signals blocked (an
 * inherited mask). Each case runs in a child forked for it, so the handlers it
 * installs and the signals it takes stay out of the test runner.
 */
#include "helpers.h"

#ifdef _WIN32

Test(stop_signal, console_events, .timeout = 10)
{
    /* A console control event goes to every process of the console, the test
     * runner and ctest included. */
    cr_skip_test("console control events cannot be aimed at one test process");
}

#else

#  include <dirent.h>
#  include <pthread.h>
#  include <signal.h>
#  include <stdio.h>
#  include <string.h>
#  include <sys/wait.h>
#  include <time.h>
#  include <unistd.h>

static void *waiter_main(void *arg)
{
    *(int *)arg = cp_wait_stop_signal();
    return NULL;
}

/* Child exit codes. */
enum { OK = 0, NO_HANDLER = 10, WRONG_SIGNAL = 11, WRONG_SECOND = 12, THREAD = 13 };

/* Installs the handlers, starts a waiter thread, sends sig to the process
 * (the waiter may or may not be waiting yet) and checks that the waiter
 * returns sig. */
static int child_wait_once(int sig)
{
    if (cp_catch_stop_signals() != 0)
        return NO_HANDLER;
    int got = 0;
    pthread_t th;
    if (pthread_create(&th, NULL, waiter_main, &got))
        return THREAD;
    kill(getpid(), sig);
    pthread_join(th, NULL);
    return got == sig ? OK : WRONG_SIGNAL;
}

/* Prints where a stuck child is: its signal masks and pending sets, and each
 * thread's kernel wait channel. A lost signal shows as a waiter in
 * futex_wait with the signal neither pending nor blocked; a signal left
 * pending shows in ShdPnd. */
static void log_child_state(pid_t pid)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        if (!strncmp(line, "Sig", 3) || !strncmp(line, "ShdPnd", 6) || !strncmp(line, "Threads", 7))
            cr_log_info("child %s", line);
    }
    fclose(f);
    snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
    DIR *d = opendir(path);
    if (!d)
        return;
    struct dirent *t;
    while ((t = readdir(d)) != NULL) {
        if (t->d_name[0] == '.')
            continue;
        char wpath[sizeof path + sizeof t->d_name + 8];
        snprintf(wpath, sizeof wpath, "%s/%s/wchan", path, t->d_name);
        FILE *w = fopen(wpath, "r");
        if (!w)
            continue;
        if (fgets(line, sizeof line, w))
            cr_log_info("child thread %s waits in %s", t->d_name, line); /* wchan has no newline */
        fclose(w);
    }
    closedir(d);
}

/* Runs fn(arg) in a forked child and returns its exit code; fails the test if
 * the child does not exit within 15 s. A lost signal leaves it waiting for
 * ever; the child's own work takes well under a second, but this program
 * runs beside the sanitizer builds of the whole suite on two cores. */
static int in_child(int (*fn)(int), int arg)
{
    pid_t pid = fork();
    cr_assert_geq(pid, 0, "fork: %s", strerror(errno));
    if (pid == 0)
        _exit(fn(arg));
    int status = 0;
    uint64_t deadline = cpt_now_ms() + 15000;
    while (cpt_now_ms() < deadline) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid) {
            cr_assert(WIFEXITED(status), "child ended by signal %d",
                      WIFSIGNALED(status) ? WTERMSIG(status) : 0);
            return WEXITSTATUS(status);
        }
        struct timespec ts = { 0, 10000000 };
        nanosleep(&ts, NULL);
    }
    log_child_state(pid);
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    cr_assert_fail("cp_wait_stop_signal did not return within 15 s of the signal");
    return -1;
}

Test(stop_signal, returns_the_signal_that_asked_to_stop, .timeout = 40)
{
    cr_assert_eq(in_child(child_wait_once, SIGTERM), OK);
    cr_assert_eq(in_child(child_wait_once, SIGINT), OK);
}

/* After one wait has returned, a SIGINT with nobody waiting is kept: the next
 * call returns it at once. */
static int child_signal_kept(int unused)
{
    (void)unused;
    int r = child_wait_once(SIGTERM);
    if (r != OK)
        return r;
    kill(getpid(), SIGINT);
    return cp_wait_stop_signal() == SIGINT ? OK : WRONG_SECOND;
}

Test(stop_signal, a_request_while_nobody_waits_is_not_lost, .timeout = 40)
{
    cr_assert_eq(in_child(child_signal_kept, 0), OK);
}

/* The process starts with SIGINT and SIGTERM blocked in every thread (as
 * when a parent execs it with that mask): the waiting thread must unblock
 * them itself, or the signal stays pending for ever. */
static int child_blocked(int sig)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL); /* the waiter inherits it */
    return child_wait_once(sig);
}

Test(stop_signal, wait_stop_signal_returns_when_sigterm_was_blocked, .timeout = 40)
{
    cr_assert_eq(in_child(child_blocked, SIGTERM), OK);
}

#endif
