#!/usr/bin/env bash
# postfix.sh - a private Postfix whose smtpd is the final server of the
# bench-relay Postfix set, on loopback, mail to the discard(8) transport.  One
# instance, one smtpd configuration, reached four ways:
#
#   PF_PORT        smtpd, plain SMTP             (smtp-source directly)
#   PF_PROXY_PORT  smtpd expecting a PROXY v1/v2 header
#                  (smtpd_upstream_proxy_protocol=haproxy: HAProxy, repeld relaying)
#   PF_PS_PORT     postscreen(8), 127.0.0.0/8 allowlisted by
#                  postscreen_access_list=permit_mynetworks, so each client is
#                  handed to smtpd at once, with no greet wait
#   $PEER_DIR/spool/private/smtpd
#                  the `smtpd pass` service postscreen hands clients to, and
#                  repeld's `-b pass:PATH` too
#
#   PF_PORT=10025 PF_PROXY_PORT=10026 PF_PS_PORT=10027 bench/peers/postfix.sh
#
# Environment (defaults in brackets):
#   PEER_DIR         configuration, queue and log     [$TMPDIR/repeld-bench-postfix]
#   PF_PORT, PF_PROXY_PORT, PF_PS_PORT   ports on 127.0.0.1   [10025, 10026, 10027]
#   PF_PROCS         default_process_limit (smtpd processes per service, and
#                    master's listen backlog)                            [200]
#
# What is off, and why: every DNS lookup (nothing leaves loopback), peer name
# lookups, postscreen's cache, DNSBL and after-220 tests, and chroot. Processes
# stay up for an hour idle (max_idle), so a run measures serving, not forking.
#
# The script execs Postfix's master(8) with -d (foreground): the PID that ran
# it is master's; SIGTERM to it stops master and its children. Needs root.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

PF_PORT=${PF_PORT:-10025}
PF_PROXY_PORT=${PF_PROXY_PORT:-10026}
PF_PS_PORT=${PF_PS_PORT:-10027}
PF_PROCS=${PF_PROCS:-200}

need_port "$PF_PORT"
need_port "$PF_PROXY_PORT"
need_port "$PF_PS_PORT"
need_command postconf postfix
[ "$(id -u)" = 0 ] || die "Postfix's master needs root"

dir=$(peer_dir postfix)
conf=$dir/etc
mkdir -p "$conf" "$dir/spool" "$dir/data"
chown postfix:postfix "$dir/data"
chmod 755 "$dir"
daemons=$(postconf -d -h daemon_directory)

postfix_main_cf "$dir" postfix postfix.sh >"$conf/main.cf"
cat >>"$conf/main.cf" <<CF
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
default_process_limit = $PF_PROCS
max_idle = 3600s
smtpd_client_connection_rate_limit = 0

postscreen_access_list = permit_mynetworks
postscreen_cache_map =
postscreen_dnsbl_sites =
postscreen_pipelining_enable = no
postscreen_non_smtp_command_enable = no
postscreen_bare_newline_enable = no
postscreen_client_connection_count_limit = 0
postscreen_pre_queue_limit = 10000
CF

# service   type  private unpriv chroot wakeup maxproc command
cat >"$conf/master.cf" <<CF
127.0.0.1:$PF_PORT        inet  n  -  n  -  -  smtpd
127.0.0.1:$PF_PROXY_PORT  inet  n  -  n  -  -  smtpd -o smtpd_upstream_proxy_protocol=haproxy
127.0.0.1:$PF_PS_PORT     inet  n  -  n  -  1  postscreen
CF
postfix_services >>"$conf/master.cf"

run_postfix_master "$conf" "$daemons"
