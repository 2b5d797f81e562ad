/* SPDX-License-Identifier: MIT */
/*
 * The runner of the Criterion-compatible shim (see criterion.h for why it
 * exists and what it supports): the Windows build, and the ThreadSanitizer
 * build on Linux.
 *
 * Without --run, every selected test runs in a child process: this program
 * started again as `prog --run suite::name`, with the same standard handles
 * and environment. The child's exit code is the verdict (PASS, FAIL, SKIP
 * below); any other code, an unhandled exception or a signal is a crash. A
 * child that outlives its test's .timeout is terminated and the test fails.
 * On Linux the child is a fork that execs the program again, never a bare
 * fork: a fresh process is what ThreadSanitizer can follow, and it is the
 * same isolation as on Windows.
 */
#include "criterion.h"

#ifdef _WIN32
#  define WIN32_LEAN_AND_MEAN
#  include <windows.h>
#  include <wchar.h>
#else
#  include <signal.h>
#  include <sys/wait.h>
#  include <time.h>
#  include <unistd.h>
#endif

#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

/* The verdicts a child exits with. POSIX keeps only 8 bits of an exit code;
 * the values stay clear of ThreadSanitizer's report exit code (66). */
enum {
    CR_EXIT_PASS = 0,
#ifdef _WIN32
    CR_EXIT_FAIL = 0x4346, /* "CF" */
    CR_EXIT_SKIP = 0x4353, /* "CS" */
#else
    CR_EXIT_FAIL = 0x46, /* "F" */
    CR_EXIT_SKIP = 0x53, /* "S" */
#endif
    CR_MAX_TESTS = 1024,
};

typedef struct cr_test {
    const char *suite, *name;
    cr_test_fn_ fn;
    const struct criterion_test_extra_data *extra;
} cr_test;

static cr_test g_tests[CR_MAX_TESTS];
static int g_ntests;
static atomic_int g_expect_failures;

void cr_register_test_(const char *suite, const char *name, cr_test_fn_ fn,
                       const struct criterion_test_extra_data *extra)
{
    if (g_ntests == CR_MAX_TESTS) {
        fprintf(stderr, "criterion shim: more than %d tests\n", CR_MAX_TESTS);
        abort();
    }
    g_tests[g_ntests++] = (cr_test){ suite, name, fn, extra };
}

/* Ends this (child) process at once with the verdict. Worker threads may
 * still be running after a failed assertion, so no exit handlers run (a
 * sanitizer's own end-of-process check still does: it intercepts _exit). */
static __attribute__((noreturn)) void finish(unsigned code)
{
    fflush(NULL);
#ifdef _WIN32
    TerminateProcess(GetCurrentProcess(), code);
    ExitProcess(code); /* not reached */
#else
    _exit((int)code);
#endif
}

static void vreport(const char *prefix, const char *fmt, va_list ap)
{
    char msg[2048];
    if (fmt[0] == ' ') /* the macros' prefix, see criterion.h */
        fmt++;
    vsnprintf(msg, sizeof msg, fmt, ap);
    if (msg[0])
        fprintf(stderr, "%s%s\n", prefix, msg);
}

void cr_fail_(int fatal, const char *file, int line, const char *expr, const char *fmt, ...)
{
    fprintf(stderr, "[----] %s:%d: %s: %s\n", file, line, fatal ? "Assertion Failed" : "Expectation Failed",
            expr);
    va_list ap;
    va_start(ap, fmt);
    vreport("[----]   ", fmt, ap);
    va_end(ap);
    if (fatal)
        finish(CR_EXIT_FAIL);
    atomic_fetch_add(&g_expect_failures, 1);
}

void cr_skip_(const char *file, int line, const char *fmt, ...)
{
    fprintf(stderr, "[----] %s:%d: Test skipped\n", file, line);
    va_list ap;
    va_start(ap, fmt);
    vreport("[----]   ", fmt, ap);
    va_end(ap);
    /* A skip never hides an expectation that already failed. */
    finish(atomic_load(&g_expect_failures) ? CR_EXIT_FAIL : CR_EXIT_SKIP);
}

void cr_log_(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport("[----] ", fmt, ap);
    va_end(ap);
}

#ifdef _WIN32
static LONG WINAPI on_crash(EXCEPTION_POINTERS *ep)
{
    fprintf(stderr, "[----] CRASH: exception 0x%08lx at %p\n",
            (unsigned long)ep->ExceptionRecord->ExceptionCode, ep->ExceptionRecord->ExceptionAddress);
    finish((unsigned)ep->ExceptionRecord->ExceptionCode);
}

/* A crashing test names its exception itself (on_crash). */
static void catch_crashes(void) { SetUnhandledExceptionFilter(on_crash); }
#else
/* On POSIX a crash is a signal, which the parent names (verdict below); a
 * sanitizer prints its own report first. */
static void catch_crashes(void) {}
#endif

static int by_name(const void *a, const void *b)
{
    const cr_test *x = a, *y = b;
    int c = strcmp(x->suite, y->suite);
    return c ? c : strcmp(x->name, y->name);
}

