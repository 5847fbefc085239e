/*
 * tcpnative.h -- the cdef text of repeld._tcpnative (cffi API mode).
 *
 * Declarations only: native/build_tcpnative.py hands this file to
 * ffibuilder.cdef(), and the definitions live in tcpnative.c.  It is not a
 * C header: "#define X ..." asks the compiler for the value, and the struct
 * is checked against tcpnative.c when the module is built.
 */

/* 1 if the headers the module was compiled against have TCP_USER_TIMEOUT. */
#define REPELD_HAVE_USER_TIMEOUT ...

/* Returned by repeld_set_user_timeout() where the option does not exist. */
#define REPELD_UNSUPPORTED ...

/* The fields of the platform's struct tcp_info that repeld reports. */
struct repeld_tcp_info {
    int state;                          /* the platform's own tcpi_state */
    unsigned int rtt_us;                /* smoothed round-trip time */
    unsigned int rttvar_us;             /* round-trip time variance */
    unsigned int retransmits;           /* segments retransmitted, in total */
    unsigned long long bytes_received;  /* Linux only; 0 on FreeBSD */
};

/* A client's address as accept4() gave it, in text (INET6_ADDRSTRLEN = 46). */
struct repeld_peer {
    char host[46];                      /* inet_ntop(); "" if not AF_INET/AF_INET6 */
    int port;
};

/* Accept one client, non-blocking and close-on-exec: its fd, or -1 with errno. */
int repeld_accept(int fd, struct repeld_peer *peer);

/* A one-shot timer on the monotonic clock (timerfd): its fd, or -1 with
 * errno set (ENOSYS: none on this platform); arming it takes nanoseconds
 * from now and returns 0, or -1 with errno set. */
int repeld_timer_open(void);
int repeld_timer_arm(int fd, long long ns);

/* The tuning of one socket; each returns 0, or -1 with errno set. */
int repeld_set_nodelay(int fd, int on);
int repeld_set_keepalive(int fd, int idle, int interval, int count);
int repeld_set_user_timeout(int fd, int ms);
int repeld_set_abortive_close(int fd);

/* The kernel's caps: the value, or -1 with errno set. */
long long repeld_accept_queue_cap(void);
long long repeld_syn_backlog(void);

int repeld_tcp_info(int fd, struct repeld_tcp_info *out);
long long repeld_tcp_rtt_us(int fd);
const char *repeld_tcp_state_name(int state);
