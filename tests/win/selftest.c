/* SPDX-License-Identifier: MIT */
/*
 * Self-test of the Criterion shim (tests/win/criterion): one test per kind of
 * outcome. Run by selftest.cmake, which checks the runner's verdict on each;
 * not part of the cport suite. Names say what the runner must report.
 */
#include <criterion/criterion.h>

#include <stdint.h>
#include <stdio.h>
#ifdef _WIN32
#  define WIN32_LEAN_AND_MEAN
#  include <windows.h>
#else
#  include <pthread.h>
#  include <time.h>
#endif

static void sleep_ms(unsigned ms)
{
#ifdef _WIN32
    Sleep(ms);
#else
    struct timespec ts = { (time_t)(ms / 1000), (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0)
        ;
#endif
}

Test(shim, pass_every_macro, .timeout = 10)
{
    int a = 1, b = 2;
    const char *s = "abc";
    void *nul = NULL;
    cr_assert(a < b);
    cr_assert(a < b, "with a message %d", a);
    cr_assert_eq(a, 1);
    cr_assert_neq(a, b, "msg");
    cr_assert_lt(a, b);
    cr_assert_leq(a, 1);
    cr_assert_gt(b, a);
    cr_assert_geq(b, 2, "%zu %llu", (size_t)1, (unsigned long long)UINT64_MAX);
    cr_assert_null(nul);
    cr_assert_not_null(s, "not null");
    cr_assert_str_eq(s, "abc");
    cr_assert_str_neq(s, "abd", "%s", s);
    cr_expect(a == 1);
    cr_expect_eq(a, 1, "m");
    cr_expect_geq(b, a);
    cr_expect_lt(a, b);
    cr_log_info("log line %d", 42);
}

Test(shim, pass_without_options) {}

Test(shim, fail_assert_stops_the_test, .timeout = 10)
{
    int x = 3;
    cr_assert_eq(x, 4, "x is %d", x);
    cr_log_info("NOT REACHED after a failed cr_assert");
}

Test(shim, fail_expect_goes_on, .timeout = 10)
{
    cr_expect_eq(1, 2, "expectation %s", "one");
    cr_log_info("reached after a failed cr_expect");
}

Test(shim, fail_str_eq, .timeout = 10) { cr_assert_str_eq("a", "b"); }

Test(shim, fail_timeout, .timeout = 1)
{
    sleep_ms(30000);
    cr_log_info("NOT REACHED after the timeout");
}

Test(shim, skip_with_reason, .timeout = 10)
{
    cr_skip_test("skipped because %s", "reasons");
    cr_log_info("NOT REACHED after cr_skip_test");
}

Test(shim, fail_expect_then_skip, .timeout = 10)
{
    cr_expect(0, "failed before the skip");
    cr_skip_test("a skip after a failed expectation");
}

Test(shim, crash_null_write, .timeout = 10)
{
    volatile uintptr_t addr = 8;
    *(volatile int *)addr = 1;
}

static void fail_on_this_thread(void) { cr_assert(0, "failed on another thread"); }

#ifdef _WIN32
static DWORD WINAPI failing_thread(void *arg)
{
    (void)arg;
    fail_on_this_thread();
    return 0;
}
#else
static void *failing_thread(void *arg)
{
    (void)arg;
    fail_on_this_thread();
    return NULL;
}
#endif

/* cr_assert on a thread other than the test's ends the test too. */
Test(shim, fail_assert_on_another_thread, .timeout = 10)
{
#ifdef _WIN32
    HANDLE h = CreateThread(NULL, 0, failing_thread, NULL, 0, NULL);
    WaitForSingleObject(h, INFINITE);
#else
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, failing_thread, NULL), 0);
    pthread_join(th, NULL);
#endif
    sleep_ms(2000);
    cr_log_info("NOT REACHED after a failed cr_assert on another thread");
}
