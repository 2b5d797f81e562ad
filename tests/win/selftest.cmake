# SPDX-License-Identifier: MIT
# Checks the Criterion shim's runner (tests/win/criterion) on its self-test
# program (tests/win/selftest.c), which has one test per kind of outcome:
#   cmake -DEMULATOR=<wine64 or empty> -DEXE=<criterion_selftest.exe> -P selftest.cmake
# Fails (FATAL_ERROR) unless every verdict, message and count is as expected.
if(NOT EXE)
  message(FATAL_ERROR "usage: cmake -DEMULATOR=... -DEXE=... -P selftest.cmake")
endif()

execute_process(COMMAND ${EMULATOR} ${EXE} --jobs 1
                OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc TIMEOUT 50)
set(all "${out}${err}")
message("${all}")

set(problems)
if(rc EQUAL 0)
  list(APPEND problems "the runner exited 0 although tests failed")
endif()
foreach(want
    "[PASS] shim::pass_every_macro"
    "[PASS] shim::pass_without_options"
    "[FAIL] shim::fail_assert_stops_the_test"
    "x is 3"
    "[FAIL] shim::fail_expect_goes_on"
    "expectation one"
    "reached after a failed cr_expect"
    "[FAIL] shim::fail_str_eq"
    "[FAIL] shim::fail_timeout: Timed out."
    "[SKIP] shim::skip_with_reason"
    "skipped because reasons"
    "shim::crash_null_write: CRASH!"
    "[FAIL] shim::fail_assert_on_another_thread"
    "[FAIL] shim::fail_expect_then_skip"
    "failed on another thread"
    "log line 42"
    "Synthesis: Tested: 10 | Passing: 2 | Failing: 6 | Crashing: 1 | Skipped: 1")
  string(FIND "${all}" "${want}" at)
  if(at LESS 0)
    list(APPEND problems "missing: ${want}")
  endif()
endforeach()
string(FIND "${all}" "NOT REACHED" at)
if(at GREATER -1)
  list(APPEND problems "a test went on after it should have stopped (NOT REACHED printed)")
endif()
# The 1 s timeout is enforced, not the test's 30 s sleep.
string(REGEX MATCH "fail_timeout: Timed out. \\(([0-9]+)\\." m "${all}")
if(NOT m OR CMAKE_MATCH_1 GREATER 5)
  list(APPEND problems "the 1 s timeout was not enforced in time")
endif()

execute_process(COMMAND ${EMULATOR} ${EXE} --list OUTPUT_VARIABLE list RESULT_VARIABLE rc2)
string(REGEX MATCHALL "shim::[a-z_]+" names "${list}")
list(LENGTH names n)
if(NOT rc2 EQUAL 0 OR NOT n EQUAL 10)
  list(APPEND problems "--list printed ${n} tests (exit ${rc2}), expected 10")
endif()

execute_process(COMMAND ${EMULATOR} ${EXE} --filter "shim/pass_*"
                OUTPUT_VARIABLE fout ERROR_VARIABLE ferr RESULT_VARIABLE rc3)
string(FIND "${fout}${ferr}" "Tested: 2 | Passing: 2 | Failing: 0" at)
if(NOT rc3 EQUAL 0 OR at LESS 0)
  list(APPEND problems "--filter shim/pass_* did not run exactly the 2 passing tests (exit ${rc3})")
endif()

if(problems)
  string(REPLACE ";" "\n  " problems "${problems}")
  message(FATAL_ERROR "criterion shim self-test failed:\n  ${problems}")
endif()
message("criterion shim self-test: ok")
