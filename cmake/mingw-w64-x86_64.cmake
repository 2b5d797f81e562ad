# SPDX-License-Identifier: MIT
# Cross-compiling cport for 64-bit Windows with mingw-w64 (Debian:
# gcc-mingw-w64-x86-64), running the programs and tests under Wine:
#
#   cmake -S . -B build-win -DCMAKE_TOOLCHAIN_FILE=cmake/mingw-w64-x86_64.cmake
#   cmake --build build-win && (cd build-win && ctest)
#
# tools/test-windows.sh does all of it, Wine set-up included. Executables are
# linked statically (C runtime, libgcc, winpthreads), so they need no DLL next
# to them, under Wine or on Windows.
set(CMAKE_SYSTEM_NAME Windows)
set(CMAKE_SYSTEM_PROCESSOR x86_64)

set(CP_MINGW_PREFIX x86_64-w64-mingw32)
# The -posix compilers use winpthreads for the C11/C++11 thread support, the
# threads cport uses too; fall back to the default alternative.
find_program(CP_MINGW_CC NAMES ${CP_MINGW_PREFIX}-gcc-posix ${CP_MINGW_PREFIX}-gcc REQUIRED)
find_program(CP_MINGW_CXX NAMES ${CP_MINGW_PREFIX}-g++-posix ${CP_MINGW_PREFIX}-g++)
find_program(CP_MINGW_RC NAMES ${CP_MINGW_PREFIX}-windres)
set(CMAKE_C_COMPILER ${CP_MINGW_CC})
if(CP_MINGW_CXX)
  set(CMAKE_CXX_COMPILER ${CP_MINGW_CXX})
endif()
if(CP_MINGW_RC)
  set(CMAKE_RC_COMPILER ${CP_MINGW_RC})
endif()

set(CMAKE_FIND_ROOT_PATH /usr/${CP_MINGW_PREFIX})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# ctest (and add_test COMMAND <target>) run the .exe files through Wine.
find_program(CP_WINE64 NAMES wine64 PATHS /usr/lib/wine NO_DEFAULT_PATH)
if(NOT CP_WINE64)
  find_program(CP_WINE64 NAMES wine64 wine)
endif()
if(CP_WINE64)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${CP_WINE64})
endif()

set(CMAKE_EXE_LINKER_FLAGS_INIT "-static -static-libgcc")

# Not for Windows: the benchmarks (Linux peers) and io_uring.
set(CP_BENCH OFF CACHE BOOL "Build the benchmarks" FORCE)
set(CP_URING OFF CACHE BOOL "Build the io_uring backend (needs liburing)" FORCE)
