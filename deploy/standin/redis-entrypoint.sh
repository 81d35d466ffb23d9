#!/bin/sh
# What the official redis image's entrypoint does, as far as compose relies on it:
# - options only (`--appendonly yes`) or a .conf file as first argument: run redis-server with them;
# - redis-server started as root: /data handed to the `redis` user, the server run as that user;
# - protected mode off (the container network is the boundary) unless a given config file sets it;
# - data files private (umask 0077).
set -e
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
    set -- redis-server "$@"
fi
if [ "$1" = redis-server ] && [ "$(id -u)" = 0 ]; then
    find . ! -user redis -exec chown redis '{}' +
    exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
fi
if [ "$1" = redis-server ]; then
    shift
    config=
    if [ -f "${1:-}" ]; then config=$1; shift; fi
    if [ -n "$config" ] && grep -q '^protected-mode' "$config"; then
        set -- redis-server "$config" "$@"
    elif [ -n "$config" ]; then
        set -- redis-server "$config" --protected-mode no "$@"
    else
        set -- redis-server --protected-mode no "$@"
    fi
fi
[ "$(umask)" = 0022 ] && umask 0077
exec "$@"
