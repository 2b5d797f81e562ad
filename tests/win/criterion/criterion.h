/* SPDX-License-Identifier: MIT */
/*
 * A small Criterion-compatible test runner, for the Windows (mingw-w64) build
 * of the test suite and the ThreadSanitizer build on Linux (make check-tsan).
 *
 * Why it exists: Criterion has no mingw-w64 package in Debian, and cross-
 * building it means cross-building boxfort, nanomsg, nanopb and libffi too.
 * Under ThreadSanitizer, Criterion's own runner cannot start (its inheritable
 * arena collides with TSan's memory layout). The suite uses a small part of
 * Criterion, so this header and runner.c provide exactly that part, with the
 * same semantics, and nothing more:
 *
 *   Test(suite, name, .timeout = N) { ... }    registration (a constructor)
 *   cr_assert(cond, [fmt, args...])            false: the test fails and stops
 *   cr_assert_eq/neq/lt/leq/gt/geq(a, b, [fmt, args...])
 *   cr_assert_null/not_null(p, [fmt, args...])
 *   cr_assert_str_eq/str_neq(a, b, [fmt, args...])
 *   cr_expect(cond, ...), cr_expect_eq/geq/lt(a, b, ...)
 *                                              false: the test fails, goes on
 *   cr_log_info(fmt, args...)                  a line in the test's output
 *   cr_assert_fail([fmt, args...])             the test fails and stops
 *   cr_skip_test([fmt, args...])               the test stops, counted skipped
 *                                              (failed, if a cr_expect failed)
 *
 * The runner (runner.c provides main) isolates tests like Criterion: with no
 * arguments it runs every test in its own child process (the program started
 * again with --run suite::name), kills a child that runs past its .timeout,
 * prints each result and a synthesis, and exits non-zero if any test failed
 * or crashed. Options: --list (-l), --filter GLOB (on "suite/name"),
 * --run suite::name (one test in this process), --jobs N / -j N (accepted
 * and ignored: tests run one at a time).
 *
 * Messages must be string literals (every use in the suite is): the macros
 * paste the optional message after " ", which keeps the format non-empty when
 * it is absent (the runner drops that leading space).
 */
#ifndef CPT_WIN_CRITERION_H
#define CPT_WIN_CRITERION_H

#include <stdbool.h>
#include <stddef.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

struct criterion_test_extra_data {
    int sentinel_;           /* lets Test() initialize with { 0, <designators> } */
    double timeout;          /* seconds; 0 = no limit */
    const char *description; /* accepted, unused */
};

typedef void (*cr_test_fn_)(void);

/* mingw's printf checks name the C runtime's dialect; gnu_printf is the one
 * its stdio (__USE_MINGW_ANSI_STDIO) implements, and plain printf elsewhere. */
#ifdef _WIN32
#  define CR_PRINTF_(f, a) __attribute__((format(gnu_printf, f, a)))
#else
#  define CR_PRINTF_(f, a) __attribute__((format(printf, f, a)))
#endif

void cr_register_test_(const char *suite, const char *name, cr_test_fn_ fn,
                       const struct criterion_test_extra_data *extra);
void cr_fail_(int fatal, const char *file, int line, const char *expr, const char *fmt, ...) CR_PRINTF_(5, 6);
void cr_skip_(const char *file, int line, const char *fmt, ...) CR_PRINTF_(3, 4) __attribute__((noreturn));
void cr_log_(const char *fmt, ...) CR_PRINTF_(1, 2);

#define Test(suite, name, ...)                                                                               \
  static void cr_test_##suite##_##name(void);                                                                \
  static const struct criterion_test_extra_data cr_extra_##suite##_##name = { 0, __VA_ARGS__ };              \
  __attribute__((constructor)) static void cr_register_##suite##_##name(void)                                \
  {                                                                                                          \
    cr_register_test_(#suite, #name, cr_test_##suite##_##name, &cr_extra_##suite##_##name);                  \
  }                                                                                                          \
  static void cr_test_##suite##_##name(void)

/* fatal = 1 stops the test (cr_assert), 0 records the failure (cr_expect). */
#define cr_check_(fatal, cond, expr, ...)                                                                    \
  do {                                                                                                       \
    if (!(cond))                                                                                             \
      cr_fail_((fatal), __FILE__, __LINE__, (expr), " " __VA_ARGS__);                                        \
  } while (0)

#define cr_assert(cond, ...) cr_check_(1, cond, #cond, __VA_ARGS__)
#define cr_assert_eq(a, b, ...) cr_check_(1, (a) == (b), #a " == " #b, __VA_ARGS__)
#define cr_assert_neq(a, b, ...) cr_check_(1, (a) != (b), #a " != " #b, __VA_ARGS__)
#define cr_assert_lt(a, b, ...) cr_check_(1, (a) < (b), #a " < " #b, __VA_ARGS__)
#define cr_assert_leq(a, b, ...) cr_check_(1, (a) <= (b), #a " <= " #b, __VA_ARGS__)
#define cr_assert_gt(a, b, ...) cr_check_(1, (a) > (b), #a " > " #b, __VA_ARGS__)
#define cr_assert_geq(a, b, ...) cr_check_(1, (a) >= (b), #a " >= " #b, __VA_ARGS__)
#define cr_assert_null(p, ...) cr_check_(1, (p) == NULL, #p " == NULL", __VA_ARGS__)
#define cr_assert_not_null(p, ...) cr_check_(1, (p) != NULL, #p " != NULL", __VA_ARGS__)
#define cr_assert_str_eq(a, b, ...) cr_check_(1, strcmp((a), (b)) == 0, #a " equals " #b, __VA_ARGS__)
#define cr_assert_str_neq(a, b, ...) cr_check_(1, strcmp((a), (b)) != 0, #a " differs from " #b, __VA_ARGS__)
#define cr_assert_fail(...) cr_fail_(1, __FILE__, __LINE__, "cr_assert_fail()", " " __VA_ARGS__)

#define cr_expect(cond, ...) cr_check_(0, cond, #cond, __VA_ARGS__)
#define cr_expect_eq(a, b, ...) cr_check_(0, (a) == (b), #a " == " #b, __VA_ARGS__)
#define cr_expect_geq(a, b, ...) cr_check_(0, (a) >= (b), #a " >= " #b, __VA_ARGS__)
#define cr_expect_lt(a, b, ...) cr_check_(0, (a) < (b), #a " < " #b, __VA_ARGS__)
#define cr_expect_leq(a, b, ...) cr_check_(0, (a) <= (b), #a " <= " #b, __VA_ARGS__)
#define cr_expect_gt(a, b, ...) cr_check_(0, (a) > (b), #a " > " #b, __VA_ARGS__)

#define cr_skip_test(...) cr_skip_(__FILE__, __LINE__, " " __VA_ARGS__)
#define cr_log_info(...) cr_log_(" " __VA_ARGS__)

#ifdef __cplusplus
}
#endif
#endif /* CPT_WIN_CRITERION_H */
