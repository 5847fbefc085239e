/*
 * tcpnative.c -- what Python's socket module cannot do portably, for
 * repeld._tcpnative: read struct tcp_info on Linux and FreeBSD into one
 * neutral struct, set TCP_USER_TIMEOUT where it exists, and read FreeBSD
 * sysctls.  Everything that socket.setsockopt() can do stays in Python.
 *
 * Functions return -1 with errno set on failure, like the system calls they
 * wrap; repeld/tcptune.py turns that into OSError.  Platforms other than
 * Linux and FreeBSD still build, and fail at run time with ENOSYS.
 */

#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <string.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <netinet/in.h>

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

/* Read an unsigned integer sysctl by name, which only C can do on FreeBSD. */
long long repeld_sysctl_uint(const char *name)
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
