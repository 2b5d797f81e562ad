/* SPDX-License-Identifier: MIT */
/*
 * The operating-system seam: socket headers, the few socket calls the net
 * layer makes itself, and small system facts. Everything above this file is
 * the same on Linux and Windows; the backends (epoll.c, uring.c, iocp.c) are
 * where the systems really differ.
 *
 * Descriptors are ints on every system. A Windows SOCKET is a kernel handle,
 * and kernel handles are 32-bit significant (Windows guarantees it so that
 * 32- and 64-bit processes can share them), so it fits.
 */
#ifndef CP_SYS_H
#define CP_SYS_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef _WIN32
#  include <winsock2.h>
#  include <ws2tcpip.h>
#  include <windows.h>

/* Windows has no struct iovec; the backends turn it into WSABUFs. */
struct iovec {
    void *iov_base;
    size_t iov_len;
};
#  ifndef ESHUTDOWN
#    define ESHUTDOWN WSAESHUTDOWN
#  endif
#  ifndef EHOSTDOWN
#    define EHOSTDOWN WSAEHOSTDOWN
#  endif
#else
#  include <arpa/inet.h>
#  include <netdb.h>
#  include <netinet/in.h>
#  include <netinet/tcp.h>
#  include <sys/socket.h>
#  include <sys/uio.h>
#  include <unistd.h>
#endif

/* A non-blocking, close-on-exec (not inherited) TCP socket, or -errno. On
 * Windows it is also opened for overlapped I/O. */
int cp__sock_stream(int family);
/* A socket bound to sa and listening, or -errno. reuseport: SO_REUSEPORT,
 * so that another listener may share the port (Linux; -ENOTSUP elsewhere). */
int cp__sock_listener(const struct sockaddr *sa, socklen_t len, int backlog, bool reuseport);
/* closesocket() or close(). */
void cp__sock_close(int fd);
/* Half-close: the peer reads what was sent, then end of stream. 0 or -errno. */
int cp__sock_shutdown_wr(int fd);
/* The last socket error of this thread as a negative errno value. */
int cp__sock_err(void);
/* setsockopt with an int value; 0 or -errno. */
int cp__sock_setint(int fd, int level, int name, int value);
/* TCP keepalive on fd: probes after idle_ms of silence, every interval_ms,
 * probes of them unanswered end the connection (ETIMEDOUT). 0 or -errno. */
int cp__sock_keepalive(int fd, uint32_t idle_ms, uint32_t interval_ms, uint32_t probes);
/* Sent data unacknowledged for ms ends the connection (ETIMEDOUT). 0 or -errno. */
int cp__sock_user_timeout(int fd, uint32_t ms);
/* Bytes the socket sent (or holds to send) that the peer has not
 * acknowledged, also once the connection failed; -ENOTSUP where the system
 * cannot tell. */
int cp__sock_unacked(int fd);
/* Number of CPUs this process may run on (at least 1). */
int cp__ncpu(void);
/* Sleeps the calling thread. */
void cp__sleep_ms(unsigned ms);
/* Whether this system can pause a thread for well under a millisecond and
 * tell the CPU time a thread used to as fine a grain (Linux, and POSIX
 * systems with a thread CPU clock; not Windows, whose sleeps and thread
 * times come in scheduler ticks). */
bool cp__fine_pause_ok(void);
/* CPU time the calling thread has used, in nanoseconds (0 where
 * cp__fine_pause_ok is false). */
uint64_t cp__thread_cpu_ns(void);
/* Sleeps the calling thread for ns nanoseconds (no-op where
 * cp__fine_pause_ok is false); asks the system, once per thread, not to
 * stretch such short sleeps by its default timer slack (50 us on Linux). */
void cp__pause_ns(uint64_t ns);
/* bytes (a multiple of CP_PAGE) of zeroed memory straight from the system,
 * aligned to align (a power of two; at most CP_PAGES_ALIGN_MAX, which is
 * Windows' allocation granularity, so VirtualAlloc aligns by itself), or
 * NULL; given back whole by cp__pages_unmap. Memory apart from malloc's
 * heaps: pages.c and slab.c say why. */
#define CP_PAGE 4096u
#define CP_PAGES_ALIGN_MAX (64u * 1024u)
void *cp__pages_map(size_t bytes, size_t align);
void cp__pages_unmap(void *p, size_t bytes);
/* The system may take the pages back; they stay mapped, their bytes are
 * lost (zero or stale when touched again). For scratch memory. */
void cp__pages_discard(void *p, size_t bytes);

#ifdef _WIN32
/* Maps a Win32 or Winsock error code to a positive errno value. */
int cp__win_errno(unsigned long code);
#endif

#endif
