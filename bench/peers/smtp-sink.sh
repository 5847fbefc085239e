#!/usr/bin/env bash
# smtp-sink.sh - the backend every benchmark relays to: Postfix's smtp-sink(1),
# which answers 220 at once, accepts every message and throws it away.
#
#   SINK_PORT=2525 bench/peers/smtp-sink.sh        # runs in the foreground
#
# Environment (defaults in brackets):
#   SINK_ADDR     listen address, loopback only              [127.0.0.1]
#   SINK_PORT     listen port                                [2525]
#   SINK_BACKLOG  listen(2) backlog, smtp-sink's last arg    [4096]
#   SINK_OPTS     more smtp-sink options, e.g. "-c" to count [none]
#
# smtp-sink refuses to run as root without -u, so root runs it as nobody.
# Stop it with SIGTERM to the PID that ran this script (exec keeps it).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

SINK_ADDR=${SINK_ADDR:-127.0.0.1}
SINK_PORT=${SINK_PORT:-2525}
SINK_BACKLOG=${SINK_BACKLOG:-4096}
SINK_OPTS=${SINK_OPTS:-}

need_loopback "$SINK_ADDR"
need_port "$SINK_PORT"
need_command smtp-sink postfix
case "$SINK_ADDR" in *:*) listen="[$SINK_ADDR]:$SINK_PORT" ;; *) listen="$SINK_ADDR:$SINK_PORT" ;; esac
user=()
[ "$(id -u)" = 0 ] && user=(-u nobody)
# shellcheck disable=SC2086  # SINK_OPTS is a list of words
exec "$(command -v smtp-sink || echo /usr/sbin/smtp-sink)" "${user[@]}" $SINK_OPTS "$listen" "$SINK_BACKLOG"
