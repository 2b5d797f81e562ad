/* SPDX-License-Identifier: MIT */
/*
 * Every internal layer at once, for the tests that look inside. The
 * library's own files include only their layer's header (base.h, mem/mem.h,
 * port/port.h, buf/sendbuf.h, net/net.h), so that a layer cannot reach up.
 */
#ifndef CP_INTERNAL_H
#define CP_INTERNAL_H

#include "net/net.h"

#endif
