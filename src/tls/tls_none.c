/* SPDX-License-Identifier: MIT */
/*
 * TLS where the build has no OpenSSL (Windows today: Debian ships no OpenSSL
 * for mingw). The calls exist so that programs build everywhere; they answer
 * -ENOTSUP, so no service is ever given a cp_tls here. Schannel can come
 * behind the same filter seam (net.h) later.
 */
#include "net/net.h"

#include <errno.h>

int cp_tls_create(cp_tls **out, const cp_tls_opts *opts)
{
    (void)opts;
    if (out)
        *out = NULL;
    return -ENOTSUP;
}

int cp_tls_reload(cp_tls *tls, const char *cert_file, const char *key_file)
{
    (void)tls, (void)cert_file, (void)key_file;
    return -ENOTSUP;
}

void cp_tls_ref(cp_tls *tls) { (void)tls; }
void cp_tls_unref(cp_tls *tls) { (void)tls; }

int cp_session_tls_info(const cp_session *s, cp_tls_info *out)
{
    (void)s, (void)out;
    return -ENOTSUP;
}
