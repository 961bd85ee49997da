#!/bin/sh
# Trusts regmirror's root CA on this machine, in one command.
#
#   scripts/install-ca.sh http://PROXY:5000                install (again: no change)
#   scripts/install-ca.sh http://PROXY:5000 --hosts IP     also point the intercepted
#                                                          registry names at IP in /etc/hosts
#   scripts/install-ca.sh http://PROXY:5000 --connect PROXY:3128
#                                                          CONNECT proxy mode: also give the
#                                                          docker and containerd daemons (systemd
#                                                          drop-ins) and podman/skopeo/buildah
#                                                          (/etc/profile.d) HTTPS_PROXY=http://PROXY:3128
#   scripts/install-ca.sh --undo                           put back everything it changed
#
# It fetches /ca.crt and /hostnames from regmirror's plain listener and installs
# the CA into the system trust store (Debian/Ubuntu and Alpine:
# /usr/local/share/ca-certificates + update-ca-certificates; RHEL/Fedora:
# /etc/pki/ca-trust/source/anchors + update-ca-trust) and as ca.crt for every
# registry name under /etc/containers/certs.d and /etc/docker/certs.d (read
# per connection: docker needs no restart). With --connect it writes the same
# proxy environment as `regmirror setup docker|containerd|podman --connect`;
# the daemons read it once restarted (it runs `systemctl daemon-reload` but
# restarts nothing: that stops running containers). Every file it replaces is
# backed up first; --undo restores them. POSIX sh, curl or wget.
#
# REGMIRROR_ROOT (default: empty) prefixes every path it touches, so it can
# be tried against a copy of a machine's files.
set -eu

ROOT=${REGMIRROR_ROOT:-}
STATE="$ROOT/var/lib/regmirror-client"
MANIFEST="$STATE/installed"
HOSTS="$ROOT/etc/hosts"
BEGIN="# regmirror begin (scripts/install-ca.sh; remove with --undo)"
END="# regmirror end"

die() { echo "install-ca.sh: $*" >&2; exit 1; }
say() { echo "install-ca.sh: $*"; }

fetch() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsS --max-time 20 "$1"
  elif command -v wget >/dev/null 2>&1; then
    wget -q -T 20 -O - "$1"
  else
    die "needs curl or wget"
  fi
}

# The distribution's trust-store layout: "ANCHOR_DIR UPDATE_COMMAND".
trust_layout() {
  [ -r "$ROOT/etc/os-release" ] || die "no $ROOT/etc/os-release: cannot tell the distribution"
  ids=$( (. "$ROOT/etc/os-release"; echo "${ID:-} ${ID_LIKE:-}") )
  for id in $ids; do
    case "$id" in
      debian|ubuntu|alpine) echo "/usr/local/share/ca-certificates update-ca-certificates"; return ;;
      rhel|fedora|centos|rocky|almalinux|amzn) echo "/etc/pki/ca-trust/source/anchors update-ca-trust"; return ;;
    esac
  done
  die "unsupported distribution ($ids): install the CA by hand (see README)"
}

update_trust() {
  case "$1" in
    update-ca-trust) update-ca-trust extract ;;
    *) "$1" >/dev/null ;;
  esac || die "$1 failed"
}

# Records a path as changed by us, backing up what was there the first time.
claim() {
  path=$1
  grep -qxF "$path" "$MANIFEST" 2>/dev/null && return 0
  if [ -e "$ROOT$path" ]; then
    mkdir -p "$STATE/backup$(dirname "$path")"
    cp -p "$ROOT$path" "$STATE/backup$path"
  fi
  echo "$path" >>"$MANIFEST"
}

put() { # put SRC PATH: install SRC at PATH (0644)
  claim "$2"
  mkdir -p "$(dirname "$ROOT$2")"
  cp "$1" "$ROOT$2.regmirror-new"
  chmod 0644 "$ROOT$2.regmirror-new"
  mv "$ROOT$2.regmirror-new" "$ROOT$2"
}

# What CONNECT-mode clients must not send through regmirror (as `regmirror
# setup --connect` writes it): loopback only, never a registry name.
NO_PROXY_LIST="localhost,127.0.0.1,::1"

write_text() { # write_text PATH TEXT: install TEXT as the file at PATH (0644)
  printf '%s' "$2" >"$tmp/text"
  put "$tmp/text" "$1"
}

