#!/bin/sh
# Container entrypoint: hand the data directory to the relay user, then become it.
#
# Docker creates a missing ./data bind mount as root, and files copied in by an
# operator (a restored relay.db) are often root's too; the relay runs as uid
# 10001 and could not open them. So, started as root, this makes everything in
# the data directory the relay user's and drops to that user for good (setpriv,
# from util-linux). Started as another user (`user:` in compose), it runs the
# command as that user. A bare role (`docker run IMAGE worker`) means tspro-relay.
set -eu

case "${1:-}" in
    "" | -*) set -- tspro-relay "$@" ;;
esac
command -v "$1" >/dev/null 2>&1 || set -- tspro-relay "$@"

if [ "$(id -u)" != 0 ]; then
    exec "$@"
fi

data=${RELAY_DATA_DIR:-/data}
uid=$(id -u relay)
gid=$(id -g relay)
if ! mkdir -p "$data" 2>/dev/null \
    || ! find "$data" \( ! -user "$uid" -o ! -group "$gid" \) -exec chown -h "$uid:$gid" {} + 2>/dev/null; then
    echo "tspro-relay: the data directory $data cannot be handed to the relay user (uid $uid); on the host, run: sudo chown -R $uid:$gid ./data" >&2
    exit 1
fi
exec setpriv --reuid="$uid" --regid="$gid" --init-groups -- "$@"
