/*
 * tcpnative.c -- repeld._tcpnative, the one home of repeld's kernel tuning:
 *
 *  - the tuning of a socket (TCP_NODELAY, keepalive idle/interval/count,
 *    TCP_USER_TIMEOUT, the abortive close SO_LINGER {1, 0}), so that no option
 *    is set one way here and another way in Python;
 *  - the kernel's caps on queues (somaxconn / kern.ipc.soacceptqueue, the SYN
 *    backlog / syncache), read from /proc on Linux and sysctlbyname on FreeBSD;
 *  - struct tcp_info on Linux and FreeBSD, read into one neutral struct;
 *  - accept4() with the peer address as text, for the accept loop: Python's
 *    public socket.accept() builds enums and a socket object per client;
 *  - a one-shot timerfd for the accept loop's gathering windows: waiting for
 *    its descriptor costs trio a fraction of what a timed sleep does (a sleep
 *    ends by cancelling a scope, which raises and catches an exception).
 *
 * Functions return -1 with errno set on failure, like the system calls they
 * wrap; repeld/service/tcptune.py turns that into OSError.  Platforms other
 * than Linux and FreeBSD still build, and fail at run time with ENOSYS where
 * there is nothing portable to fall back on.
 */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <stddef.h>
#include <string.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <netinet/in.h>

#include <time.h>

/* timerfd: Linux, and FreeBSD from 14.0 (whose early 14-CURRENT snapshots
 * lacked it: the header itself is asked for, not the version). */
#if defined(__linux__)
#include <sys/timerfd.h>
#define REPELD_HAVE_TIMERFD 1
#elif defined(__has_include)
#if __has_include(<sys/timerfd.h>)
#include <sys/timerfd.h>
#define REPELD_HAVE_TIMERFD 1
#endif
#endif
#ifndef REPELD_HAVE_TIMERFD
#define REPELD_HAVE_TIMERFD 0
#endif

#if defined(__linux__)
/*
 * The kernel's UAPI header rather than <netinet/tcp.h>: glibc's copy of
 * struct tcp_info stops at tcpi_total_retrans, so it lacks
 * tcpi_bytes_received.  The two headers cannot be included together.
 */
#include <linux/tcp.h>
#elif defined(__FreeBSD__)
#include <sys/sysctl.h>
#include <netinet/tcp.h>
#include <netinet/tcp_fsm.h>
#else
#include <netinet/tcp.h>
#endif

#ifdef TCP_USER_TIMEOUT
#define REPELD_HAVE_USER_TIMEOUT 1
#else
#define REPELD_HAVE_USER_TIMEOUT 0
#endif

#define REPELD_UNSUPPORTED (-2)

struct repeld_peer {
    char host[46];
    int port;
};

_Static_assert(INET6_ADDRSTRLEN == 46, "struct repeld_peer.host in tcpnative.h");

struct repeld_tcp_info {
    int state;
    unsigned int rtt_us;
    unsigned int rttvar_us;
    unsigned int retransmits;
    unsigned long long bytes_received;
};

/*
 * Names for tcpi_state, spelled as in BSD's tcpstates[] (what FreeBSD's
 * netstat prints), so that log lines read the same on both platforms.
 */
#if defined(__linux__)
/* Linux numbers its states in include/net/tcp_states.h, which is ABI but not
 * in the UAPI headers, hence the literal indices. */
static const char *const repeld_state_names[] = {
    [1] = "ESTABLISHED",
    [2] = "SYN_SENT",
    [3] = "SYN_RCVD",
    [4] = "FIN_WAIT_1",
    [5] = "FIN_WAIT_2",
    [6] = "TIME_WAIT",
    [7] = "CLOSED",
    [8] = "CLOSE_WAIT",
    [9] = "LAST_ACK",
    [10] = "LISTEN",
    [11] = "CLOSING",
    [12] = "SYN_RCVD",          /* TCP_NEW_SYN_RECV: a request socket */
    [13] = "CLOSED",            /* TCP_BOUND_INACTIVE: bound, never used */
};
#elif defined(__FreeBSD__)
static const char *const repeld_state_names[] = {
    [TCPS_CLOSED] = "CLOSED",
    [TCPS_LISTEN] = "LISTEN",
    [TCPS_SYN_SENT] = "SYN_SENT",
    [TCPS_SYN_RECEIVED] = "SYN_RCVD",
    [TCPS_ESTABLISHED] = "ESTABLISHED",
    [TCPS_CLOSE_WAIT] = "CLOSE_WAIT",
    [TCPS_FIN_WAIT_1] = "FIN_WAIT_1",
    [TCPS_CLOSING] = "CLOSING",
    [TCPS_LAST_ACK] = "LAST_ACK",
    [TCPS_FIN_WAIT_2] = "FIN_WAIT_2",
    [TCPS_TIME_WAIT] = "TIME_WAIT",
};
#else
static const char *const repeld_state_names[] = { NULL };
#endif

