#!/usr/bin/env bash
# Make the servers the test suite talks to answer on loopback.
#
#   scripts/services.sh [redis] [memcached] [postgresql] [mariadb]   (no argument: all four)
#
# For each service: probe it with its own protocol; if it does not answer,
# install it with apt-get when its server is missing, start it, and wait (at
# most SERVICES_WAIT seconds, default 20) until it answers.  Prints one line per
# service and exits non-zero naming every service that could not be made to
# answer.  Safe to run again and again: a service that answers is left alone.
#
#   redis       127.0.0.1:6379   probe: redis-cli ping (or PING over /dev/tcp)
#   memcached   127.0.0.1:11211  probe: "version" over /dev/tcp
#   postgresql  127.0.0.1:5432   probe: pg_isready -h 127.0.0.1
#   mariadb     127.0.0.1:3306   probe: the server's greeting over /dev/tcp; then
#               (as root, through the socket) database "test" and a user
#               "ormcache" without password that may use it, from 127.0.0.1
set -euo pipefail

WAIT_SECONDS=${SERVICES_WAIT:-20}
REDIS_PORT=6379
MEMCACHED_PORT=11211
POSTGRESQL_PORT=5432
MARIADB_PORT=3306

usage() {
    echo "usage: $0 [redis] [memcached] [postgresql] [mariadb]   (no argument: all four)" >&2
    exit 2
}

log() { echo "services: $*" >&2; }

# --- privileges and apt-get --------------------------------------------------

if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    SUDO=(__no_root__)
fi

APT_UPDATED=0
apt_install() {
    if [[ ${SUDO[0]:-} == __no_root__ ]]; then
        log "not root and no password-less sudo: install $* with apt-get yourself"
        return 1
    fi
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || return 1
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >&2
}

as_root() {
    if [[ ${SUDO[0]:-} == __no_root__ ]]; then
        log "not root: cannot run $*"
        return 1
    fi
    "${SUDO[@]}" "$@"
}

