#!/bin/sh
# SPDX-License-Identifier: MIT
# Builds cport and its test suite for 64-bit Windows with mingw-w64 and runs
# the suite (every socket test on the IOCP backend) under Wine, headless:
#
#   tools/test-windows.sh [ctest arguments...]     e.g.  -R flaws  or  -V
#
# As root it installs the missing Debian packages (gcc-mingw-w64-x86-64, wine64,
# wine); otherwise it prints the apt-get command. Environment:
#   BUILD_WIN      build directory (default build-win)
#   WINEPREFIX     Wine prefix (default $HOME/.wine-cport; created if missing)
#   CTEST_TIMEOUT  seconds for the whole ctest run (default 1800)
#   JOBS           build parallelism (default: nproc)
# Exits with ctest's status. The Wine server it starts is stopped on exit.
set -eu

cd "$(dirname "$0")/.."
BUILD_WIN=${BUILD_WIN:-build-win}
CTEST_TIMEOUT=${CTEST_TIMEOUT:-1800}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
export WINEPREFIX="${WINEPREFIX:-$HOME/.wine-cport}"
export WINEDEBUG=-all
export WINEARCH=win64

# ------------------------------------------------------------------ packages
pkgs="cmake make gcc-mingw-w64-x86-64 wine64 wine"
missing=
for p in $pkgs; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "installing:$missing"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
    else
        echo "missing Debian packages; run:"
        echo "  sudo apt-get install -y --no-install-recommends$missing"
        exit 1
    fi
fi
WINE64=/usr/lib/wine/wine64
[ -x "$WINE64" ] || WINE64=$(command -v wine64 || command -v wine)

# ------------------------------------------------------------------ build
# Warnings are errors, as in the Linux builds: a mingw-only warning (an
# unused function behind a Linux #ifdef) is otherwise seen by no one.
cmake -S . -B "$BUILD_WIN" -DCMAKE_TOOLCHAIN_FILE="$PWD/cmake/mingw-w64-x86_64.cmake" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CROSSCOMPILING_EMULATOR="$WINE64" -DCP_WERROR=ON
# The library and the test programs (the tools and examples are not needed).
cmake --build "$BUILD_WIN" -j"$JOBS" --target cport-tests

# ------------------------------------------------------------------ Wine
# A persistent wineserver for the whole run: without it each test process
# starts and stops one, and the many short-lived test processes race on its
# pipes. Stopped on exit whatever happens.
cleanup() {
    wineserver -k >/dev/null 2>&1 || true
    # A wineserver that crashed (Wine 8 can, on sockets closed with I/O
    # pending) leaves its Windows processes behind, out of reach of
    # wineserver -k: stop the Wine processes of this prefix.
    for d in /proc/[0-9]*; do
        case "$(readlink "$d/exe" 2>/dev/null)" in
        */wine64 | */wine | */wine64-preloader | */wine-preloader | */wineserver64 | */wineserver) ;;
        *) continue ;;
        esac
        if tr '\0' '\n' <"$d/environ" 2>/dev/null | grep -qxF "WINEPREFIX=$WINEPREFIX"; then
            kill -9 "${d#/proc/}" 2>/dev/null || true
        fi
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if [ ! -f "$WINEPREFIX/system.reg" ]; then
    echo "creating the Wine prefix $WINEPREFIX"
    timeout 300 wineboot -i >/dev/null 2>&1 || { echo "wineboot -i failed"; exit 1; }
    timeout 60 wineserver -w >/dev/null 2>&1 || true
fi
wineserver -p </dev/null >/dev/null 2>&1 &
sleep 1
# The first Wine program of a server starts Wine's services (services.exe,
# winedevice.exe, ...), which inherit its standard output and live as long as
# the server. Started by a test, they would hold ctest's output pipe open and
# ctest would wait for them until the test's timeout: start them here, with
# nothing inherited.
timeout 120 "$WINE64" cmd.exe /c exit </dev/null >/dev/null 2>&1 || true

# ------------------------------------------------------------------ tests
status=0
(cd "$BUILD_WIN" && timeout --kill-after=30 "$CTEST_TIMEOUT" ctest --output-on-failure "$@") || status=$?
if [ "$status" = 124 ]; then
    echo "ctest did not finish within $CTEST_TIMEOUT s"
fi
exit "$status"
