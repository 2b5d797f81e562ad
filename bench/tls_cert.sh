#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# tls_cert.sh — a self-signed certificate for the TLS benchmarks and tests.
#
#   bench/tls_cert.sh DIR
#
# Writes DIR/cert.pem and DIR/key.pem (creating DIR): a P-256 (prime256v1) key
# and a certificate for CN=localhost with the names localhost, 127.0.0.1 and
# ::1, valid for 10 years. The certificate is its own CA, so a client verifies
# the server with cert.pem as its CA file (loadgen --tls-ca DIR/cert.pem).
# An existing pair in DIR is replaced. Exit 0 on success, 1 if openssl fails,
# 2 on bad usage.
set -eu

if [ $# -ne 1 ] || [ -z "$1" ] || [ "${1#-}" != "$1" ]; then
    echo "usage: tls_cert.sh DIR   (writes DIR/cert.pem and DIR/key.pem)" >&2
    exit 2
fi
command -v openssl >/dev/null || { echo "tls_cert.sh: needs openssl (apt-get install openssl)" >&2; exit 1; }
dir=$1
mkdir -p "$dir"
# The key is written by openssl with mode 0600 already; umask keeps it so.
umask 077
if ! openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -days 3650 \
        -subj "/CN=localhost" \
        -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,digitalSignature,keyCertSign" \
        -addext "extendedKeyUsage=serverAuth" \
        -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>"$dir/.tls_cert.err"; then
    cat "$dir/.tls_cert.err" >&2
    rm -f "$dir/.tls_cert.err"
    exit 1
fi
rm -f "$dir/.tls_cert.err"
chmod 644 "$dir/cert.pem"
echo "tls_cert.sh: $dir/cert.pem $dir/key.pem (P-256, CN=localhost, IP 127.0.0.1 ::1)"
