#!/usr/bin/env bash
# haproxy.sh - HAProxy in TCP mode as a greeting delay, the recipe mail admins
# use: hold the client for the inspect delay, reject it if it sent anything,
# and connect to the MTA only when the delay is over.  HAProxy sends no banner
# of its own; the 220 comes from the backend once HAProxy has connected to it.
#
#     tcp-request inspect-delay <HP_DELAY>
#     tcp-request content accept if trusted             (only with HP_TRUSTED)
#     tcp-request content reject if { req_len gt 0 }    (talked first: RST)
#     tcp-request content accept if WAIT_END            (waited: relay)
#
#   HP_PORT=10030 HP_BACKEND_PORT=2525 HP_DELAY=25 bench/peers/haproxy.sh
#
# With HP_MODE=relay it is instead the balancer in front of an MX (issue 17):
# no delay of its own, every connection relayed at once with a PROXY header
# (HP_PROXY=v2), and with HP_CHECK=yes the health checks MX fleets run,
# `option smtpchk` + `check check-send-proxy inter 1s` (a v2 LOCAL header, then
# HELO; the server is UP on a 2xx greeting):
#
#   HP_MODE=relay HP_PROXY=v2 HP_CHECK=yes HP_PORT=10031 HP_BACKEND_PORT=10025 \
#       bench/peers/haproxy.sh
#
# Environment (defaults in brackets):
#   PEER_DIR         where haproxy.cfg is written    [$TMPDIR/repeld-bench-haproxy]
#   HP_ADDR          listen address, loopback only                      [127.0.0.1]
#   HP_PORT          listen port                                        [10030]
#   HP_MODE          greet (the inspect-delay recipe) or relay          [greet]
#   HP_DELAY         inspect delay in seconds, decimals allowed (greet;
#                    in relay mode it only sets the timeouts)            [25]
#   HP_BACKEND_ADDR  the MTA, loopback only                             [127.0.0.1]
#   HP_BACKEND_PORT  the MTA's port                                     [2525]
#   HP_TRUSTED       CIDRs relayed at once, comma or space separated    [none]
#   HP_PROXY         none|v1|v2: PROXY header to the MTA (smtp-sink
#                    speaks none; a v2 header even contains "QUIT")      [none]
#   HP_LOG           ADDR:PORT of a UDP syslog receiver on loopback, or
#                    "none".  The benchmarks give it one that nobody reads,
#                    so HAProxy pays for its log lines as repeld does    [none]
#   HP_THREADS       nbthread                                           [1]
#   HP_CHECK         yes: health checks of the MTA (relay mode)         [no]
#   HP_MAXCONN       global and frontend maxconn                        [30000]
#
# "no strict-limits": maxconn 30000 asks for more descriptors than a 20000 fd
# limit allows, which HAProxy 2.6 would otherwise refuse; a held connection
# uses one descriptor (no backend connection yet), a relayed one two (give
# relay mode HP_MAXCONN at most half the fd limit).  The empty "resolvers
# default" section keeps HAProxy from opening a socket to the (non-loopback)
# nameserver of /etc/resolv.conf at start-up.
#
# The script execs haproxy -db (foreground, no master-worker), so the PID that
# ran it is HAProxy's; SIGTERM to it stops HAProxy and closes every connection.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

HP_ADDR=${HP_ADDR:-127.0.0.1}
HP_PORT=${HP_PORT:-10030}
HP_MODE=${HP_MODE:-greet}
HP_DELAY=${HP_DELAY:-25}
HP_BACKEND_ADDR=${HP_BACKEND_ADDR:-127.0.0.1}
HP_BACKEND_PORT=${HP_BACKEND_PORT:-2525}
HP_TRUSTED=${HP_TRUSTED:-}
HP_PROXY=${HP_PROXY:-none}
HP_LOG=${HP_LOG:-none}
HP_THREADS=${HP_THREADS:-1}
HP_MAXCONN=${HP_MAXCONN:-30000}
HP_CHECK=${HP_CHECK:-no}

need_loopback "$HP_ADDR"
need_loopback "$HP_BACKEND_ADDR"
need_port "$HP_PORT"
need_port "$HP_BACKEND_PORT"
need_command haproxy haproxy
[[ "$HP_DELAY" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "HP_DELAY: seconds, e.g. 25 or 2.5"
delay_ms=$(awk -v d="$HP_DELAY" 'BEGIN { printf "%d", d * 1000 + 0.5 }')
# The client and server timeouts must outlast the delay, or a held client times out.
timeout_s=$(awk -v d="$HP_DELAY" 'BEGIN { t = int(d + 60.999); print (t > 300 ? t : 300) }')
case "$HP_PROXY" in
    none) send_proxy= ;;
    v1) send_proxy=send-proxy ;;
    v2) send_proxy=send-proxy-v2 ;;
    *) die "HP_PROXY: none, v1 or v2" ;;
esac
case "$HP_MODE" in
    greet | relay) ;;
    *) die "HP_MODE: greet or relay" ;;
esac
check_option="# no health checks (HP_CHECK=no)"
check=
case "$HP_CHECK" in
    no) ;;
    yes)
        [ "$HP_MODE" = relay ] || die "HP_CHECK=yes: relay mode only"
        check_option="option smtpchk"
        check=" check inter 1s"
        [ -n "$send_proxy" ] && check+=" check-send-proxy"
        ;;
    *) die "HP_CHECK: yes or no" ;;
esac
log_line="# no log (HP_LOG=none)"
if [ "$HP_LOG" != none ]; then
    need_loopback "${HP_LOG%:*}"
    need_port "${HP_LOG##*:}"
    log_line="log $HP_LOG len 4096 format rfc5424 local0 info"
fi
bracket() { case "$1" in *:*) echo "[$1]:$2" ;; *) echo "$1:$2" ;; esac }
trusted=$(echo "$HP_TRUSTED" | tr ',' ' ' | xargs)

# As root HAProxy would keep root: drop to its package's user.
user_lines="# runs as $(id -un)"
if [ "$(id -u)" = 0 ] && id haproxy >/dev/null 2>&1; then
    user_lines="user haproxy
    group haproxy"
fi

dir=$(peer_dir haproxy)
cfg=$dir/haproxy.cfg
{
    cat <<CF
# Written by bench/peers/haproxy.sh; rewritten on every start.
global
    maxconn $HP_MAXCONN
    no strict-limits
    nbthread $HP_THREADS
    $user_lines
    $log_line

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client ${timeout_s}s
    timeout server ${timeout_s}s

frontend greet
    bind $(bracket "$HP_ADDR" "$HP_PORT")
    maxconn $HP_MAXCONN
CF
    if [ "$HP_MODE" = greet ]; then
        echo "    tcp-request inspect-delay ${delay_ms}ms"
        if [ -n "$trusted" ]; then
            echo "    acl trusted src $trusted"
            echo "    tcp-request content accept if trusted"
        fi
        echo "    tcp-request content reject if { req_len gt 0 }"
        echo "    tcp-request content accept if WAIT_END"
    fi
    cat <<CF
    default_backend mta

backend mta
    $check_option
    server mta $(bracket "$HP_BACKEND_ADDR" "$HP_BACKEND_PORT") $send_proxy$check

resolvers default
CF
} >"$cfg"
haproxy -q -c -f "$cfg" >/dev/null || die "configuration check failed: $cfg"
exec haproxy -db -f "$cfg"
