#!/usr/bin/env bash
# nsd.sh - the DNS server of the DNS list benchmarks: NSD, authoritative for
# two list zones, bl.test (a block list) and wl.test (an allow list), so that
# repeld's --dnsbl and --dnswl queries are answered on loopback by a real server.
#
#   NSD_PORT=5398 bench/peers/nsd.sh        # runs in the foreground
#
# Environment (defaults in brackets):
#   PEER_DIR     where nsd.conf, the zones, the log and the control socket go
#                                                   [$TMPDIR/repeld-bench-nsd]
#   NSD_ADDR     listen address (UDP and TCP), loopback only      [127.0.0.1]
#   NSD_PORT     listen port                                      [5398]
#   NSD_TTL      TTL of the listings, seconds                     [300]
#   NSD_NEG_TTL  the SOA minimum: how long a resolver may keep an
#                NXDOMAIN ("not listed"), seconds                 [60]
#
# What the zones list, as RFC 5782 test points do (everything else is NXDOMAIN):
#
#   bl.test  127.0.0.2 -> 127.0.0.2, 127.0.0.3 -> 127.0.0.3, 127.0.0.5 -> 127.0.0.2
#   wl.test  127.0.0.4 -> 127.0.2.1, 127.0.0.5 -> 127.0.2.1
#
# The benchmarks' own sources (127.0.0.20 and up, 127.0.1.x, 127.0.2.x and
# 127.100.0.0-127.199.255.255) are in neither: every lookup of theirs is an
# NXDOMAIN, which repeld caches for NSD_NEG_TTL.
#
# Response rate limiting is off (rrl-ratelimit 0): NSD's default of 200 answers
# a second per /24 would otherwise drop or truncate most answers to repeld,
# whose queries all come from 127.0.0.1.  Statistics are kept per zone
# (zonestats), and control is on a unix socket in PEER_DIR, so
#
#   nsd-control -c "$PEER_DIR/nsd.conf" stats_noreset
#
# prints the queries each list received (bl.test.num.queries=...) with no keys
# or certificates.  As root NSD drops to its package's user (nsd), which then
# owns PEER_DIR.  The script execs nsd -d: the PID that ran it is NSD's (its
# xfrd; the main and server processes are its children), and SIGTERM to it stops
# them all.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

NSD_ADDR=${NSD_ADDR:-127.0.0.1}
NSD_PORT=${NSD_PORT:-5398}
NSD_TTL=${NSD_TTL:-300}
NSD_NEG_TTL=${NSD_NEG_TTL:-60}

need_loopback "$NSD_ADDR"
need_port "$NSD_PORT"
need_command nsd nsd
need_command nsd-control nsd
for ttl in "$NSD_TTL" "$NSD_NEG_TTL"; do
    [[ "$ttl" =~ ^[0-9]+$ ]] || die "TTL '$ttl': whole seconds"
done

dir=$(peer_dir nsd)
case "$dir" in /*) ;; *) dir=$PWD/$dir ;; esac # nsd.conf wants absolute paths
username='""'
if [ "$(id -u)" = 0 ] && id nsd >/dev/null 2>&1; then
    username=nsd
fi

# zone NAME RECORD... - a zone file with its SOA (minimum NSD_NEG_TTL) and records
zone() {
    local name=$1
    shift
    {
        echo "; Written by bench/peers/nsd.sh; rewritten on every start."
        echo "\$ORIGIN $name."
        echo "\$TTL $NSD_TTL"
        echo "@ IN SOA ns.$name. hostmaster.$name. 1 3600 600 86400 $NSD_NEG_TTL"
        echo "@ IN NS ns.$name."
        echo "ns IN A 127.0.0.1"
        printf '%s\n' "$@"
    } >"$dir/$name.zone"
}
zone bl.test "2.0.0.127 IN A 127.0.0.2" "3.0.0.127 IN A 127.0.0.3" "5.0.0.127 IN A 127.0.0.2"
zone wl.test "4.0.0.127 IN A 127.0.2.1" "5.0.0.127 IN A 127.0.2.1"

case "$NSD_ADDR" in *:*) ip6=yes ;; *) ip6=no ;; esac
rm -f "$dir/nsd.ctl" "$dir/nsd.pid" "$dir/xfrd.state" "$dir/zone.list"
cat >"$dir/nsd.conf" <<CF
# Written by bench/peers/nsd.sh; rewritten on every start.
server:
    ip-address: $NSD_ADDR@$NSD_PORT
    port: $NSD_PORT
    do-ip6: $ip6
    username: $username
    chroot: ""
    zonesdir: "$dir"
    database: ""
    pidfile: "$dir/nsd.pid"
    xfrdfile: "$dir/xfrd.state"
    zonelistfile: "$dir/zone.list"
    logfile: "$dir/nsd.log"
    server-count: 1
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0
remote-control:
    control-enable: yes
    control-interface: "$dir/nsd.ctl"
zone:
    name: "bl.test"
    zonefile: "bl.test.zone"
    zonestats: "%s"
zone:
    name: "wl.test"
    zonefile: "wl.test.zone"
    zonestats: "%s"
CF
if [ "$username" = nsd ]; then
    chown -R nsd "$dir"
fi
"$(command -v nsd-checkconf || echo /usr/sbin/nsd-checkconf)" "$dir/nsd.conf" || die "configuration check failed: $dir/nsd.conf"
exec "$(command -v nsd || echo /usr/sbin/nsd)" -d -c "$dir/nsd.conf"
