/* The operating-system seam (see sys.h). */
#include "sys.h"

#ifdef _WIN32

#include <mswsock.h>

int cp__win_errno(unsigned long code)
{
    switch (code) {
    case 0: return 0;
    case WSAEWOULDBLOCK: return EAGAIN;
    case WSAEINTR: return EINTR;
    case WSAEINVAL:
    case ERROR_INVALID_PARAMETER: return EINVAL;
    case WSAEMFILE:
    case ERROR_TOO_MANY_OPEN_FILES: return EMFILE;
    case WSAENOBUFS:
    case ERROR_NOT_ENOUGH_MEMORY:
    case ERROR_OUTOFMEMORY: return ENOBUFS;
    case WSAECONNRESET:
    case ERROR_NETNAME_DELETED:
    case WSAENETRESET: return ECONNRESET;
    case WSAECONNABORTED:
    case ERROR_CONNECTION_ABORTED:
    case ERROR_REQUEST_ABORTED: return ECONNABORTED;
    case WSAECONNREFUSED:
    case ERROR_CONNECTION_REFUSED:
    case ERROR_PORT_UNREACHABLE: return ECONNREFUSED;
    case WSAETIMEDOUT:
    case ERROR_SEM_TIMEOUT:
    case WAIT_TIMEOUT: return ETIMEDOUT;
    case WSAENOTCONN: return ENOTCONN;
    case WSAESHUTDOWN: return EPIPE;
    case WSAEADDRINUSE: return EADDRINUSE;
    case WSAEADDRNOTAVAIL: return EADDRNOTAVAIL;
    case WSAENETUNREACH:
    case ERROR_NETWORK_UNREACHABLE: return ENETUNREACH;
    case WSAEHOSTUNREACH:
    case ERROR_HOST_UNREACHABLE: return EHOSTUNREACH;
    case WSAENETDOWN: return ENETDOWN;
    case WSAEAFNOSUPPORT: return EAFNOSUPPORT;
    case WSAEACCES:
    case ERROR_ACCESS_DENIED: return EACCES;
    case WSAENOTSOCK:
    case ERROR_INVALID_HANDLE: return EBADF;
    case WSAEMSGSIZE: return EMSGSIZE;
    case ERROR_OPERATION_ABORTED: return ECANCELED;
    case WSAEISCONN: return EISCONN;
    case WSAEALREADY: return EALREADY;
    case WSAEINPROGRESS: return EINPROGRESS;
    default: return EIO;
    }
}

int cp__sock_err(void) { return -cp__win_errno((unsigned long)WSAGetLastError()); }

int cp__sock_stream(int family)
{
    SOCKET s = WSASocketW(family, SOCK_STREAM, IPPROTO_TCP, NULL, 0,
                          WSA_FLAG_OVERLAPPED | WSA_FLAG_NO_HANDLE_INHERIT);
    if (s == INVALID_SOCKET)
        return cp__sock_err();
    /* Non-blocking as well as overlapped: the backend tries sends and reads
     * inline first and only waits through the port when they would block. */
    u_long yes = 1;
    if (ioctlsocket(s, FIONBIO, &yes) != 0) {
        int r = cp__sock_err();
        closesocket(s);
        return r;
    }
    return (int)s;
}

void cp__sock_close(int fd) { closesocket((SOCKET)fd); }

int cp__sock_setint(int fd, int level, int name, int value)
{
    return setsockopt((SOCKET)fd, level, name, (const char *)&value, sizeof value) ? cp__sock_err() : 0;
}

int cp__sock_listener(const struct sockaddr *sa, socklen_t len, int backlog)
{
    int fd = cp__sock_stream(sa->sa_family);
    if (fd < 0)
        return fd;
    /* Not SO_REUSEADDR: on Windows it lets another process take the port over.
     * Windows needs nothing to rebind a port with connections in TIME_WAIT. */
    cp__sock_setint(fd, SOL_SOCKET, SO_EXCLUSIVEADDRUSE, 1);
    if (bind((SOCKET)fd, sa, len) != 0 || listen((SOCKET)fd, backlog) != 0) {
        int r = cp__sock_err();
        closesocket((SOCKET)fd);
        return r;
    }
    return fd;
}

int cp__ncpu(void)
{
    SYSTEM_INFO si;
    GetSystemInfo(&si);
    return si.dwNumberOfProcessors > 0 ? (int)si.dwNumberOfProcessors : 1;
}

void cp__sleep_ms(unsigned ms) { Sleep(ms); }

#else /* POSIX */

#include <time.h>

int cp__sock_err(void) { return -errno; }

int cp__sock_stream(int family)
{
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    return fd < 0 ? -errno : fd;
}

void cp__sock_close(int fd) { close(fd); }

int cp__sock_setint(int fd, int level, int name, int value)
{
    return setsockopt(fd, level, name, &value, sizeof value) ? -errno : 0;
}

int cp__sock_listener(const struct sockaddr *sa, socklen_t len, int backlog)
{
    int fd = cp__sock_stream(sa->sa_family);
    if (fd < 0)
        return fd;
    cp__sock_setint(fd, SOL_SOCKET, SO_REUSEADDR, 1);
    if (bind(fd, sa, len) < 0 || listen(fd, backlog) < 0) {
        int r = -errno;
        close(fd);
        return r;
    }
    return fd;
}

int cp__ncpu(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

void cp__sleep_ms(unsigned ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

#endif