# CONNECT proxy mode: HTTPS_PROXY where each client reads its environment.
install_connect() {
  proxy=$1
  for unit in docker containerd; do
    write_text "/etc/systemd/system/$unit.service.d/regmirror-proxy.conf" "# regmirror CONNECT proxy mode: $unit reaches registries through regmirror
[Service]
Environment=\"HTTPS_PROXY=$proxy\"
Environment=\"NO_PROXY=$NO_PROXY_LIST\"
"
  done
  write_text /etc/profile.d/regmirror-proxy.sh "# regmirror CONNECT proxy mode: podman, skopeo and buildah reach registries through regmirror
export HTTPS_PROXY=$proxy
export NO_PROXY=$NO_PROXY_LIST
"
  reload_systemd
  say "HTTPS_PROXY=$proxy for dockerd and containerd (systemd drop-ins) and podman, skopeo, buildah (/etc/profile.d/regmirror-proxy.sh)"
  say "restart them to use it: systemctl restart docker containerd; log in again for /etc/profile.d"
}

# Lets systemd see drop-ins written or removed; only on the live machine.
reload_systemd() {
  if [ -z "$ROOT" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload || say "systemctl daemon-reload failed; run it before restarting docker/containerd"
  fi
}

install() {
  url=${1%/}
  hosts_ip=$2
  connect=$3
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  fetch "$url/ca.crt" >"$tmp/ca.crt" || die "cannot fetch $url/ca.crt"
  grep -q "BEGIN CERTIFICATE" "$tmp/ca.crt" || die "$url/ca.crt is not a PEM certificate"
  fetch "$url/hostnames" >"$tmp/names" || die "cannot fetch $url/hostnames"
  names=$(tr -s ' \n' ' ' <"$tmp/names")
  [ -n "$names" ] || die "$url/hostnames named no host"
  layout=$(trust_layout) || exit 1
  set -- $layout
  anchor_dir=$1 update=$2
  mkdir -p "$STATE"
  touch "$MANIFEST"
  echo "$update" >"$STATE/update"

  put "$tmp/ca.crt" "$anchor_dir/regmirror.crt"
  for n in $names; do
    put "$tmp/ca.crt" "/etc/containers/certs.d/$n/ca.crt"
    put "$tmp/ca.crt" "/etc/docker/certs.d/$n/ca.crt"
  done
  if [ -n "$hosts_ip" ]; then
    claim /etc/hosts
    [ -e "$HOSTS" ] || : >"$HOSTS"
    awk -v b="$BEGIN" -v e="$END" '$0==b{skip=1} !skip{print} $0==e{skip=0}' "$HOSTS" >"$tmp/hosts"
    { cat "$tmp/hosts"; echo "$BEGIN"; echo "$hosts_ip $names"; echo "$END"; } >"$tmp/hosts.new"
    cat "$tmp/hosts.new" >"$HOSTS"
    say "/etc/hosts: $hosts_ip $names"
  fi
  update_trust "$update"
  say "trusted regmirror's CA ($anchor_dir/regmirror.crt, certs.d for: $names)"
  [ -z "$connect" ] || install_connect "$connect"
}

undo() {
  [ -f "$MANIFEST" ] || { say "nothing to undo"; return 0; }
  while IFS= read -r path; do
    [ -n "$path" ] || continue
    if [ -e "$STATE/backup$path" ]; then
      cp -p "$STATE/backup$path" "$ROOT$path"
    else
      rm -f "$ROOT$path"
      rmdir "$(dirname "$ROOT$path")" 2>/dev/null || true
    fi
  done <"$MANIFEST"
  update=$(cat "$STATE/update" 2>/dev/null || echo update-ca-certificates)
  rm -rf "$STATE"
  update_trust "$update"
  reload_systemd
  say "restored everything install-ca.sh had changed"
}

case "${1:-}" in
  --undo) undo ;;
  http://*|https://*)
    url=$1; shift
    hosts_ip=
    connect=
    while [ $# -gt 0 ]; do
      case "$1" in
        --hosts) [ $# -ge 2 ] || die "--hosts needs the proxy's IP"; hosts_ip=$2; shift 2 ;;
        --connect)
          [ $# -ge 2 ] || die "--connect needs the CONNECT listener, HOST:PORT"
          connect=${2#http://}
          connect=${connect%/}
          case "$connect" in
            *://*|*/*|*@*|"") die "--connect $2: give HOST:PORT or http://HOST:PORT" ;;
            *:*) ;;
            *) connect="$connect:3128" ;;
          esac
          connect="http://$connect"
          shift 2
          ;;
        *) die "unknown argument $1" ;;
      esac
    done
    install "$url" "$hosts_ip" "$connect"
    ;;
  *) die "usage: install-ca.sh http://PROXY:5000 [--hosts PROXY_IP] [--connect PROXY:3128] | --undo" ;;
esac