/* '*' and '?' glob, as Criterion's --filter on "suite/name". */
static bool glob(const char *p, const char *s)
{
    if (*p == '\0')
        return *s == '\0';
    if (*p == '*')
        return glob(p + 1, s) || (*s && glob(p, s + 1));
    return *s && (*p == '?' || *p == *s) && glob(p + 1, s + 1);
}

static bool selected(const cr_test *t, const char *filter)
{
    if (!filter)
        return true;
    char full[512];
    snprintf(full, sizeof full, "%s/%s", t->suite, t->name);
    return glob(filter, full);
}

#ifdef _WIN32

static double now_s(void)
{
    LARGE_INTEGER f, c;
    QueryPerformanceFrequency(&f);
    QueryPerformanceCounter(&c);
    return (double)c.QuadPart / (double)f.QuadPart;
}

/* Runs t in a child process; returns its exit code, or -1 if it timed out,
 * -2 if it could not be started. */
static long long run_child(const cr_test *t)
{
    wchar_t exe[MAX_PATH], cmd[MAX_PATH + 600];
    DWORD n = GetModuleFileNameW(NULL, exe, MAX_PATH);
    if (n == 0 || n >= MAX_PATH)
        return -2;
    char tail[600];
    wchar_t wtail[600];
    snprintf(tail, sizeof tail, " --run %s::%s", t->suite, t->name);
    if (!MultiByteToWideChar(CP_UTF8, 0, tail, -1, wtail, 600))
        return -2;
    wcscpy(cmd, L"\"");
    wcscat(cmd, exe);
    wcscat(cmd, L"\"");
    wcscat(cmd, wtail);

    STARTUPINFOW si;
    memset(&si, 0, sizeof si);
    si.cb = sizeof si;
    si.dwFlags = STARTF_USESTDHANDLES;
    si.hStdInput = GetStdHandle(STD_INPUT_HANDLE);
    si.hStdOutput = GetStdHandle(STD_OUTPUT_HANDLE);
    si.hStdError = GetStdHandle(STD_ERROR_HANDLE);
    HANDLE std[3] = { si.hStdInput, si.hStdOutput, si.hStdError };
    for (int i = 0; i < 3; i++)
        if (std[i] && std[i] != INVALID_HANDLE_VALUE)
            SetHandleInformation(std[i], HANDLE_FLAG_INHERIT, HANDLE_FLAG_INHERIT);
    PROCESS_INFORMATION pi;
    /* Under Wine, CreateProcess fails now and then with ERROR_INTERNAL_ERROR
     * (1359) while the machine is busy (twice in 41 test programs, two
     * cores, ctest -j2); the same start succeeds a moment later. A child
     * that never started has not run the test, so the start is tried again
     * before it counts as a failure. */
    for (int attempt = 1;; attempt++) {
        if (CreateProcessW(exe, cmd, NULL, NULL, TRUE, 0, NULL, NULL, &si, &pi))
            break;
        DWORD err = GetLastError();
        fprintf(stderr, "[----] CreateProcess failed: error %lu (attempt %d of 5)\n", (unsigned long)err,
                attempt);
        if (attempt == 5)
            return -2;
        Sleep(200);
    }
    CloseHandle(pi.hThread);
    double limit = t->extra->timeout;
    DWORD wait = limit > 0 ? (DWORD)(limit * 1000.0 + 0.5) : INFINITE;
    long long rc;
    if (WaitForSingleObject(pi.hProcess, wait) == WAIT_TIMEOUT) {
        TerminateProcess(pi.hProcess, 1);
        WaitForSingleObject(pi.hProcess, INFINITE);
        rc = -1;
    } else {
        DWORD code = 1;
        GetExitCodeProcess(pi.hProcess, &code);
        rc = code;
    }
    CloseHandle(pi.hProcess);
    return rc;
}

#else

static const char *g_argv0;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* The child's verdict from its wait status: its exit code, or the signal that
 * ended it as 0x100 + signal (not a code _exit can give). */
static long long verdict(int status)
{
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) {
        fprintf(stderr, "[----] CRASH: signal %d (%s)\n", WTERMSIG(status), strsignal(WTERMSIG(status)));
        return 0x100 + WTERMSIG(status);
    }
    return 1;
}

/* Runs t in a child process; returns its exit code (see verdict), or -1 if it
 * timed out, -2 if it could not be started. The wait polls every 5 ms: the
 * parent has nothing else to do, and no SIGCHLD handler is needed. */
