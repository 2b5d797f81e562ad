/* SPDX-License-Identifier: MIT */
/* A complete echo server: every byte a client sends comes straight back.
 * The same file builds on Linux (io_uring or epoll) and on Windows (IOCP). */
#include <cport.h>
#include <stdio.h>

/* Runs on a worker thread; the bytes are valid only during the call. */
static size_t on_recv(cp_session *s, const uint8_t *data, size_t len)
{
    cp_session_send_copy(s, data, len); /* queue a copy; sending never blocks */
    return len;                         /* we consumed everything */
}

int main(void)
{
    cp_port *port; /* worker threads, one per CPU */
    cp_service *svc;
    cp_handlers h = { .on_recv = on_recv };
    cp_server_opts opts = { .port = 7777, .session.framing = CP_FRAMING_RAW };
    int rc = cp_port_create(&port, NULL);
    if (rc == 0 && (rc = cp_server_start(&svc, port, &opts, &h, NULL)) != 0)
        cp_port_destroy(port);
    if (rc != 0) {
        fprintf(stderr, "echo_server: %s\n", cp_strerror(rc));
        return 1;
    }
    fprintf(stderr, "echo server on port %u (%s), Ctrl-C stops it\n", cp_service_listen_port(svc),
            cp_port_backend_name(port));

    cp_wait_stop_signal(); /* SIGINT/SIGTERM, or Ctrl-C on Windows */
    cp_service_stop(svc);  /* disconnects everyone, drains, frees */
    cp_port_destroy(port);
    return 0;
}
