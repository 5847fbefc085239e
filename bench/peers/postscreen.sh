#!/usr/bin/env bash
# postscreen.sh - Postfix's postscreen(8) as a pregreet detector on loopback,
# in a private Postfix instance that never touches /etc/postfix or the system
# queue.  Postscreen holds each client for the greet wait, sends "220-" and
# watches for a client that talks before the final "220 " line; one that waits
# is handed to smtpd(8), whose mail goes to the discard(8) transport.
#
#   PS_PORT=10025 PS_GREET_WAIT=6s bench/peers/postscreen.sh   # foreground
#
# Environment (defaults in brackets):
#   PEER_DIR         configuration, queue and log  [$TMPDIR/repeld-bench-postscreen]
#   PS_ADDR          listen address, loopback only                  [127.0.0.1]
#   PS_PORT          listen port                                    [10025]
#   PS_GREET_WAIT    postscreen_greet_wait, whole seconds ("6s")    [6s]
#   PS_GREET_ACTION  postscreen_greet_action: ignore|enforce|drop   [drop]
#   PS_PRE_QUEUE     postscreen_pre_queue_limit; postscreen goes into
#                    stress mode at 90 % of it, so keep it far above
#                    the connections a benchmark holds               [10000]
#   PS_PROCS         default_process_limit, which is also the listen
#                    backlog master gives postscreen: Postfix's 100
#                    drops SYNs under a fast ramp                    [4096]
#
# What is switched off, and why: the access list (Postfix would allowlist
# 127.0.0.0/8 via permit_mynetworks and test nothing), the postscreen cache
# (every connection is tested again, as the benchmarks reuse addresses), DNSBL
# and every DNS lookup (nothing may leave loopback), the after-220 tests, and
# chroot (nothing to copy into a jail).
#
# The script execs Postfix's master(8) with -d (stay in the foreground), so the
# PID that ran it is master's; SIGTERM to it stops master and its children.
# Needs root (master runs as root, its children as the postfix user).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

PS_ADDR=${PS_ADDR:-127.0.0.1}
PS_PORT=${PS_PORT:-10025}
PS_GREET_WAIT=${PS_GREET_WAIT:-6s}
PS_GREET_ACTION=${PS_GREET_ACTION:-drop}
PS_PRE_QUEUE=${PS_PRE_QUEUE:-10000}
PS_PROCS=${PS_PROCS:-4096}

need_loopback "$PS_ADDR"
need_port "$PS_PORT"
need_command postconf postfix
[ "$(id -u)" = 0 ] || die "Postfix's master needs root"
case "$PS_GREET_ACTION" in ignore | enforce | drop) ;; *) die "PS_GREET_ACTION: ignore, enforce or drop" ;; esac
case "$PS_GREET_WAIT" in *[0-9]s | *[0-9]) ;; *) die "PS_GREET_WAIT: whole seconds, e.g. 6s" ;; esac

dir=$(peer_dir postscreen)
conf=$dir/etc
mkdir -p "$conf" "$dir/spool" "$dir/data"
chown postfix:postfix "$dir/data"
# Postfix refuses a queue in a directory others can write to (TMPDIR may be 1777).
chmod 755 "$dir"
daemons=$(postconf -d -h daemon_directory)
case "$PS_ADDR" in *:*) proto=ipv6 ;; *) proto=ipv4 ;; esac

postfix_main_cf "$dir" postscreen postscreen.sh >"$conf/main.cf"
cat >>"$conf/main.cf" <<CF
inet_interfaces = $PS_ADDR
inet_protocols = $proto
mynetworks = 127.0.0.0/8 [::1]/128
default_process_limit = $PS_PROCS

postscreen_access_list =
postscreen_cache_map =
postscreen_greet_wait = $PS_GREET_WAIT
postscreen_greet_action = $PS_GREET_ACTION
postscreen_dnsbl_sites =
postscreen_pipelining_enable = no
postscreen_non_smtp_command_enable = no
postscreen_bare_newline_enable = no
postscreen_client_connection_count_limit = 0
postscreen_pre_queue_limit = $PS_PRE_QUEUE
CF

# service   type  private unpriv chroot wakeup maxproc command
cat >"$conf/master.cf" <<CF
$PS_PORT    inet  n       -      n      -      1       postscreen
CF
postfix_services >>"$conf/master.cf"

run_postfix_master "$conf" "$daemons"
