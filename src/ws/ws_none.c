/* SPDX-License-Identifier: MIT */
/*
 * WebSocket where the build has no llhttp: the calls exist and answer
 * -ENOTSUP, so programs link alike everywhere.
 */
#include "base.h"

#include <errno.h>

int cp_ws_create(cp_ws **out, const cp_ws_opts *opts)
{
    if (out)
        *out = NULL;
    return out && opts ? -ENOTSUP : -EINVAL;
}

void cp_ws_ref(cp_ws *ws) { CP_UNUSED(ws); }

void cp_ws_unref(cp_ws *ws) { CP_UNUSED(ws); }
