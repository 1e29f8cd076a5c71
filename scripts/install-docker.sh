#!/usr/bin/env bash
# Install and start a Docker engine with compose v2 and buildx on Debian 12, idempotently.
#
# - docker.io (engine 20.10) and debootstrap from bookworm.
# - docker-compose (v2) and docker-buildx from Debian trixie: bookworm has only compose v1. Their .debs depend
#   only on libc6 and install on bookworm; a private apt config fetches them so the system's sources stay as
#   they are.
# - dockerd is started by hand when not running (no systemd here), then we wait for `docker info`.
#
# Everything already in place is left alone: a second run takes well under a second.
set -euo pipefail

log() { printf '[install-docker] %s\n' "$*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        log "must run as root (it installs packages and starts dockerd)"
        exit 1
    fi
}

apt_updated=""
apt_update_once() {
    if [ -z "$apt_updated" ]; then
        apt-get update -qq
        apt_updated=1
    fi
}

install_engine() {
    local missing=()
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    # The docker.io package's CLI is old; a newer CLI already on PATH (e.g. /usr/local/bin/docker) wins.
    if [ "${#missing[@]}" -gt 0 ]; then
        log "apt-get install ${missing[*]}"
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

plugin_ok() { docker "$1" version >/dev/null 2>&1; }

install_plugins() {
    local pkgs=()
    # `docker compose version` works without an engine; an old v1 `docker-compose` binary does not count.
    plugin_ok compose || pkgs+=(docker-compose)
    plugin_ok buildx || pkgs+=(docker-buildx)
    [ "${#pkgs[@]}" -eq 0 ] && return 0

    local mirror work
    mirror=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    if [ -z "$mirror" ]; then
        mirror=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' \
            /etc/apt/sources.list 2>/dev/null || true)
    fi
    mirror=${mirror:-http://deb.debian.org/debian}
    work=$(mktemp -d)
    trap 'rm -rf "$work"' RETURN
    chmod 755 "$work" # apt's download user (_apt) must reach it, or apt warns and downloads as root
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" >"$work/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -qq)
    log "fetching ${pkgs[*]} from trixie ($mirror)"
    apt-get "${opts[@]}" update
    (cd "$work" && apt-get "${opts[@]}" download "${pkgs[@]}")
    dpkg -i "$work"/*.deb >/dev/null
    # Some CLIs look in /usr/local/lib/docker/cli-plugins only; the trixie debs use /usr/libexec/docker/cli-plugins.
    local p
    for p in docker-compose docker-buildx; do
        if [ -x "/usr/libexec/docker/cli-plugins/$p" ] && ! plugin_ok "${p#docker-}"; then
            mkdir -p /usr/local/lib/docker/cli-plugins
            ln -sf "/usr/libexec/docker/cli-plugins/$p" "/usr/local/lib/docker/cli-plugins/$p"
        fi
    done
    plugin_ok compose && plugin_ok buildx || {
        log "compose or buildx still missing after install"
        exit 1
    }
}

start_engine() {
    if docker info >/dev/null 2>&1; then
        return 0
    fi
    log "starting dockerd (log: /var/log/dockerd.log)"
    # setsid: the engine must outlive this script and the shell or CI step that ran it.
    setsid nohup dockerd >>/var/log/dockerd.log 2>&1 </dev/null &
    local i
    for i in $(seq 1 60); do
        if docker info >/dev/null 2>&1; then
            log "engine up after ${i}x0.5 s"
            return 0
        fi
        sleep 0.5
    done
    log "dockerd did not answer within 30 s; last lines of /var/log/dockerd.log:"
    tail -n 20 /var/log/dockerd.log >&2 || true
    exit 1
}

need_root
install_engine
install_plugins
start_engine
log "ready: $(docker version --format 'engine {{.Server.Version}}, API {{.Server.APIVersion}}'), \
$(docker compose version --short 2>/dev/null | sed 's/^/compose /'), $(docker buildx version | awk '{print "buildx " $2}')"
