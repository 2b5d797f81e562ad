/* SPDX-License-Identifier: MIT */
/*
 * Real peers for the tests (tests/peers.h): programs the test starts and
 * talks to through pipes (openssl s_client/s_server, Node), and the
 * certificates they use. Linux only.
 */
#ifndef _GNU_SOURCE
#  define _GNU_SOURCE
#endif
#include "peers.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static void *peer_reader(void *arg)
{
    peer *p = arg;
    struct pollfd pf[2] = { { p->fd[OUT], POLLIN, 0 }, { p->fd[ERR], POLLIN, 0 } };
    int open = 2;
    static _Thread_local char chunk[65536];
    while (open) {
        if (poll(pf, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        for (int i = 0; i < 2; i++) {
            if (pf[i].fd < 0 || !pf[i].revents)
                continue;
            ssize_t n = read(pf[i].fd, chunk, sizeof chunk);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                pf[i].fd = -1; /* poll skips it from now on */
                open--;
                continue;
            }
            pthread_mutex_lock(&p->lock);
            if (p->len[i] + (size_t)n + 1 > p->cap[i]) {
                size_t cap = (p->cap[i] ? p->cap[i] * 2 : 65536) + (size_t)n;
                p->buf[i] = realloc(p->buf[i], cap);
                if (!p->buf[i])
                    abort(); /* no assertion outside the test's thread */
                p->cap[i] = cap;
            }
            memcpy(p->buf[i] + p->len[i], chunk, (size_t)n);
            p->len[i] += (size_t)n;
            p->buf[i][p->len[i]] = '\0'; /* text searches may use the buffer as a string */
            pthread_mutex_unlock(&p->lock);
        }
    }
    pthread_mutex_lock(&p->lock);
    p->drained = true;
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

/* Starts argv (argv[0] an absolute path) with pipes on its stdin, stdout
 * and stderr. */
void peer_start(peer *p, char *const argv[])
{
    memset(p, 0, sizeof *p);
    p->status = -1;
    cr_assert(access(argv[0], X_OK) == 0, "%s is not installed (make deps installs it)", argv[0]);
    /* A peer that ends early must not end the test with SIGPIPE. */
    signal(SIGPIPE, SIG_IGN);
    int in[2], out[2], err[2];
    /* Close-on-exec: no other child inherits these, so closing our end of a
     * stdin pipe is its child's end of input. */
    cr_assert(pipe2(in, O_CLOEXEC) == 0 && pipe2(out, O_CLOEXEC) == 0 && pipe2(err, O_CLOEXEC) == 0);
    p->pid = fork();
    cr_assert(p->pid >= 0);
    if (p->pid == 0) {
        /* The peer goes with the test process, also when an assertion ends
         * it early. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        dup2(in[0], 0);
        dup2(out[1], 1);
        dup2(err[1], 2);
        execv(argv[0], argv);
        _exit(127);
    }
    close(in[0]);
    close(out[1]);
    close(err[1]);
    p->in = in[1];
    p->fd[OUT] = out[0];
    p->fd[ERR] = err[0];
    pthread_mutex_init(&p->lock, NULL);
    cr_assert_eq(pthread_create(&p->reader, NULL, peer_reader, p), 0);
}

size_t peer_len(peer *p, int which)
{
    pthread_mutex_lock(&p->lock);
    size_t n = p->len[which];
    pthread_mutex_unlock(&p->lock);
    return n;
}

/* Whether the peer has written needle (n bytes) to stdout or stderr, at or
 * after byte from. */
bool peer_has_at(peer *p, int which, size_t from, const void *needle, size_t n)
{
    pthread_mutex_lock(&p->lock);
    bool found = p->len[which] > from && memmem(p->buf[which] + from, p->len[which] - from, needle, n);
    pthread_mutex_unlock(&p->lock);
    return found;
}

bool peer_has(peer *p, int which, const char *text) { return peer_has_at(p, which, 0, text, strlen(text)); }

/* How many times text occurs in what the peer wrote there. */
int peer_count(peer *p, int which, const char *text)
{
    int count = 0;
    pthread_mutex_lock(&p->lock);
    const char *at = p->buf[which], *end = at ? at + p->len[which] : NULL;
    while (at && (at = memmem(at, (size_t)(end - at), text, strlen(text))) != NULL) {
        count++;
        at += strlen(text);
    }
    pthread_mutex_unlock(&p->lock);
    return count;
}

/* Copies n bytes the peer wrote, from byte off; false if it has not
 * written that many yet. */
bool peer_copy(peer *p, int which, size_t off, void *dst, size_t n)
{
    pthread_mutex_lock(&p->lock);
    bool ok = p->len[which] >= off + n;
    if (ok && n)
        memcpy(dst, p->buf[which] + off, n);
    pthread_mutex_unlock(&p->lock);
    return ok;
}

/* What the peer wrote so far on both streams, on the test's stderr: the
 * evidence when an assertion about it fails. */
void peer_dump(peer *p, const char *name)
{
    pthread_mutex_lock(&p->lock);
    fprintf(stderr, "---- %s stdout (%zu bytes) ----\n%.*s\n---- %s stderr ----\n%.*s\n----\n", name,
            p->len[OUT], (int)(p->len[OUT] < 4000 ? p->len[OUT] : 4000), p->buf[OUT] ? p->buf[OUT] : "", name,
            (int)p->len[ERR], p->buf[ERR] ? p->buf[ERR] : "");
    pthread_mutex_unlock(&p->lock);
}

/* Waits up to ms for text on the peer's stdout or stderr; asserts. */
void peer_xwait(peer *p, int which, const char *text, unsigned ms)
{
    bool ok = false;
    CPT_WAIT(ok, peer_has(p, which, text), ms);
    if (!ok)
        peer_dump(p, "peer");
    cr_assert(ok, "the peer never wrote \"%s\" to its %s within %u ms", text,
              which == OUT ? "stdout" : "stderr", ms);
}

void peer_write(peer *p, const void *data, size_t n)
{
    const uint8_t *at = data;
    while (n) {
        ssize_t w = write(p->in, at, n);
        if (w < 0 && errno == EINTR)
            continue;
        cr_assert(w > 0, "writing to the peer's stdin: %s", strerror(errno));
        at += w;
        n -= (size_t)w;
    }
}

void peer_close_in(peer *p)
{
    if (p->in >= 0)
        close(p->in);
    p->in = -1;
}

bool peer_exited(peer *p)
{
    if (p->status >= 0)
        return true;
    int st;
    if (waitpid(p->pid, &st, WNOHANG) != p->pid)
        return false;
    p->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return true;
}

bool peer_drained(peer *p)
{
    pthread_mutex_lock(&p->lock);
    bool d = p->drained;
    pthread_mutex_unlock(&p->lock);
    return d;
}

/* Waits up to ms for the peer to exit by itself and for everything it
 * wrote to be collected: its exit code. Asserts. */
int peer_xexit(peer *p, unsigned ms)
{
    bool ok = false;
    CPT_WAIT(ok, peer_exited(p) && peer_drained(p), ms);
    if (!ok)
        peer_dump(p, "peer");
    cr_assert(ok, "the peer did not exit within %u ms", ms);
    return p->status;
}

/* Ends the peer (SIGKILL if it still runs) and frees everything of it. */
void peer_stop(peer *p)
{
    peer_close_in(p);
    if (!peer_exited(p)) {
        kill(p->pid, SIGKILL);
        int st;
        waitpid(p->pid, &st, 0);
        p->status = 128 + SIGKILL;
    }
    pthread_join(p->reader, NULL);
    close(p->fd[OUT]);
    close(p->fd[ERR]);
    free(p->buf[OUT]);
    free(p->buf[ERR]);
    pthread_mutex_destroy(&p->lock);
}

/* ------------------------------------------------------------------ certificates */


static char tmp_dir[64];

static void tmp_remove(void)
{
    DIR *d = opendir(tmp_dir);
    if (!d)
        return;
    struct dirent *e;
    char path[512];
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) {
            snprintf(path, sizeof path, "%s/%s", tmp_dir, e->d_name);
            unlink(path);
        }
    }
    closedir(d);
    rmdir(tmp_dir);
}

/* The test's directory: made at the first call, removed at exit (also when
 * an assertion ends the test). */
const char *tmp_path(char *buf, size_t n, const char *name)
{
    if (!tmp_dir[0]) {
        snprintf(tmp_dir, sizeof tmp_dir, "/tmp/cport-peers-XXXXXX");
        cr_assert_not_null(mkdtemp(tmp_dir));
        atexit(tmp_remove);
    }
    snprintf(buf, n, "%s/%s", tmp_dir, name);
    return buf;
}

/* Runs argv to its end, its output discarded: its exit code. */
int run_quiet(char *const argv[])
{
    pid_t pid = fork();
    cr_assert(pid >= 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        int null = open("/dev/null", O_RDWR);
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
        execv(argv[0], argv);
        _exit(127);
    }
    int st;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* A self-signed P-256 certificate for "localhost" (its subject's CN is cn),
 * which is its own CA: the peers verify the server against it. */
void pem_make(pem *p, const char *name, const char *cn)
{
    char file[64], subj[64];
    snprintf(file, sizeof file, "%s.crt", name);
    tmp_path(p->cert, sizeof p->cert, file);
    snprintf(file, sizeof file, "%s.key", name);
    tmp_path(p->key, sizeof p->key, file);
    snprintf(subj, sizeof subj, "/CN=%s", cn);
    char *argv[] = { OPENSSL_BIN,
                     "req",
                     "-x509",
                     "-newkey",
                     "ec",
                     "-pkeyopt",
                     "ec_paramgen_curve:P-256",
                     "-nodes",
                     "-keyout",
                     p->key,
                     "-out",
                     p->cert,
                     "-days",
                     "2",
                     "-subj",
                     subj,
                     "-addext",
                     "subjectAltName=DNS:localhost",
                     NULL };
    cr_assert(access(OPENSSL_BIN, X_OK) == 0, "%s is not installed (make deps installs it)", OPENSSL_BIN);
    cr_assert_eq(run_quiet(argv), 0, "openssl req could not make %s", p->cert);
}