static long long run_child(const cr_test *t)
{
    char run[600];
    snprintf(run, sizeof run, "%s::%s", t->suite, t->name);
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "[----] fork failed: %s\n", strerror(errno));
        return -2;
    }
    if (pid == 0) {
        char *args[] = { (char *)g_argv0, (char *)"--run", run, NULL };
        execv("/proc/self/exe", args);
        execv(g_argv0, args);
        fprintf(stderr, "[----] exec %s failed: %s\n", g_argv0, strerror(errno));
        _exit(127);
    }
    double limit = t->extra->timeout, t0 = now_s();
    int status = 0;
    for (;;) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid)
            return verdict(status);
        if (r < 0 && errno != EINTR) {
            fprintf(stderr, "[----] waitpid failed: %s\n", strerror(errno));
            return -2;
        }
        if (limit > 0 && now_s() - t0 > limit) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            return -1;
        }
        struct timespec ts = { 0, 5000000 };
        nanosleep(&ts, NULL);
    }
}

#endif

static int usage(const char *prog)
{
    fprintf(stderr,
            "usage: %s [--list] [--filter GLOB] [--run SUITE::NAME] [--jobs N]\n"
            "  --list, -l        list the tests\n"
            "  --filter GLOB     run the tests whose \"suite/name\" matches GLOB ('*', '?')\n"
            "  --run SUITE::NAME run one test in this process (no isolation, no timeout)\n"
            "  --jobs N, -j N    accepted for Criterion compatibility; tests run one at a time\n",
            prog);
    return 2;
}

int main(int argc, char **argv)
{
    const char *filter = NULL, *run = NULL;
    bool list = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--list") || !strcmp(a, "-l"))
            list = true;
        else if ((!strcmp(a, "--filter") || !strcmp(a, "--run") || !strcmp(a, "--jobs") ||
                  !strcmp(a, "-j")) &&
                 i + 1 < argc) {
            if (!strcmp(a, "--filter"))
                filter = argv[i + 1];
            else if (!strcmp(a, "--run"))
                run = argv[i + 1];
            i++;
        } else if (!strncmp(a, "--filter=", 9))
            filter = a + 9;
        else if (!strncmp(a, "--jobs=", 7) || (!strncmp(a, "-j", 2) && a[2]) || !strncmp(a, "--verbose", 9))
            ; /* accepted, ignored */
        else
            return usage(argv[0]);
    }
    qsort(g_tests, (size_t)g_ntests, sizeof g_tests[0], by_name);

    if (list) {
        for (int i = 0; i < g_ntests; i++)
            if (selected(&g_tests[i], filter))
                printf("%s::%s\n", g_tests[i].suite, g_tests[i].name);
        return 0;
    }

    if (run) {
        for (int i = 0; i < g_ntests; i++) {
            char full[512];
            snprintf(full, sizeof full, "%s::%s", g_tests[i].suite, g_tests[i].name);
            if (strcmp(full, run) != 0)
                continue;
            catch_crashes();
            g_tests[i].fn();
            finish(atomic_load(&g_expect_failures) ? CR_EXIT_FAIL : CR_EXIT_PASS);
        }
        fprintf(stderr, "no test named %s\n", run);
        return 2;
    }

#ifdef _WIN32
    /* No crash dialog (or debugger under Wine) for a crashing child: the
     * error mode is inherited. */
    SetErrorMode(SEM_FAILCRITICALERRORS | SEM_NOGPFAULTERRORBOX | SEM_NOOPENFILEERRORBOX);
#else
    g_argv0 = argv[0];
#endif
    setvbuf(stderr, NULL, _IONBF, 0);
    int tested = 0, passing = 0, failing = 0, crashing = 0, skipped = 0;
    for (int i = 0; i < g_ntests; i++) {
        const cr_test *t = &g_tests[i];
        if (!selected(t, filter))
            continue;
        tested++;
        double t0 = now_s();
        long long rc = run_child(t);
        double took = now_s() - t0;
        if (rc == CR_EXIT_PASS) {
            passing++;
            fprintf(stderr, "[PASS] %s::%s: (%.2fs)\n", t->suite, t->name, took);
        } else if (rc == CR_EXIT_SKIP) {
            skipped++;
            fprintf(stderr, "[SKIP] %s::%s: (%.2fs)\n", t->suite, t->name, took);
        } else if (rc == CR_EXIT_FAIL) {
            failing++;
            fprintf(stderr, "[FAIL] %s::%s: (%.2fs)\n", t->suite, t->name, took);
        } else if (rc == -1) {
            failing++;
            fprintf(stderr, "[FAIL] %s::%s: Timed out. (%.2fs)\n", t->suite, t->name, took);
        } else if (rc == -2) {
            failing++;
            fprintf(stderr, "[FAIL] %s::%s: its process could not be started.\n", t->suite, t->name);
        } else {
            crashing++;
            fprintf(stderr, "[----] %s::%s: CRASH! (exit code 0x%llx)\n", t->suite, t->name,
                    (unsigned long long)rc);
            fprintf(stderr, "[FAIL] %s::%s: (%.2fs)\n", t->suite, t->name, took);
        }
    }
    fprintf(stderr, "[====] Synthesis: Tested: %d | Passing: %d | Failing: %d | Crashing: %d | Skipped: %d\n",
            tested, passing, failing, crashing, skipped);
    return failing || crashing ? 1 : 0;
}
