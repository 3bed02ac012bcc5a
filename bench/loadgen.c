/* bench/loadgen.c: the bench's fast peers, so Python relays are measured, not Python clients.
 *
 *   loadgen serve PORT_ECHO PORT_REPLYCLOSE   epoll server on [::] (dual stack: IPv4 too):
 *                                             echo (kept open) and
 *                                             reply-then-close (the short-connection test)
 *   loadgen cps HOST PORT CONC MAXCONN SECONDS  connect, 16-byte request, read reply to EOF,
 *                                             close; CONC threads; prints conns/s
 *   loadgen rtt HOST PORT N                   one connection, N 1-byte round trips;
 *                                             prints p50/p99 in microseconds
 * HOST is an IPv4 or IPv6 literal.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void raise_nofile(void) {
    struct rlimit r = {200000, 200000};
    setrlimit(RLIMIT_NOFILE, &r);
}

static int listener(int port) {
    int l = socket(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1, zero = 0;
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(l, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    if (bind(l, (void *)&a, sizeof a) || listen(l, 4096)) { perror("bind/listen"); exit(1); }
    return l;
}

static int serve(int pecho, int pclose) {
    raise_nofile();
    int le = listener(pecho), lc = listener(pclose), ep = epoll_create1(0), one = 1;
    struct epoll_event ev = {.events = EPOLLIN}, evs[256];
    ev.data.u64 = (uint64_t)le; epoll_ctl(ep, EPOLL_CTL_ADD, le, &ev);
    ev.data.u64 = (uint64_t)lc; epoll_ctl(ep, EPOLL_CTL_ADD, lc, &ev);
    char *closing = calloc(1 << 20, 1), buf[65536];
    printf("ready\n"); fflush(stdout);
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = (int)evs[i].data.u64;
            if (fd == le || fd == lc) {
                int c;
                while ((c = accept4(fd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    if (c < (1 << 20)) closing[c] = (fd == lc);
                    ev.data.u64 = (uint64_t)c; epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                }
                continue;
            }
            ssize_t r = read(fd, buf, sizeof buf);
            if (r > 0) {
                if (write(fd, buf, r) < 0) { close(fd); continue; }
                if (closing[fd]) close(fd);  /* reply, then close: server side holds TIME_WAIT */
            } else if (r == 0 || errno != EAGAIN) {
                close(fd);
            }
        }
    }
}

static struct sockaddr_storage target;
static socklen_t target_len;
static int target_family;
static atomic_long done, errs;
static long maxconn;
static double deadline;

static void *cps_worker(void *arg) {
    (void)arg;
    char req[16] = "GET /0123456789\n", buf[64];
    int one = 1;
    while (now() < deadline && atomic_fetch_add(&done, 1) < maxconn) {
        int s = socket(target_family, SOCK_STREAM, 0);
        setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        int ok = connect(s, (void *)&target, target_len) == 0 && write(s, req, 16) == 16;
        ssize_t got = 0, r;
        while (ok && (r = read(s, buf, sizeof buf)) > 0) got += r;
        if (!ok || got != 16) atomic_fetch_add(&errs, 1);
        close(s);
    }
    atomic_fetch_sub(&done, 1);
    return NULL;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc >= 4 && !strcmp(argv[1], "serve")) return serve(atoi(argv[2]), atoi(argv[3]));
    if (argc < 5) { fprintf(stderr, "usage: see loadgen.c\n"); return 2; }
    if (strchr(argv[2], ':')) {
        struct sockaddr_in6 *t6 = (void *)&target;
        t6->sin6_family = target_family = AF_INET6;
        t6->sin6_port = htons(atoi(argv[3]));
        if (inet_pton(AF_INET6, argv[2], &t6->sin6_addr) != 1) { fprintf(stderr, "bad host\n"); return 2; }
        target_len = sizeof *t6;
    } else {
        struct sockaddr_in *t4 = (void *)&target;
        t4->sin_family = target_family = AF_INET;
        t4->sin_port = htons(atoi(argv[3]));
        if (inet_pton(AF_INET, argv[2], &t4->sin_addr) != 1) { fprintf(stderr, "bad host\n"); return 2; }
        target_len = sizeof *t4;
    }
    if (!strcmp(argv[1], "cps") && argc == 7) {
        int conc = atoi(argv[4]);
        maxconn = atol(argv[5]);
        double t0 = now();
        deadline = t0 + atof(argv[6]);
        pthread_t th[256];
        for (int i = 0; i < conc && i < 256; i++) pthread_create(&th[i], NULL, cps_worker, NULL);
        for (int i = 0; i < conc && i < 256; i++) pthread_join(th[i], NULL);
        double dt = now() - t0;
        long n = atomic_load(&done);
        if (n > maxconn) n = maxconn;
        printf("{\"conns\": %ld, \"errors\": %ld, \"seconds\": %.3f, \"per_s\": %.0f}\n",
               n, atomic_load(&errs), dt, (n - atomic_load(&errs)) / dt);
        return 0;
    }
    if (!strcmp(argv[1], "rtt")) {
        int n = atoi(argv[4]), one = 1, s = socket(target_family, SOCK_STREAM, 0);
        setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(s, (void *)&target, target_len)) { perror("connect"); return 1; }
        double *t = malloc(sizeof(double) * n);
        char c = 'x';
        for (int i = -1000; i < n; i++) {  /* 1000 warm-up round trips */
            double a = now();
            if (write(s, &c, 1) != 1 || read(s, &c, 1) != 1) { perror("rtt"); return 1; }
            if (i >= 0) t[i] = (now() - a) * 1e6;
        }
        qsort(t, n, sizeof(double), cmp);
        printf("{\"p50_us\": %.1f, \"p99_us\": %.1f, \"n\": %d}\n", t[n / 2], t[n * 99 / 100], n);
        return 0;
    }
    fprintf(stderr, "usage: see loadgen.c\n");
    return 2;
}
