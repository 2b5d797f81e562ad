/* SPDX-License-Identifier: MIT */
/* Pieces both fuzz targets need; static inline so each target stays one file to build. */
#ifndef CP_FUZZ_COMMON_H
#define CP_FUZZ_COMMON_H

#include <errno.h>
#include <poll.h>
#include <sys/socket.h>

/* connect() that survives signals (libFuzzer's timers interrupt it): after
 * EINTR the connect goes on in the background; wait for it with poll. */
static inline int connect_retry(int fd, const struct sockaddr *sa, socklen_t len)
{
    if (connect(fd, sa, len) == 0)
        return 0;
    if (errno != EINTR && errno != EINPROGRESS)
        return -1;
    for (;;) {
        struct pollfd pf = { .fd = fd, .events = POLLOUT };
        int r = poll(&pf, 1, 10000);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
        errno = err;
        return err ? -1 : 0;
    }
}

#endif
