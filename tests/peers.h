/* SPDX-License-Identifier: MIT */
/*
 * Real peers for the tests: programs a test starts (openssl s_client and
 * s_server, Node with the npm ws package) whose stdin the test writes and
 * whose stdout and stderr a thread collects, and the self-signed
 * certificates they verify. Linux only (tests/peers.c).
 */
#ifndef CPT_PEERS_H
#define CPT_PEERS_H

#include "helpers.h"

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#define OPENSSL_BIN "/usr/bin/openssl"
#define NODE_BIN "/usr/bin/node"

enum { OUT, ERR };

/* A program the test started, its stdin written by the test and its stdout
 * and stderr collected by a thread of its own (so a chatty child never
 * blocks on a full pipe). */
typedef struct peer {
    pid_t pid;
    int in; /* -1 once closed */
    int fd[2];
    pthread_t reader;
    pthread_mutex_t lock;
    char *buf[2];
    size_t len[2], cap[2];
    bool drained; /* the reader has seen the end of both streams */
    int status;   /* exit code (128 + signal), -1 while it runs */
} peer;

/* A certificate and its key, files in the test's directory. */
typedef struct pem {
    char cert[128], key[128];
} pem;

void peer_start(peer *p, char *const argv[]);
size_t peer_len(peer *p, int which);
bool peer_has_at(peer *p, int which, size_t from, const void *needle, size_t n);
bool peer_has(peer *p, int which, const char *text);
int peer_count(peer *p, int which, const char *text);
bool peer_copy(peer *p, int which, size_t off, void *dst, size_t n);
void peer_dump(peer *p, const char *name);
void peer_xwait(peer *p, int which, const char *text, unsigned ms);
void peer_write(peer *p, const void *data, size_t n);
void peer_close_in(peer *p);
bool peer_exited(peer *p);
bool peer_drained(peer *p);
int peer_xexit(peer *p, unsigned ms);
void peer_stop(peer *p);
const char *tmp_path(char *buf, size_t n, const char *name);
int run_quiet(char *const argv[]);
void pem_make(pem *p, const char *name, const char *cn);

#endif