/* Accept one client, non-blocking and close-on-exec in the same call, and
 * write its address as text: the fd, or -1 with errno set (EAGAIN: none). */
int repeld_accept(int fd, struct repeld_peer *peer)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    int client;
#if !defined(__linux__) && !defined(__FreeBSD__)
    int flags;
#endif

#if defined(__linux__) || defined(__FreeBSD__)
    client = accept4(fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (client == -1)
        return -1;
#else
    client = accept(fd, (struct sockaddr *)&ss, &len);
    if (client == -1)
        return -1;
    flags = fcntl(client, F_GETFL);
    if (flags == -1 || fcntl(client, F_SETFD, FD_CLOEXEC) == -1
        || fcntl(client, F_SETFL, flags | O_NONBLOCK) == -1) {
        int saved = errno;
        close(client);
        errno = saved;
        return -1;
    }
#endif
    peer->host[0] = '\0';
    peer->port = 0;
    if (ss.ss_family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
        inet_ntop(AF_INET, &sin->sin_addr, peer->host, sizeof peer->host);
        peer->port = ntohs(sin->sin_port);
    } else if (ss.ss_family == AF_INET6) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
        inet_ntop(AF_INET6, &sin6->sin6_addr, peer->host, sizeof peer->host);
        peer->port = ntohs(sin6->sin6_port);
    }
    return client;
}

/* A timer on the monotonic clock whose descriptor turns readable when it
 * expires: non-blocking and close-on-exec.  The fd, or -1 with errno set
 * (ENOSYS where the platform has no timerfd: Linux and FreeBSD 14 do). */
int repeld_timer_open(void)
{
#if REPELD_HAVE_TIMERFD
    return timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
#else
    errno = ENOSYS;
    return -1;
#endif
}

/* Expire once, `ns` nanoseconds from now (at least 1: 0 would disarm it).
 * Arming again also clears an expiry not read yet, so that the descriptor is
 * readable only once this one comes.  0, or -1 with errno set. */
int repeld_timer_arm(int fd, long long ns)
{
#if REPELD_HAVE_TIMERFD
    struct itimerspec when;

    if (ns < 1)
        ns = 1;
    memset(&when, 0, sizeof when);
    when.it_value.tv_sec = (time_t)(ns / 1000000000LL);
    when.it_value.tv_nsec = (long)(ns % 1000000000LL);
    return timerfd_settime(fd, 0, &when, NULL);
#else
    (void)fd;
    (void)ns;
    errno = ENOSYS;
    return -1;
#endif
}

/* Send each small write at once: no Nagle delay behind a delayed ACK. */
int repeld_set_nodelay(int fd, int on)
{
    return setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
}

/* Let the kernel find and drop peers that vanished: probe after `idle`
 * seconds of silence, every `interval` seconds, give up after `count`.
 * The timings go first, so a value the kernel refuses leaves keepalive off. */
int repeld_set_keepalive(int fd, int idle, int interval, int count)
{
    int on = 1;

    if (idle < 1 || interval < 1 || count < 1) {
        errno = EINVAL;
        return -1;
    }
#if defined(TCP_KEEPIDLE) && defined(TCP_KEEPINTVL) && defined(TCP_KEEPCNT)
    if (setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle) == -1
        || setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval) == -1
        || setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof count) == -1)
        return -1;
#endif
    return setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
}

/* Bound how long sent data may stay unacknowledged before the kernel gives up. */
int repeld_set_user_timeout(int fd, int ms)
{
#ifdef TCP_USER_TIMEOUT
    return setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof ms);
#else
    (void)fd;
    (void)ms;
    return REPELD_UNSUPPORTED;
#endif
}

/* Make close() send RST, so a dropped client leaves no TIME_WAIT behind. */
int repeld_set_abortive_close(int fd)
{
    struct linger lg = { .l_onoff = 1, .l_linger = 0 };

    return setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
}

