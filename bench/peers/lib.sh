# lib.sh - what the peer recipes share.  Sourced, never run.
#
# Every recipe writes a private configuration into PEER_DIR and then *execs*
# the server in the foreground, so the PID that started the recipe is the
# server's own: the caller stops it with SIGTERM to that PID and nothing is
# ever looked up or killed by name.  Nothing here listens on, or talks to, an
# address outside 127.0.0.0/8 and ::1.

# die MSG... - the reason on stderr, exit 1
die() {
    echo "${0##*/}: $*" >&2
    exit 1
}

# need_loopback ADDR - refuse an address outside 127.0.0.0/8 and ::1
need_loopback() {
    case "$1" in
        127.*.*.* | ::1) ;;
        *) die "$1 is not a loopback address (127.0.0.0/8 or ::1)" ;;
    esac
}

# need_port PORT - a number between 1 and 65535
need_port() {
    case "$1" in
        '' | *[!0-9]*) die "port '$1' is not a number" ;;
    esac
    [ "$1" -ge 1 ] && [ "$1" -le 65535 ] || die "port $1 is out of range"
}

# need_command NAME PACKAGE - NAME on PATH (or in /usr/sbin), else say what to install
need_command() {
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] ||
        die "$1 not found: apt-get install $2"
}

# peer_dir NAME - PEER_DIR, or a fresh directory for this instance under TMPDIR
peer_dir() {
    local dir=${PEER_DIR:-${TMPDIR:-/tmp}/repeld-bench-$1}
    mkdir -p "$dir"
    printf '%s\n' "$dir"
}

# postfix_services - the master.cf lines of a private Postfix instance after its
# listeners: the smtpd pass service, the queue's daemons and the discard transport
postfix_services() {
    cat <<'CF'
smtpd       pass  -       -      n      -      -       smtpd
cleanup     unix  n       -      n      -      0       cleanup
qmgr        unix  n       -      n      300    1       qmgr
pickup      unix  n       -      n      60     1       pickup
rewrite     unix  -       -      n      -      -       trivial-rewrite
bounce      unix  -       -      n      -      0       bounce
defer       unix  -       -      n      -      0       bounce
trace       unix  -       -      n      -      0       bounce
verify      unix  -       -      n      -      1       verify
proxymap    unix  -       -      n      -      -       proxymap
discard     unix  -       -      n      -      -       discard
error       unix  -       -      n      -      -       error
retry       unix  -       -      n      -      -       error
anvil       unix  -       -      n      -      1       anvil
scache      unix  -       -      n      -      1       scache
postlog     unix-dgram n  -      n      -      1       postlogd
CF
}

# run_postfix_master CONF DAEMON_DIR - check the instance in CONF, then exec its master
run_postfix_master() {
    # master's children run as postfix and must reach the queue: a parent
    # directory of mode 0700 (mktemp -d) stops them, and master then exits in
    # silence (it says why only to syslog).
    runuser -u postfix -- test -r "$1/main.cf" ||
        die "the postfix user cannot read $1: open up its parent directories (chmod 755)"
    # Creates the queue's directories with their owners, then checks the instance.
    postfix -c "$1" set-permissions >/dev/null 2>&1 || true
    postfix -c "$1" check
    exec "$2/master" -c "$1" -d
}

# postfix_main_cf DIR NAME RECIPE - the main.cf lines every private Postfix instance
# shares: its queue, data and maillog under DIR, myhostname NAME.bench.invalid, no DNS
# and no local delivery (mail relayed from mynetworks only, to the discard transport);
# the recipe appends its listeners, mynetworks and limits
postfix_main_cf() {
    cat <<CF
# Written by bench/peers/$3; rewritten on every start.
compatibility_level = 3.6
queue_directory = $1/spool
data_directory = $1/data
mail_owner = postfix
setgid_group = postdrop
myhostname = $2.bench.invalid
mydomain = bench.invalid
myorigin = \$myhostname
append_dot_mydomain = no
readme_directory = no
smtputf8_enable = no
mydestination =
alias_maps =
alias_database =
biff = no
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtpd_client_connection_count_limit = 0
smtpd_relay_restrictions = permit_mynetworks, reject
default_transport = discard:bench
relay_transport = discard:bench
local_transport = discard:bench
# postlogd writes only below maillog_file_prefixes (/var by default), and a
# start that fails says why only to syslog, which a container may not have.
maillog_file = $1/maillog
maillog_file_prefixes = $1
CF
}
