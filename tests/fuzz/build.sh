#!/bin/sh
# SPDX-License-Identifier: MIT
# Builds the libFuzzer targets of tests/fuzz/ into OUTDIR (default build-fuzz):
# the library sources are compiled into each fuzzer with the same flags
# (clang, -fsanitize=fuzzer,address,undefined), both backends (epoll and
# io_uring when liburing is installed). Usage: tests/fuzz/build.sh [OUTDIR]
# [TARGET...]: only those targets (default: every one this machine can build).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-build-fuzz}
[ $# -gt 0 ] && shift
only="$*"
mkdir -p "$out"
CC=${CC:-clang}
SAN=${FUZZ_SAN:--fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined}
# Every library source but the backends that need more than Linux's libc
# (IOCP; io_uring below): listed from the tree, so a new file cannot be left
# out (src/mem once was, and only this build failed to link).
srcs=$(ls "$root"/src/*.c "$root"/src/*/*.c | grep -v -e '/iocp\.c$' -e '/uring\.c$' | tr '\n' ' ')
# CP_ASSERTS: a misuse the fuzzer provokes aborts with its name (src/base.h).
defs="-D_GNU_SOURCE -DCP_ASSERTS"
libs="-lpthread"
if pkg-config --exists liburing 2>/dev/null || [ -f /usr/include/liburing.h ]; then
  srcs="$srcs $root/src/port/uring.c"
  defs="$defs -DCP_HAVE_URING"
  libs="-luring $libs"
fi
# TLS needs OpenSSL 3 (as in the library's build): with it, src/tls/tls.c
# and the TLS fuzzer; without it, the -ENOTSUP stand-in (tls_none.c) and no
# TLS fuzzer. Exactly one of the two is compiled: both define the cp_tls_*
# calls.
tls_target=
if pkg-config --atleast-version=3.0 openssl 2>/dev/null; then
  srcs=$(printf '%s\n' $srcs | grep -v '/tls_none\.c$' | tr '\n' ' ')
  defs="$defs -DCP_HAVE_OPENSSL"
  libs="-lssl -lcrypto $libs"
  tls_target=fuzz_tls
else
  srcs=$(printf '%s\n' $srcs | grep -v '/tls/tls\.c$' | tr '\n' ' ')
fi
# WebSocket needs llhttp's C sources (Debian's node-llhttp) and OpenSSL's
# SHA-1 (ws_digest.c), as in the library's build; otherwise its -ENOTSUP
# stand-in. Exactly one of the two is compiled. The WebSocket fuzzers come
# with it, as the TLS one with OpenSSL.
llhttp=/usr/share/llhttp
ws_targets=
if [ -n "$tls_target" ] && [ -f "$llhttp/llhttp.c" ]; then
  srcs=$(printf '%s\n' $srcs | grep -v '/ws_none\.c$' | tr '\n' ' ')
  srcs="$srcs $llhttp/llhttp.c $llhttp/api.c $llhttp/http.c"
  defs="$defs -I/usr/share/include/llhttp"
  ws_targets="fuzz_ws_frames fuzz_ws_upgrade"
else
  srcs=$(printf '%s\n' $srcs | grep -v -e '/ws/ws\.c$' -e '/ws/ws_digest\.c$' | tr '\n' ' ')
fi
# The bus's Redis driver needs hiredis; without it, that driver and its
# fuzzer are left out, as in the library's build.
if pkg-config --exists hiredis 2>/dev/null; then
  defs="$defs -DCP_HAVE_HIREDIS"
  libs="-lhiredis $libs"
  targets="fuzz_framer fuzz_session fuzz_nats fuzz_redis"
else
  srcs=$(printf '%s\n' $srcs | grep -v '/redis\.c$' | tr '\n' ' ')
  targets="fuzz_framer fuzz_session fuzz_nats"
fi
targets="$targets $tls_target $ws_targets"
for t in $targets; do
  case " ${only:-$t} " in *" $t "*) ;; *) continue ;; esac
  echo "building $out/$t"
  # shellcheck disable=SC2086
  $CC -std=c11 -g -O1 -fno-omit-frame-pointer $SAN $defs -I"$root/include" -I"$root/src" \
      -o "$out/$t" "$here/$t.c" $srcs $libs
done
