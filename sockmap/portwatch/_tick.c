/* sockmap.portwatch._tick: the watcher's idle tick in C, GIL released.
 *
 * wait_change(fd4, fd6, stop_fd, interval_ns, timeout_ns, prev, ticks) -> bytes | None
 *
 * Every interval_ns: pread /proc/net/sockstat (fd4) and sockstat6 (fd6, -1 if none) and pick
 * out the "inuse" counters of the TCP, UDP, TCP6 and UDP6 lines as a key ("TCP 3;UDP 1;...").
 * Returns the key as soon as it differs from prev, or once timeout_ns has passed; None as
 * soon as stop_fd is readable. ticks is a writable 8-byte buffer: a native-endian counter
 * incremented after every read (the watcher's ``polls`` includes it). Raises OSError if a read or the wait fails, ValueError if a
 * file does not have the kernel's layout (the caller then ticks in Python).
 *
 * Why: every wake-up of a 30 ms poll costs this VM ~70 us of CPU even in C and ~150-190 us
 * through Python (GIL, cold interpreter), and the poll is most of an idle agent's CPU. Python
 * now runs only when the counters moved or the full-dump deadline came.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define FILE_MAX 4096
#define KEY_MAX 128

static const char *const LABELS[4] = {"TCP: inuse ", "UDP: inuse ", "TCP6: inuse ", "UDP6: inuse "};

/* Append "LABEL N;" for each wanted label found at a line start; returns how many, or -1 if
 * the key would not fit. */
static int extract(const char *buf, ssize_t n, int first, int last, char *key, size_t *klen) {
    int found = 0;
    const char *p = buf, *end = buf + n;
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (eol == NULL) eol = end;
        for (int i = first; i <= last; i++) {
            size_t ll = strlen(LABELS[i]);
            if ((size_t)(eol - p) > ll && memcmp(p, LABELS[i], ll) == 0) {
                const char *d = p + ll, *e = d;
                while (e < eol && *e >= '0' && *e <= '9') e++;
                if (e == d || e - d > 20) return -1;
                size_t lab = strchr(LABELS[i], ':') - LABELS[i];
                size_t need = lab + 1 + (size_t)(e - d) + 1;
                if (*klen + need > KEY_MAX) return -1;
                memcpy(key + *klen, LABELS[i], lab);
                key[*klen + lab] = ' ';
                memcpy(key + *klen + lab + 1, d, (size_t)(e - d));
                key[*klen + need - 1] = ';';
                *klen += need;
                found++;
            }
        }
        p = eol + 1;
    }
    return found;
}

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static PyObject *wait_change(PyObject *Py_UNUSED(self), PyObject *args) {
    int fd4, fd6, stop_fd;
    long long interval_ns, timeout_ns;
    const char *prev;
    Py_ssize_t prev_len;
    Py_buffer ticks;
    if (!PyArg_ParseTuple(args, "iiiLLy#w*", &fd4, &fd6, &stop_fd, &interval_ns, &timeout_ns,
                          &prev, &prev_len, &ticks))
        return NULL;
    if (interval_ns < 1000000 || interval_ns > 60000000000LL || timeout_ns < 0 ||
        ticks.len != sizeof(unsigned long long) ||
        (uintptr_t)ticks.buf % _Alignof(unsigned long long) != 0) {
        PyBuffer_Release(&ticks);
        PyErr_SetString(PyExc_ValueError,
                        "interval must be 1 ms..60 s, timeout >= 0, ticks 8 aligned bytes");
        return NULL;
    }
    volatile unsigned long long *count = ticks.buf;
    char buf[FILE_MAX], key[KEY_MAX];
    size_t klen = 0;
    int err = 0, stopped = 0, bad = 0;
    long long deadline;
    Py_BEGIN_ALLOW_THREADS
    deadline = now_ns() + timeout_ns;
    struct pollfd pfd = {.fd = stop_fd, .events = POLLIN};
    for (;;) {
        struct timespec ts = {interval_ns / 1000000000LL, interval_ns % 1000000000LL};
        int r = ppoll(&pfd, 1, &ts, NULL);
        if (r > 0) { stopped = 1; break; }
        if (r < 0 && errno != EINTR) { err = errno; break; }
        klen = 0;
        ssize_t n = pread(fd4, buf, sizeof buf, 0);
        if (n < 0) { err = errno; break; }
        int want = fd6 >= 0 ? 4 : 2;
        int got = extract(buf, n, 0, 1, key, &klen);
        if (got == 2 && fd6 >= 0) {
            n = pread(fd6, buf, sizeof buf, 0);
            if (n < 0) { err = errno; break; }
            int g6 = extract(buf, n, 2, 3, key, &klen);
            got = g6 < 0 ? -1 : got + g6;
        }
        ++*count;
        if (got != want) { bad = 1; break; }
        if ((Py_ssize_t)klen != prev_len || memcmp(key, prev, klen) != 0) break;
        if (now_ns() >= deadline) break;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ticks);
    if (stopped) Py_RETURN_NONE;
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "sockstat: no 'TCP/UDP[6]: inuse N' line at a line start");
        return NULL;
    }
    return PyBytes_FromStringAndSize(key, (Py_ssize_t)klen);
}

static PyMethodDef methods[] = {
    {"wait_change", wait_change, METH_VARARGS,
     "wait_change(fd4, fd6, stop_fd, interval_ns, timeout_ns, prev, ticks) -> bytes | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_tick", .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__tick(void) { return PyModule_Create(&module); }