# Send a request (printf %b escapes) over /dev/tcp; print the reply's first line
# without its trailing CR.  Bounded by a 3 s timeout.
tcp_ask() { # host port request
    local reply
    reply=$(timeout 3 bash -c '
        exec 3<>"/dev/tcp/$1/$2" || exit 1
        printf "%b" "$3" >&3
        IFS= read -r line <&3 || exit 1
        printf "%s" "$line"
    ' _ "$1" "$2" "$3" 2>/dev/null) || return 1
    printf '%s\n' "${reply%$'\r'}"
}

# --- redis ---------------------------------------------------------------------

redis_probe() {
    local reply
    if command -v redis-cli >/dev/null 2>&1; then
        reply=$(timeout 3 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) || return 1
        [[ $reply == PONG ]]
    else
        reply=$(tcp_ask 127.0.0.1 "$REDIS_PORT" 'PING\r\n') || return 1
        [[ $reply == +PONG ]]
    fi
}
redis_installed() { command -v redis-server >/dev/null 2>&1; }
redis_install() { apt_install redis-server; }
redis_start() {
    as_root mkdir -p /var/lib/redis /var/log/redis
    as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
        --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
}

# --- memcached -----------------------------------------------------------------

memcached_probe() {
    local reply
    reply=$(tcp_ask 127.0.0.1 "$MEMCACHED_PORT" 'version\r\n') || return 1
    [[ $reply == VERSION* ]]
}
memcached_installed() { command -v memcached >/dev/null 2>&1; }
memcached_install() { apt_install memcached; }
memcached_start() {
    local user=()
    if [[ $(id -u) -eq 0 ]]; then
        if id memcache >/dev/null 2>&1; then user=(-u memcache); else user=(-u nobody); fi
    fi
    memcached -d "${user[@]}" -l 127.0.0.1 -p "$MEMCACHED_PORT" -m 256
}

# --- postgresql ----------------------------------------------------------------

postgresql_probe() {
    command -v pg_isready >/dev/null 2>&1 || return 1
    pg_isready -q -h 127.0.0.1 -p "$POSTGRESQL_PORT" -t 2
}
postgresql_installed() {
    command -v pg_ctlcluster >/dev/null 2>&1 && [[ -d /etc/postgresql ]] \
        && [[ -n $(ls /etc/postgresql) ]]
}
postgresql_install() { apt_install postgresql; }
postgresql_start() {
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
}

# --- mariadb -------------------------------------------------------------------

mariadb_probe() {
    # a MySQL server speaks first: a greeting packet naming its version
    timeout 3 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        head -c 64 <&3 | tr -d "\0" | grep -qa -E "[0-9]+\.[0-9]+\.[0-9]+"
    ' _ "$MARIADB_PORT" 2>/dev/null
}
mariadb_installed() { command -v mariadbd >/dev/null 2>&1 || command -v mysqld >/dev/null 2>&1; }
mariadb_install() { apt_install mariadb-server; }
mariadb_start() {
    if [[ -x /etc/init.d/mariadb ]]; then
        as_root /etc/init.d/mariadb start
    else
        as_root mkdir -p /run/mysqld
        as_root chown mysql: /run/mysqld 2>/dev/null || true
        as_root bash -c 'mysqld_safe --bind-address=127.0.0.1 >/dev/null 2>&1 &'
    fi
}
# The tests' database and user (mysql+pymysql://ormcache@127.0.0.1:3306/test):
# root on Debian logs in through the socket only.  Idempotent.
mariadb_setup() {
    local client
    client=$(command -v mariadb || command -v mysql) || return 1
    as_root "$client" --protocol=socket -uroot -e "
        CREATE DATABASE IF NOT EXISTS test;
        CREATE USER IF NOT EXISTS 'ormcache'@'127.0.0.1';
        CREATE USER IF NOT EXISTS 'ormcache'@'localhost';
        GRANT ALL ON test.* TO 'ormcache'@'127.0.0.1';
        GRANT ALL ON test.* TO 'ormcache'@'localhost';
        GRANT ALL ON \`ormcache\\_%\`.* TO 'ormcache'@'127.0.0.1';
        GRANT ALL ON \`ormcache\\_%\`.* TO 'ormcache'@'localhost';" >&2
}

# --- driver --------------------------------------------------------------------

port_of() {
    case $1 in
        redis) echo "$REDIS_PORT" ;;
        memcached) echo "$MEMCACHED_PORT" ;;
        postgresql) echo "$POSTGRESQL_PORT" ;;
        mariadb) echo "$MARIADB_PORT" ;;
    esac
}

wait_for() { # service
    local deadline=$((SECONDS + WAIT_SECONDS))
    while ! "$1_probe"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

ensure() { # service; prints its status line, returns non-zero if it does not answer
    local service=$1 address="127.0.0.1:$(port_of "$1")" how=
    if "${service}_probe"; then
        echo "$service: ok at $address (already running)"
        return 0
    fi
    if ! "${service}_installed"; then
        if ! "${service}_install" || ! "${service}_installed"; then
            echo "$service: FAILED at $address (not installed, and apt-get could not install it)"
            return 1
        fi
        how="installed, "
        # A package's install scripts may have started it already.
        if wait_for "$service"; then
            echo "$service: ok at $address (${how}started by its package)"
            return 0
        fi
    fi
    # Starting may fail because it is already starting up: the wait decides.
    "${service}_start" >&2 || log "$service: start command exited non-zero"
    if wait_for "$service"; then
        echo "$service: ok at $address (${how}started)"
        return 0
    fi
    echo "$service: FAILED at $address (no answer ${WAIT_SECONDS}s after start)"
    return 1
}

main() {
    local services=() failed=() service
    for service in "$@"; do
        case $service in
            redis | memcached | postgresql | mariadb) services+=("$service") ;;
            -h | --help) usage ;;
            *) echo "$0: unknown service: $service" >&2; usage ;;
        esac
    done
    ((${#services[@]})) || services=(redis memcached postgresql mariadb)
    for service in "${services[@]}"; do
        ensure "$service" || failed+=("$service")
    done
    if [[ " ${services[*]} " == *" mariadb "* && " ${failed[*]} " != *" mariadb "* ]]; then
        mariadb_setup || { echo "mariadb: FAILED to create the tests' database and user"; failed+=(mariadb); }
    fi
    if ((${#failed[@]})); then
        echo "services: could not make answer: ${failed[*]}" >&2
        exit 1
    fi
}

main "$@"