/* Copy the few tcp_info fields repeld logs, independent of the platform layout. */
int repeld_tcp_info(int fd, struct repeld_tcp_info *out)
{
    memset(out, 0, sizeof *out);
#if defined(__linux__) || defined(__FreeBSD__)
    struct tcp_info ti;
    socklen_t len = sizeof ti;

    memset(&ti, 0, sizeof ti);
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) == -1)
        return -1;
    out->state = ti.tcpi_state;
    out->rtt_us = ti.tcpi_rtt;
    out->rttvar_us = ti.tcpi_rttvar;
#if defined(__linux__)
    out->retransmits = ti.tcpi_total_retrans;
    /* Kernels before 4.1 return a shorter struct without the byte count. */
    if (len >= offsetof(struct tcp_info, tcpi_bytes_received)
               + sizeof ti.tcpi_bytes_received)
        out->bytes_received = ti.tcpi_bytes_received;
#else
    out->retransmits = ti.tcpi_snd_rexmitpack;
    /* FreeBSD keeps no byte count: tcpi_rcv_nxt is a sequence number, and
     * without the initial one it says nothing, so bytes_received stays 0. */
#endif
    return 0;
#else
    (void)fd;
    errno = ENOSYS;
    return -1;
#endif
}

/* Only the smoothed round-trip time, in microseconds, or -1 with errno set:
 * the one tcp_info field every pass and early-talker event carries, read
 * without building the whole snapshot. */
long long repeld_tcp_rtt_us(int fd)
{
    struct repeld_tcp_info info;

    if (repeld_tcp_info(fd, &info) == -1)
        return -1;
    return info.rtt_us;
}

/* Name a tcpi_state from this platform, so callers need not know its numbering. */
const char *repeld_tcp_state_name(int state)
{
    size_t n = sizeof repeld_state_names / sizeof repeld_state_names[0];

    if (state < 0 || (size_t)state >= n || repeld_state_names[state] == NULL)
        return "UNKNOWN";
    return repeld_state_names[state];
}

#if !defined(__linux__)
/* Read an unsigned integer sysctl by name, which only C can do on FreeBSD. */
static long long repeld_sysctl_uint(const char *name)
{
#if defined(__FreeBSD__)
    union {
        unsigned int u32;
        unsigned long long u64;
    } value;
    size_t len = sizeof value;

    memset(&value, 0, sizeof value);
    if (sysctlbyname(name, &value, &len, NULL, 0) == -1)
        return -1;
    if (len == sizeof value.u32)
        return value.u32;
    if (len == sizeof value.u64 && value.u64 <= (unsigned long long)LLONG_MAX)
        return (long long)value.u64;
    /* Too big for the return type, or not an integer sysctl at all. */
    errno = len == sizeof value.u64 ? ERANGE : EINVAL;
    return -1;
#else
    (void)name;
    errno = ENOSYS;
    return -1;
#endif
}
#endif

#if defined(__linux__)
/* Read one non-negative integer from a /proc/sys file, or -1 with errno set. */
static long long repeld_proc_uint(const char *path)
{
    char buf[32];
    char *end;
    ssize_t n;
    long long value;
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd == -1)
        return -1;
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) {
        errno = n == 0 ? EINVAL : errno;
        return -1;
    }
    buf[n] = '\0';
    errno = 0;
    value = strtoll(buf, &end, 10);
    if (errno != 0)
        return -1;
    if (end == buf || value < 0 || (*end != '\n' && *end != '\0')) {
        errno = EINVAL;
        return -1;
    }
    return value;
}
#endif

/* The ceiling the kernel silently puts on any listen() backlog. */
long long repeld_accept_queue_cap(void)
{
#if defined(__linux__)
    return repeld_proc_uint("/proc/sys/net/core/somaxconn");
#else
    /* FreeBSD; elsewhere repeld_sysctl_uint fails with ENOSYS. */
    return repeld_sysctl_uint("kern.ipc.soacceptqueue");
#endif
}

/* How many half-open connections the kernel will queue, for the system. */
long long repeld_syn_backlog(void)
{
#if defined(__linux__)
    return repeld_proc_uint("/proc/sys/net/ipv4/tcp_max_syn_backlog");
#else
    /* FreeBSD keeps half-open connections in the syncache: its own limit, or
     * (older kernels) buckets times entries per bucket. */
    long long limit = repeld_sysctl_uint("net.inet.tcp.syncache.cachelimit");
    long long buckets, per_bucket;

    if (limit != -1)
        return limit;
    buckets = repeld_sysctl_uint("net.inet.tcp.syncache.hashsize");
    per_bucket = repeld_sysctl_uint("net.inet.tcp.syncache.bucketlimit");
    if (buckets == -1 || per_bucket == -1)
        return -1;
    return buckets * per_bucket;
#endif
}
