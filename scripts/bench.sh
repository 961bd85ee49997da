#!/usr/bin/env bash
# regmirror and its peers side by side, in one run, against one upstream and
# the same generated image (issue 16). Prints a table of ratios and, unless
# --quick, writes docs/BENCHMARKS.md.
#
#   scripts/bench.sh            full run (~200 MiB blob, 3 alternating repetitions; ~13 min on a 2-core
#                               machine, plus the release build the first time)
#   scripts/bench.sh --quick    tiny sizes, 1 repetition, debug build: proves the script works (CI)
#   scripts/bench.sh --reps N   repetitions (default 3)
#   scripts/bench.sh --out F    where the report goes (default docs/BENCHMARKS.md; quick: none)
#   scripts/bench.sh --only A,B only these figures (cold manifest h2m1 blob1 blob64 tag conns rss
#                               pull cold8 evict idle herd push s3); prints the tables; with --out,
#                               rewrites only the tables of the groups it measured (cache, registry,
#                               replicas)
#   scripts/bench.sh --hold     start and warm every peer, print how to reach them, and wait
#                               (for perf or a load generator by hand); Ctrl-C stops them all
#
# Environment: BENCH_RM_BIN=PATH runs that regmirror binary; BENCH_SKIP_BUILD=1 skips the
# cargo build (with BENCH_RM_BIN, to measure a binary built earlier while the tree changes);
# BENCH_KEEP=1 keeps the work directory.
#
# Fleet-scale figures (issue 27), regmirror beside nginx-cache:
#   herd   500 clients (scripts/bench_herd.py, from 50 source addresses 127.0.20.1-50, a fleet
#          behind NAT gateways) pull one cold 1 MiB, 5-layer image at once: manifest by tag,
#          config, every layer, each checked against its digest; wall time and p99 per client
#   h2m1   warm manifest GETs over HTTP/2, 64 connections × 1 stream (h2load -m 1)
#   idle   RSS per idle connection: 4,000 TLS connections (scripts/bench_idle.py, from 40
#          source addresses 127.0.21.1-40), one warm manifest GET each, then idle for 10 s;
#          over HTTP/1.1 and over HTTP/2
# (--quick: 20 herd clients, 100 idle connections.)
#
# Everything runs on loopback (127.0.9.1-5), behind TLS, and is stopped on exit:
#   127.0.9.1  direct        Debian's docker-registry (CNCF distribution), the upstream itself
#   127.0.9.2  regmirror     release build, transparent mode (SNI registry-1.docker.io)
#   127.0.9.3  dist-proxy    a second docker-registry with proxy.remoteurl = the upstream
#   127.0.9.4  nginx-cache   nginx proxy_cache + proxy_cache_lock, blobs and digest manifests by URI
#   127.0.9.5  nginx-static  nginx serving the same bytes as files (the ceiling for warm content)
# and, for the push figures, two private registries addressed as https://push.bench:
#   127.0.9.6  regmirror     a second instance, with a [[local]] namespace and htpasswd logins
#   127.0.9.7  dist-auth     Debian's docker-registry with the same htpasswd file
# and, for the replica figures (s3), the S3 backend on a one-node Garage:
#   127.0.9.8  regmirror-s3  a third instance, cache.backend = "s3", its local read cache emptied
#                            before each cold-local GET
#   127.0.9.9  garage        Garage (crates.io, installed by scripts/test.sh), read directly with
#                            curl --aws-sigv4 for the comparison
#   127.0.9.10 nginx-relay   nginx proxy_pass to Garage (buffered, no temp files; :3900 plain,
#                            :3943 TLS), read the same way: what relaying the object through any
#                            process costs here
# Clients address every peer as https://registry-1.docker.io (curl --resolve,
# h2load --connect-to, skopeo in a mount namespace with its own /etc/hosts).
# Needs root (port 443, unshare --mount). Installs its tools with apt when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
repo_root=$(pwd)

args="$*"
quick=0
reps=3
out=""
only=""
hold=0
while (($#)); do
  case "$1" in
    --quick) quick=1 ;;
    --reps) reps="$2"; shift ;;
    --out) out="$2"; shift ;;
    --only) only=",$2,"; shift ;;
    --hold) hold=1 ;;
    *) echo "usage: $0 [--quick] [--reps N] [--out FILE] [--only FIGURES] [--hold]" >&2; exit 2 ;;
  esac
  shift
done
command_line="scripts/bench.sh${args:+ $args}"
if ((quick)); then
  reps=1
  big_mib=4; small_mib=(0.5 0.5 0.5 0.5)
  dur=1; head_n=20; conns_many=200; lat_n=400; lat_s=2
  herd_n=20; herd_mib=(0.1 0.05 0.05 0.05 0.05); idle_n=100; idle_settle=1
else
  big_mib=200; small_mib=(40 40 40 40)
  dur=3; head_n=300; conns_many=1000; lat_n=4000; lat_s=8
  # The herd's image is small (1 MiB: 0.6 + 4 × 0.1): 500 clients × the 360 MiB bench image
  # would be 176 GiB through one Python process, minutes per peer. What the herd measures
  # is how the waiters for one cold download are served, not throughput (blob64 does that):
  # with 4 MiB (2 GiB in all) both peers took 9-10 s, the time the client's one core
  # needs to decrypt and hash it, and neither the herd's waits nor their absence showed.
  herd_n=500; herd_mib=(0.6 0.1 0.1 0.1 0.1); idle_n=4000; idle_settle=10
  [[ -n $out || -n $only ]] || ((hold)) || out=docs/BENCHMARKS.md
fi
want() { [[ -z $only || $only == *",$1,"* ]]; }

# ---------------------------------------------------------------- tools
packages=(docker-registry nginx-light nghttp2-client skopeo curl openssl python3 util-linux apache2-utils)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  [[ $(id -u) -eq 0 ]] || { echo "bench: missing ${missing[*]} and not root" >&2; exit 1; }
  echo "==> installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[[ $(id -u) -eq 0 ]] || { echo "bench: needs root (port 443, unshare --mount)" >&2; exit 1; }
for t in docker-registry nginx h2load skopeo curl openssl python3 unshare htpasswd; do
  command -v "$t" >/dev/null || [[ -x /usr/sbin/$t ]] || { echo "bench: $t not found" >&2; exit 1; }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

if [[ -n ${BENCH_SKIP_BUILD:-} ]]; then
  echo "==> no cargo build (BENCH_SKIP_BUILD)"
elif ((quick)); then
  # Quick proves the script works (CI, after `cargo test` built the debug
  # binary); its figures mean nothing, so it skips the long release build.
  echo "==> cargo build (debug: --quick)"
  cargo build --locked --quiet
else
  echo "==> cargo build --release"
  cargo build --release --locked --quiet
  echo "bench: build took $SECONDS s" >&2
fi
RM_BIN=${BENCH_RM_BIN:-$repo_root/target/$( ((quick)) && echo debug || echo release)/regmirror}
[[ -x $RM_BIN ]] || { echo "bench: no regmirror binary at $RM_BIN" >&2; exit 1; }

# ---------------------------------------------------------------- processes
W=$(mktemp -d /tmp/regmirror-bench.XXXXXX)
declare -A PID=()
stop() { # stop NAME: SIGTERM, then SIGKILL after 5 s
  local p=${PID[$1]:-}
  [[ -n $p ]] || return 0
  kill "$p" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  unset "PID[$1]"
}
cleanup() {
  local n
  for n in "${!PID[@]}"; do stop "$n"; done
  [[ -n ${BENCH_KEEP:-} ]] && echo "bench: kept $W" >&2 || rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_tls() { # wait_tls IP: until something answers TLS on IP:443
  for _ in $(seq 100); do
    curl -sk -o /dev/null --max-time 1 "https://$1/v2/" && return 0
    sleep 0.1
  done
  echo "bench: nothing answers on $1:443" >&2
  return 1
}

H=registry-1.docker.io
UP=127.0.9.1 RM=127.0.9.2 DP=127.0.9.3 NC=127.0.9.4 NS=127.0.9.5
declare -A IP=([direct]=$UP [regmirror]=$RM [dist-proxy]=$DP [nginx-cache]=$NC [nginx-static]=$NS)
RS=127.0.9.8 GA=127.0.9.9 NR=127.0.9.10
IP[regmirror-s3]=$RS IP[nginx-relay]=$NR

# ---------------------------------------------------------------- certificates
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$W/ca.key" \
  -out "$W/ca.pem" -days 2 -subj "/CN=regmirror bench CA" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$W/leaf.key" \
  -out "$W/leaf.csr" -subj "/CN=$H" 2>/dev/null
printf 'subjectAltName=DNS:%s,DNS:upstream.bench,DNS:push.bench,IP:%s,IP:%s,IP:%s,IP:%s\nextendedKeyUsage=serverAuth\n' \
  "$H" "$UP" "$DP" "$NC" "$NS" >"$W/leaf.ext"
openssl x509 -req -in "$W/leaf.csr" -CA "$W/ca.pem" -CAkey "$W/ca.key" -CAcreateserial \
  -days 2 -extfile "$W/leaf.ext" -out "$W/leaf.pem" 2>/dev/null
cat "$W/leaf.pem" "$W/ca.pem" >"$W/chain.pem"

# ---------------------------------------------------------------- upstream + image
start_registry() { # start_registry NAME IP DIR [proxy|auth]
  local name=$1 ip=$2 dir=$3 mode=${4:-}
  mkdir -p "$dir/store"
  {
    echo "version: 0.1"
    echo "log: {level: warn, accesslog: {disabled: false}}"
    echo "storage: {filesystem: {rootdirectory: $dir/store}, delete: {enabled: true}}"
    echo "http: {addr: \"$ip:443\", tls: {certificate: $W/chain.pem, key: $W/leaf.key}}"
    [[ $mode == proxy ]] && echo "proxy: {remoteurl: \"https://$UP\"}"
    [[ $mode == auth ]] && echo "auth: {htpasswd: {realm: bench, path: $W/htpasswd}}"
  } >"$dir/config.yml"
  # distribution reads REGISTRY_* variables as configuration: start it without any.
  env -i PATH="$PATH" SSL_CERT_FILE="$W/ca.pem" docker-registry serve "$dir/config.yml" \
    >"$dir/log" 2>&1 &
  PID[$name]=$!
  wait_tls "$ip"
}
start_registry direct "$UP" "$W/up"

echo "==> generating the image (layers: ${big_mib} MiB + ${small_mib[*]} MiB)"
python3 scripts/bench_image.py "$W/oci" 1 "$big_mib" "${small_mib[@]}" >"$W/image.txt"
read -r MANIFEST MANIFEST_SIZE < <(sed -n 1p "$W/image.txt")
read -r BIG BIG_SIZE < <(sed -n 2p "$W/image.txt")
read -r SMALL _ < <(sed -n 3p "$W/image.txt")
IMAGE_BYTES=$(awk '{s += $2} END {print s}' "$W/image.txt")
CONFIG=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["config"]["digest"])' \
  "$W/oci/blobs/sha256/${MANIFEST#sha256:}")
mkdir -p "$W/certdir" && cp "$W/ca.pem" "$W/certdir/ca.crt"
skopeo copy -q --dest-cert-dir "$W/certdir" "oci:$W/oci:1" "docker://$UP/library/bench:1"
MT=application/vnd.oci.image.manifest.v1+json
REPO_URL=https://$H/v2/library/bench
if want herd; then
  echo "==> generating the herd's image (layers: ${herd_mib[*]} MiB)"
  python3 scripts/bench_image.py "$W/herd-oci" 1 "${herd_mib[@]}" >"$W/herd-image.txt"
  read -r HERD_MANIFEST _ < <(sed -n 1p "$W/herd-image.txt")
  HERD_MIB=$(awk '{s += $2} END {printf "%.1f", s / 1048576}' "$W/herd-image.txt")
  skopeo copy -q --dest-cert-dir "$W/certdir" "oci:$W/herd-oci:1" "docker://$UP/library/herd:1"
fi
# The clients' source addresses for the herd and idle figures: on Linux all of
# 127/8 is loopback, but a host may route it otherwise; bind each once to know.
HERD_SRC=127.0.20.1 HERD_NSRC=50 IDLE_SRC=127.0.21.1 IDLE_NSRC=40
if want herd || want idle; then
  python3 - "$HERD_SRC" "$HERD_NSRC" "$IDLE_SRC" "$IDLE_NSRC" <<'PY' || { echo "bench: cannot bind the clients' source addresses" >&2; exit 1; }
import ipaddress, socket, sys
for first, n in zip(sys.argv[1::2], sys.argv[2::2]):
    for i in range(int(n)):
        with socket.socket() as s:
            s.bind((str(ipaddress.IPv4Address(first) + i), 0))
PY
fi

# ---------------------------------------------------------------- peers
rm_config() {
  cat >"$W/rm/config.toml" <<EOF
[server]
https = "$RM:443"
http = "$RM:5000"
name = "regmirror.bench"

[ca]
dir = "$W/rm/certs"

[cache]
dir = "$W/rm/data"
max_size = "20GiB"

[resolver]
overrides = { "upstream.bench" = "$UP" }

[[upstream]]
name = "docker.io"
hosts = ["$H"]
url = "https://upstream.bench"
namespace = "dockerhub"
ca_file = "$W/ca.pem"

[limits]
# Every load generator connects from one address: lift the per-client cap
# (its purpose, fairness between clients, does not apply to one client).
max_connections_per_client = 4096
# The idle figure holds 4,000 connections from 40 addresses: the table is
# raised so that they stay below its last share (README, sizing for a fleet).
max_connections = 8192
EOF
}
start_regmirror() {
  mkdir -p "$W/rm"
  rm_config
  "$RM_BIN" serve --config "$W/rm/config.toml" >>"$W/rm/log" 2>&1 &
  PID[regmirror]=$!
  for _ in $(seq 100); do [[ -f $W/rm/certs/ca.pem ]] && break; sleep 0.1; done
  wait_tls "$RM" 2>/dev/null || curl -s -o /dev/null --max-time 2 "http://$RM:5000/healthz" || true
  for _ in $(seq 100); do
    curl -s -o /dev/null --max-time 1 --resolve "$H:443:$RM" --cacert "$W/rm/certs/ca.pem" "https://$H/v2/" && return 0
    sleep 0.1
  done
  echo "bench: regmirror did not start (log: $(tail -5 "$W/rm/log"))" >&2
  return 1
}

nginx_common() { # nginx_common NAME: the parts every nginx shares
  cat <<EOF
user root;
worker_processes auto;
pid $W/$1/nginx.pid;
error_log $W/$1/error.log warn;
daemon off;
events { worker_connections 8192; }
http {
  access_log $W/$1/access.log;
  client_body_temp_path $W/$1/client_body;
  proxy_temp_path $W/$1/proxy_temp;
  fastcgi_temp_path $W/$1/fastcgi; uwsgi_temp_path $W/$1/uwsgi; scgi_temp_path $W/$1/scgi;
  sendfile on;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  ssl_certificate $W/chain.pem;
  ssl_certificate_key $W/leaf.key;
  ssl_session_cache shared:SSL:10m;
EOF
}
start_nginx() { # start_nginx NAME IP
  mkdir -p "$W/$1"
  {
    nginx_common "$1"
    if [[ $1 == nginx-cache ]]; then
      cat <<EOF
  proxy_cache_path $W/$1/cache levels=1:2 keys_zone=registry:32m max_size=20g inactive=7d use_temp_path=off;
  upstream registry { server $UP:443; keepalive 64; }
  server {
    listen $2:443 ssl http2;
    client_max_body_size 0;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host \$host;
    proxy_ssl_server_name on;
    proxy_ssl_name upstream.bench;
    proxy_ssl_verify on;
    proxy_ssl_trusted_certificate $W/ca.pem;
    proxy_ssl_session_reuse on;
    # Immutable content (blobs, manifests by digest) is cached by URI.
    location ~ "^/v2/.+/(blobs|manifests)/sha256:[0-9a-f]{64}\$" {
      proxy_pass https://registry;
      proxy_cache registry;
      proxy_cache_key \$uri;
      proxy_cache_valid 200 7d;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 10m;
      proxy_cache_lock_age 10m;
      proxy_ignore_headers Cache-Control Expires Set-Cookie;
      proxy_read_timeout 10m;
      add_header X-Cache \$upstream_cache_status;
    }
    location / { proxy_pass https://registry; }
  }
}
EOF
    elif [[ $1 == nginx-relay ]]; then
      cat <<EOF
  upstream garage { server $GA:3900; keepalive 16; }
  server {
    listen $2:3900;
    listen $2:3943 ssl;
    location / {
      proxy_pass http://garage;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$http_host;
      proxy_max_temp_file_size 0;
    }
  }
}
EOF
    else
      cat <<EOF
  types { }
  server {
    listen $2:443 ssl http2;
    root $W/static;
    location /v2/library/bench/manifests/ { default_type $MT; }
    location /v2/library/bench/blobs/ { default_type application/octet-stream; }
    location = /v2/ { default_type application/json; return 200 "{}"; }
  }
}
EOF
    fi
  } >"$W/$1/nginx.conf"
  "$NGINX" -c "$W/$1/nginx.conf" -p "$W/$1" >"$W/$1/stdout" 2>&1 &
  PID[$1]=$!
  if [[ $1 == nginx-relay ]]; then
    for _ in $(seq 100); do curl -s -o /dev/null --max-time 1 "http://$2:3900/" && return 0; sleep 0.1; done
    fail "nginx-relay did not start: $(tail -5 "$W/$1/error.log")"
  fi
  wait_tls "$2"
}

# nginx static: the image's bytes as files under the URLs clients ask for.
mkdir -p "$W/static/v2/library/bench/manifests" "$W/static/v2/library/bench/blobs"
for f in "$W"/oci/blobs/sha256/*; do
  d=sha256:$(basename "$f")
  ln "$f" "$W/static/v2/library/bench/blobs/$d"
  [[ $d == "$MANIFEST" ]] && ln "$f" "$W/static/v2/library/bench/manifests/$d"
done

start_peer() {
  case "$1" in
    regmirror) start_regmirror ;;
    dist-proxy) start_registry dist-proxy "$DP" "$W/dp" proxy ;;
    nginx-cache | nginx-static) start_nginx "$1" "${IP[$1]}" ;;
    direct) ;;
  esac
}
wipe_peer() { # stops a caching peer and empties its cache
  case "$1" in
    regmirror) stop regmirror; rm -rf "$W/rm/data" ;;
    dist-proxy) stop dist-proxy; rm -rf "$W/dp/store" ;;
    nginx-cache) stop nginx-cache; rm -rf "$W/nginx-cache/cache" ;;
  esac
}

echo "==> starting peers"
for p in regmirror dist-proxy nginx-cache nginx-static; do start_peer "$p"; done
cat "$W/ca.pem" "$W/rm/certs/ca.pem" >"$W/trust.pem"
cp "$W/rm/certs/ca.pem" "$W/certdir/regmirror.crt"
for p in "${!IP[@]}"; do printf '127.0.0.1 localhost\n%s %s\n' "${IP[$p]}" "$H" >"$W/hosts-$p"; done

# ---------------------------------------------------------------- measurements
RESULTS=$W/results.tsv
: >"$RESULTS"
record() { # record FIGURE PEER VALUE; an empty value is a measurement that failed (said why above)
  [[ -n $3 ]] || { echo "bench: measuring $1 of $2 failed" >&2; exit 1; }
  printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$RESULTS"
}
fail() { echo "bench: $*" >&2; exit 1; }
median() { # median VALUES...: the middle one, or the mean of the middle two
  printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END {if (NR % 2) print a[(NR + 1) / 2]; else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2}'
}
largest() { printf '%s\n' "$@" | sort -g | tail -n 1; }
measure_start=$SECONDS
declare -A SECS=()
lap_t=$SECONDS
lap() { # lap FIGURE: adds the time since the last lap to FIGURE's total (printed at the end)
  SECS[$1]=$((${SECS[$1]:-0} + SECONDS - lap_t))
  lap_t=$SECONDS
}

c() { # c PEER ARGS...: curl at a peer under the shared name
  curl -sS --resolve "$H:443:${IP[$1]}" --cacert "$W/trust.pem" "${@:2}"
}

warm() { # warm PEER: every digest URL once, so caches hold them
  c "$1" -f -o /dev/null -H "Accept: $MT" "$REPO_URL/manifests/$MANIFEST"
  c "$1" -f -o /dev/null "$REPO_URL/blobs/$BIG"
}

h2() { # h2 ARGS...: h2load, failing unless every request finished with a 2xx
  local o
  o=$(h2load "$@" 2>&1) || fail "h2load $*: $o"
  # With -D, requests still in flight at the end count as started, not done.
  grep -q '^requests: .* [1-9][0-9]* succeeded, 0 failed, 0 errored, 0 timeout' <<<"$o" &&
    grep -q '^status codes: [1-9][0-9]* 2xx, 0 3xx, 0 4xx, 0 5xx' <<<"$o" ||
    fail "h2load $*:"$'\n'"$o"
  echo "$o"
}

manifest_rate() { # manifest_rate PEER h1|h2|h2m1 → req/s, 64 keep-alive connections
  # h2 runs 4 streams per connection; h2m1 one, as clients that open a
  # connection per request in flight do (the per-connection cost, over HTTP/2).
  local flag=() streams=1
  case $2 in
    h1) flag=(--h1) ;;
    h2) streams=4 ;;
  esac
  h2 "${flag[@]}" -c 64 -m "$streams" -t 2 -D "$dur" --warm-up-time=1 -H "Accept: $MT" \
    --connect-to="${IP[$1]}:443" "$REPO_URL/manifests/$MANIFEST" |
    sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p'
}

blob_one() { # blob_one PEER → MiB/s of one GET of the big blob over HTTP/1.1 (median of 3)
  # One GET lasts ~0.2 s: a single one swung by ±30% between repetitions for every peer.
  local r i rates=()
  for i in 1 2 3; do
    r=$(c "$1" --http1.1 -f -o /dev/null -w '%{time_total} %{size_download}' "$REPO_URL/blobs/$BIG")
    [[ ${r#* } == "$BIG_SIZE" ]] || fail "$1: short blob ($r)"
    rates+=("$(awk -v t="${r% *}" -v n="$BIG_SIZE" 'BEGIN {printf "%.1f", n / 1048576 / t}')")
  done
  printf '%s\n' "${rates[@]}" | sort -g | sed -n 2p
}

blob_many() { # blob_many PEER → aggregate MiB/s of 64 concurrent GETs of the big blob
  local o secs
  o=$(h2 --h1 -c 64 -n 64 -t 2 --connect-to="${IP[$1]}:443" "$REPO_URL/blobs/$BIG")
  secs=$(sed -n 's/^finished in \([0-9.]*\)\(m\?s\),.*/\1 \2/p' <<<"$o")
  awk -v s="$secs" -v n="$BIG_SIZE" 'BEGIN {split(s, a, " "); t = a[1]; if (a[2] == "ms") t /= 1000;
    printf "%.1f", 64 * n / 1048576 / t}'
}

cold_blob() { # cold_blob PEER → seconds for the first GET of the big blob
  local r
  r=$(c "$1" --http1.1 -f -o /dev/null -w '%{time_total} %{size_download}' "$REPO_URL/blobs/$BIG")
  [[ ${r#* } == "$BIG_SIZE" ]] || fail "$1: short cold blob ($r)"
  echo "${r% *}"
}

tag_head() { # tag_head PEER N → ms of each of N HEADs by tag on one kept-alive connection
  local urls=() i
  # One more than asked: the first carries the TLS handshake and is left out.
  for ((i = 0; i <= $2; i++)); do urls+=(-o /dev/null "$REPO_URL/manifests/1"); done
  c "$1" --http1.1 -f -I -H "Accept: $MT" -w '%{time_total}\n' "${urls[@]}" |
    tail -n +2 | awk '{printf "%.3f\n", $1 * 1000}'
}

many_conns() { # many_conns PEER → seconds for N new TLS connections × 5 manifest GETs
  local o secs
  o=$(h2 --h1 -c "$conns_many" -n $((conns_many * 5)) -t 2 -H "Accept: $MT" \
    --connect-to="${IP[$1]}:443" "$REPO_URL/manifests/$MANIFEST")
  secs=$(sed -n 's/^finished in \([0-9.]*\)\(m\?s\),.*/\1 \2/p' <<<"$o")
  awk -v s="$secs" 'BEGIN {split(s, a, " "); t = a[1]; if (a[2] == "ms") t /= 1000; printf "%.3f", t}'
}

peer_pids() { # peer_pids PEER → its processes (nginx: the master and its workers)
  echo "${PID[$1]}"
  [[ $1 != nginx-* ]] || pgrep -P "${PID[$1]}" || true
}

hwm_kib() { # peak RSS (VmHWM) of a peer's processes, KiB
  local sum=0 p v
  for p in $(peer_pids "$1"); do
    v=$(awk '/^VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    sum=$((sum + ${v:-0}))
  done
  echo "$sum"
}

cpu_ticks() { # cpu_ticks PEER → CPU (user + system, in clock ticks) its processes have used so far
  local sum=0 p
  for p in $(peer_pids "$1"); do
    sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$sum"
}
TICKS=$(getconf CLK_TCK)
cpu_s() { awk -v a="$1" -v b="$2" -v t="$TICKS" 'BEGIN {printf "%.2f", (b - a) / t}'; } # cpu_s BEFORE AFTER → seconds

pull() { # pull PEER OUT: skopeo copy of the image by tag, as a client addressing registry-1.docker.io
  unshare --mount -- sh -c 'mount --bind "$1" /etc/hosts && exec skopeo copy -q --src-cert-dir "$2" "docker://$3/library/bench:1" "dir:$4"' \
    sh "$W/hosts-$1" "$W/certdir" "$H" "$2" >/dev/null
}

timed() { # timed CMD...: seconds the command took
  local t0 t1
  t0=$(date +%s.%N)
  "$@"
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}'
}

upstream_blob_bytes() { # bytes of blob GETs in the upstream's access log so far
  awk '/"GET \/v2\/[^ ]*\/blobs\/sha256:/ { for (i = 1; i < NF; i++) if ($i ~ /^HTTP\/[0-9.]+"$/) { s += $(i + 2); break } } END {print s + 0}' "$W/up/log"
}

concurrent_cold_pulls() { # PEER: records the time of 8 concurrent cold pulls and the upstream bytes
  # (not in a $(...) subshell: it restarts the peer, whose new pid the exit trap must see)
  local before after t0 t1 cpu0 cpu1 i pids=()
  wipe_peer "$1"; start_peer "$1"
  before=$(upstream_blob_bytes)
  cpu0=$(cpu_ticks "$1")
  t0=$(date +%s.%N)
  for i in $(seq 8); do pull "$1" "$W/pull-$1-$i" & pids+=($!); done
  local failed=0
  for i in "${pids[@]}"; do wait "$i" || failed=1; done
  t1=$(date +%s.%N)
  cpu1=$(cpu_ticks "$1")
  after=$(upstream_blob_bytes)
  rm -rf "$W"/pull-*
  if ((failed)); then
    # regmirror must get this right; a peer that fails it (distribution's
    # proxy answers some concurrent cold blob GETs with 500) gets no figure.
    [[ $1 == regmirror ]] && fail "$1: a concurrent cold pull failed"
    echo "bench: $1: a concurrent cold pull failed; no figure for it" >&2
    return 0
  fi
  cold8_b[$1]+=" $(awk -v a="$before" -v b="$after" -v n="$IMAGE_BYTES" 'BEGIN {printf "%.2f", (b - a) / n}')"
  cold8_t[$1]+=" $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')"
  cold8_cpu[$1]+=" $(cpu_s "$cpu0" "$cpu1")"
}

warm_image() { # warm_image PEER: the manifest and every blob of the bench image, so caches hold them all
  local d
  warm "$1"
  for d in "$CONFIG" $(awk 'NR > 1 {print $1}' "$W/image.txt"); do c "$1" -f -o /dev/null "$REPO_URL/blobs/$d"; done
}

herd() { # herd PEER: herd_n clients pull the herd's image from PEER started empty, all at once
  # (not in a $(...) subshell: it restarts the peer, whose new pid the exit trap must see)
  local o wall p99 errors
  wipe_peer "$1"; start_peer "$1"
  o=$(python3 scripts/bench_herd.py --connect "${IP[$1]}" --host "$H" --cafile "$W/trust.pem" \
    --repo library/herd --tag 1 --manifest "$HERD_MANIFEST" --accept "$MT" --clients "$herd_n" \
    --sources "$HERD_SRC" --nsources "$HERD_NSRC") || fail "$1: bench_herd.py failed"
  read -r wall _ p99 errors <<<"$o"
  echo "bench: herd of $herd_n at $1: ${wall} s, p99 ${p99} s, $errors failed" >&2
  herd_err[$1]=$((${herd_err[$1]:-0} + errors))
  if ((errors)); then
    # As with the 8 cold pulls: regmirror must serve every client; a peer that
    # fails some gets no time for this round (its failures are counted).
    [[ $1 == regmirror ]] && fail "$1: $errors of $herd_n herd pulls failed"
    echo "bench: $1: $errors of $herd_n herd pulls failed; no time for this round" >&2
    return 0
  fi
  herd_t[$1]+=" $wall"
  herd_p99[$1]+=" $p99"
}

idle_conns() { # idle_conns PEER h1|h2: records the KiB of RSS each of idle_n idle connections costs PEER
  # (not in a $(...) subshell: it restarts the peer). A fresh process, so memory an
  # earlier figure freed and the allocator kept is not reused and hidden here.
  local o kib open errors before after
  stop "$1"; start_peer "$1"
  c "$1" -f -H "Accept: $MT" -o /dev/null "$REPO_URL/manifests/$MANIFEST" -o /dev/null "$REPO_URL/manifests/$MANIFEST"
  o=$(python3 scripts/bench_idle.py --connect "${IP[$1]}" --host "$H" --cafile "$W/trust.pem" \
    --path "/v2/library/bench/manifests/$MANIFEST" --accept "$MT" --digest "$MANIFEST" --proto "$2" \
    --pids "$(peer_pids "$1" | paste -sd,)" --conns "$idle_n" --settle "$idle_settle" \
    --sources "$IDLE_SRC" --nsources "$IDLE_NSRC") || fail "$1: bench_idle.py failed"
  read -r kib open errors before after <<<"$o"
  echo "bench: $idle_n idle $2 connections at $1: RSS $before → $after KiB, $kib KiB each; $open open, $errors failed" >&2
  if ((errors)); then
    [[ $1 == regmirror ]] && fail "$1: $errors of $idle_n idle $2 connections failed or were closed"
    echo "bench: $1: $errors of $idle_n idle $2 connections failed or were closed; no figure for it" >&2
    return 0
  fi
  record "idle_$2_kib" "$1" "$kib"
}

cached_peers=(regmirror nginx-cache dist-proxy)
# Per peer, the values of this repetition's rounds (space-separated).
declare -A tag_ms=() pull_t=() pull_cpu=() cold_t=() conns_t=() conns_cpu=() cold8_b=() cold8_t=() cold8_cpu=()
declare -A herd_t=() herd_p99=() herd_err=()
record_medians() { # record_medians FIGURE ARRAY [largest]: one value per peer, the median (or largest) of its rounds
  local -n values=$2
  local p
  for p in "${!values[@]}"; do record "$1" "$p" "$(${3:-median} ${values[$p]})"; done
}
all_peers=(direct regmirror nginx-cache nginx-static dist-proxy)
p99_ms() { # p99_ms PATH [ACCEPT] [N] → p99 latency (ms) of N (default lat_n) warm GETs at regmirror, 8 connections
  local log=$W/latency.log hdr=()
  [[ -n ${2:-} ]] && hdr=(-H "Accept: $2")
  rm -f "$log"
  h2 --h1 -c 8 -n "${3:-$lat_n}" -t 1 "${hdr[@]}" --log-file="$log" --connect-to="$RM:443" "$REPO_URL/$1" >/dev/null
  # h2load's log: start time, status, duration in microseconds (tab-separated).
  awk -F'\t' '{print $3}' "$log" | sort -n | awk '{a[NR] = $1} END {printf "%.3f", a[int(NR * 0.99)] / 1000}'
}

churn() { # until $W/churn is removed: evict the big layer (cache gc) and fetch it again from upstream
  while [[ -e $W/churn ]]; do
    "$RM_BIN" cache gc --to "$((IMAGE_BYTES - BIG_SIZE))B" --config "$W/rm/config.toml" >/dev/null 2>&1 || true
    c regmirror -s -o /dev/null "$REPO_URL/blobs/$BIG" || true
  done
}

control_load() { # until $W/control_load is removed: churn's refetch, without the eviction machinery
  # The big layer's file is deleted behind regmirror's back (no `cache gc`
  # process, no index work), so regmirror fetches it again exactly as after
  # an eviction: the same download, hashing, writing and serving. What
  # differs from churn is the eviction itself.
  local file=$W/rm/data/blobs/sha256/${BIG:7:2}/${BIG#sha256:}
  while [[ -e $W/control_load ]]; do
    rm -f "$file"
    c regmirror -s -o /dev/null "$REPO_URL/blobs/$BIG" || true
  done
}

p99_open_ms() { # p99_open_ms PATH [ACCEPT] [SECONDS] → p99 latency (ms) of warm GETs at regmirror, 200/s open loop
  python3 scripts/bench_latency.py --connect "$RM" --host "$H" --cafile "$W/rm/certs/ca.pem" \
    --path "/v2/library/bench/$1" --rate 200 --conns 4 --seconds "${3:-$lat_s}" ${2:+--accept "$2"} |
    awk '{print $2}'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / (b > 0 ? b : 0.001)}'; }

during() { # during LOAD: run the p99 probes while LOAD runs; prints the four p99s
  local flag=$W/$1 pid
  touch "$flag"
  $1 >/dev/null 2>&1 &
  pid=$!
  sleep 1
  echo "$(p99_ms "manifests/$MANIFEST" "$MT") $(p99_ms "blobs/$SMALL" "" "$((lat_n / 40))")" \
    "$(p99_open_ms "manifests/$MANIFEST" "$MT") $(p99_open_ms "blobs/$CONFIG")"
  rm -f "$flag"
  wait "$pid" || true
}

eviction_stalls() { # p99 of warm requests while eviction runs, over the same without eviction
  local idle control evicting
  idle="$(p99_ms "manifests/$MANIFEST" "$MT") $(p99_ms "blobs/$SMALL" "" "$((lat_n / 40))")"
  # Idle is only the informational rows' denominator: half as long.
  idle+=" $(p99_open_ms "manifests/$MANIFEST" "$MT" "$((lat_s / 2))") $(p99_open_ms "blobs/$CONFIG" "" "$((lat_s / 2))")"
  control=$(during control_load)
  evicting=$(during churn)
  c regmirror -f -o /dev/null "$REPO_URL/blobs/$BIG" # leave the big layer cached for what follows
  echo "bench: p99 ms (h2load manifest, h2load 40 MiB layer, open-loop manifest, open-loop config blob):" \
    "idle $idle; the same refetch without eviction $control; evicting $evicting" >&2
  read -r mi bi moi boi <<<"$idle"
  read -r mc bc moc boc <<<"$control"
  read -r me be moe boe <<<"$evicting"
  record p99_manifest_evicting regmirror "$(ratio "$me" "$mi")"
  record p99_blob_evicting regmirror "$(ratio "$be" "$bi")"
  record p99_manifest_evicting_open regmirror "$(ratio "$moe" "$moc")"
  record p99_blob_evicting_open regmirror "$(ratio "$boe" "$boc")"
  record p99_manifest_loaded_open regmirror "$(ratio "$moe" "$moi")"
  record p99_blob_loaded_open regmirror "$(ratio "$boe" "$boi")"
}

rotate() { # rotate REP PEERS...: the peers in an order that shifts each repetition
  local r=$1; shift
  local a=("$@") n=$#
  local i
  for ((i = 0; i < n; i++)); do echo "${a[$(((i + r) % n))]}"; done
}

trim() { # trim REP PEERS...: the first repetition measures every peer; later ones leave out
  # direct and dist-proxy, for figures where no target compares with them (they are
  # the slow ones there, ~1k manifests/s; shown from one repetition).
  local r=$1 p; shift
  for p in "$@"; do
    if ((r == 0)) || [[ $p != direct && $p != dist-proxy ]]; then echo "$p"; fi
  done
}

# ---------------------------------------------------------------- replicas (S3 backend)
# One Garage node (replication_factor 1: what is measured is regmirror's cost
# over the store, not the store's replication) holding the bucket, a regmirror
# replica on it, and curl reading the same object from Garage directly.
GARAGE_BIN=${REGMIRROR_GARAGE_BIN:-/var/cache/regmirror-ci/garage/bin/garage}
GK=GK0123456789abcdef01234567
GS=5ec2e7d0c0ffee5ec2e7d0c0ffee5ec2e7d0c0ffee5ec2e7d0c0ffee5ec2e7d0
start_garage() {
  [[ -x $GARAGE_BIN ]] || fail "no Garage at $GARAGE_BIN (scripts/test.sh installs it; or set REGMIRROR_GARAGE_BIN)"
  mkdir -p "$W/garage"
  cat >"$W/garage/garage.toml" <<EOF
metadata_dir = "$W/garage/meta"
data_dir = "$W/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_secret = "4425f5c26c5e11581d3223904324dcb5b5d5dfb14e5e7f35e38c595424f5f1e6"
rpc_bind_addr = "$GA:3901"
rpc_public_addr = "$GA:3901"
[s3_api]
s3_region = "garage"
api_bind_addr = "$GA:3900"
EOF
  "$GARAGE_BIN" -c "$W/garage/garage.toml" server >"$W/garage/log" 2>&1 &
  PID[garage]=$!
  local g=("$GARAGE_BIN" -c "$W/garage/garage.toml") id=""
  # `node id` reads the key on disk; `status` needs the server to answer.
  for _ in $(seq 100); do "${g[@]}" status >/dev/null 2>&1 && id=$("${g[@]}" node id -q 2>/dev/null) && break; sleep 0.2; done
  [[ -n $id ]] || fail "garage did not start: $(tail -5 "$W/garage/log")"
  "${g[@]}" layout assign -z dc1 -c 10G "${id:0:16}" >/dev/null
  "${g[@]}" layout apply --version 1 >/dev/null
  for _ in $(seq 50); do "${g[@]}" key import --yes -n bench "$GK" "$GS" >/dev/null 2>&1 && break; sleep 0.2; done
  "${g[@]}" bucket create regmirror >/dev/null
  "${g[@]}" bucket allow --read --write --owner regmirror --key "$GK" >/dev/null
}
start_regmirror_s3() {
  mkdir -p "$W/rm-s3"
  sed -e "s|$RM:|$RS:|g" -e "s|dir = \"$W/rm/data\"|dir = \"$W/rm-s3/data\"|" "$W/rm/config.toml" >"$W/rm-s3/config.toml"
  sed -i "s|^max_size = \"20GiB\"|max_size = \"20GiB\"\nbackend = \"s3\"\nbucket = \"regmirror\"\nendpoint = \"http://$GA:3900\"\nregion = \"garage\"\nprefix = \"bench/\"|" \
    "$W/rm-s3/config.toml"
  AWS_ACCESS_KEY_ID=$GK AWS_SECRET_ACCESS_KEY=$GS "$RM_BIN" serve --config "$W/rm-s3/config.toml" >>"$W/rm-s3/log" 2>&1 &
  PID[regmirror-s3]=$!
  for _ in $(seq 100); do
    c regmirror-s3 -s -o /dev/null --max-time 1 "https://$H/v2/" 2>/dev/null && return 0
    sleep 0.1
  done
  fail "regmirror-s3 did not start (log: $(tail -5 "$W/rm-s3/log"))"
}
garage_blob() { # garage_blob [relay|relay-tls] → MiB/s of one GET of the big blob's object
  # straight from Garage, or through nginx-relay (its TLS port: the bench certificate names
  # another host, hence -k), signed for Garage's address either way
  local r via=() scheme=http
  case ${1:-} in
    relay) via=(--connect-to "$GA:3900:$NR:3900") ;;
    relay-tls) via=(-k --connect-to "$GA:3900:$NR:3943") scheme=https ;;
  esac
  r=$(curl -sS -f "${via[@]}" --aws-sigv4 "aws:amz:garage:s3" --user "$GK:$GS" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
    -o /dev/null -w '%{time_total} %{size_download}' "$scheme://$GA:3900/regmirror/bench/blobs/sha256/${BIG#sha256:}")
  [[ ${r#* } == "$BIG_SIZE" ]] || fail "garage ${1:-}: short object ($r)"
  awk -v t="${r% *}" -v n="$BIG_SIZE" 'BEGIN {printf "%.1f", n / 1048576 / t}'
}
s3_cold_local() { # s3_cold_local tls|plain: appends to S3_RATES the MiB/s of one GET through
  # regmirror-s3 started with an empty local read cache, over TLS (transparent mode) or its
  # plain listener (mirror mode, as the Kubernetes example's nodes pull). Not in a $(…)
  # subshell: the restarted process must stay in PID, or it would outlive the run.
  local r
  stop regmirror-s3
  rm -rf "$W/rm-s3/data"
  start_regmirror_s3
  if [[ $1 == tls ]]; then
    r=$(c regmirror-s3 --http1.1 -f -o /dev/null -w '%{time_total} %{size_download}' "$REPO_URL/blobs/$BIG")
  else
    r=$(curl -sS -f -o /dev/null -w '%{time_total} %{size_download}' "http://$RS:5000/v2/dockerhub/library/bench/blobs/$BIG")
  fi
  [[ ${r#* } == "$BIG_SIZE" ]] || fail "regmirror-s3: short blob ($r)"
  S3_RATES+=("$(awk -v t="${r% *}" -v n="$BIG_SIZE" 'BEGIN {printf "%.1f", n / 1048576 / t}')")
  # The read is copied into the local read cache (as it is served, or after, when the local
  # disk fell behind): let that finish before anything else is measured.
  s3_local_copy || fail "regmirror-s3: no local copy of the blob it served (log: $(tail -5 "$W/rm-s3/log"))"
}
s3_local_copy() { # s3_local_copy: true once regmirror-s3's local read cache holds the big blob
  for _ in $(seq 100); do find "$W/rm-s3/data/blobs" -name "${BIG#sha256:}" | grep -q . && return 0; sleep 0.1; done
  return 1
}
replica_figures() { # replica_figures REP: cold-local replica vs Garage, then local hits vs the disk backend
  local round proto g=() n=() l=() d=()
  for proto in plain tls; do
    g=() n=() S3_RATES=()
    for round in 0 1 2; do
      if ((($1 + round) % 2 == 0)); then
        g+=("$(garage_blob)"); s3_cold_local "$proto"
      else
        s3_cold_local "$proto"; g+=("$(garage_blob)")
      fi
      if [[ $proto == tls ]]; then n+=("$(garage_blob relay-tls)"); else n+=("$(garage_blob relay)"); fi
    done
    record "s3_cold_local_${proto}_mibs" garage "$(median "${g[@]}")"
    record "s3_cold_local_${proto}_mibs" regmirror "$(median "${S3_RATES[@]}")"
    record "s3_cold_local_${proto}_mibs" nginx-relay "$(median "${n[@]}")"
  done
  # The last cold read left its local copy (s3_cold_local waited for it): these hits are local.
  for round in 0 1; do
    if ((($1 + round) % 2 == 0)); then
      l+=("$(blob_one regmirror-s3)"); d+=("$(blob_one regmirror)")
    else
      d+=("$(blob_one regmirror)"); l+=("$(blob_one regmirror-s3)")
    fi
  done
  record s3_local_mibs regmirror "$(median "${l[@]}")"
  record s3_local_mibs regmirror-disk "$(median "${d[@]}")"
}
if want s3; then
  echo "==> starting Garage and regmirror-s3"
  start_garage
  start_nginx nginx-relay "$NR"
  start_regmirror_s3
  # The first pull through it puts the image in the bucket.
  warm regmirror-s3
fi

# ---------------------------------------------------------------- push (private registry)
# regmirror with a [[local]] namespace beside distribution with htpasswd auth
# (what teams run as their private registry), both addressed as https://push.bench
# with the same bcrypt login. Each figure starts the peer empty.
PUSH_HOST=push.bench PUSH_RM=127.0.9.6 PUSH_DA=127.0.9.7
declare -A PUSH_IP=([regmirror]=$PUSH_RM [dist-auth]=$PUSH_DA)
htpasswd -bBc -C 5 "$W/htpasswd" bench bench-pw 2>/dev/null
push_start() { # push_start PEER: starts the private registry PEER with an empty store
  case "$1" in
    regmirror)
      rm -rf "$W/rmp/data" && mkdir -p "$W/rmp"
      cat >"$W/rmp/config.toml" <<EOF
[server]
https = "$PUSH_RM:443"
http = "$PUSH_RM:5000"
name = "$PUSH_HOST"

[ca]
dir = "$W/rmp/certs"

[cache]
dir = "$W/rmp/data"
max_size = "20GiB"

[[upstream]]
name = "docker.io"
hosts = ["$H"]
url = "https://upstream.bench"
namespace = "dockerhub"
ca_file = "$W/ca.pem"

[[local]]
namespace = "private"
htpasswd = "$W/htpasswd"

[limits]
max_connections_per_client = 4096
EOF
      "$RM_BIN" serve --config "$W/rmp/config.toml" >>"$W/rmp/log" 2>&1 &
      PID[push-regmirror]=$!
      for _ in $(seq 100); do [[ -f $W/rmp/certs/ca.pem ]] && break; sleep 0.1; done
      cp "$W/rmp/certs/ca.pem" "$W/certdir/regmirror-push.crt"
      for _ in $(seq 100); do
        curl -s -o /dev/null --max-time 1 --resolve "$PUSH_HOST:443:$PUSH_RM" --cacert "$W/rmp/certs/ca.pem" \
          "https://$PUSH_HOST/v2/" && return 0
        sleep 0.1
      done
      fail "the push instance of regmirror did not start (log: $(tail -5 "$W/rmp/log"))"
      ;;
    dist-auth)
      rm -rf "$W/da/store"
      start_registry push-dist-auth "$PUSH_DA" "$W/da" auth
      ;;
  esac
}
push_stop() { stop "push-$1"; rm -rf "$W/rmp/data" "$W/da/store"; }
for p in regmirror dist-auth; do printf '127.0.0.1 localhost\n%s %s\n' "${PUSH_IP[$p]}" "$PUSH_HOST" >"$W/hosts-push-$p"; done

skopeo_at() { # skopeo_at PEER ARGS...: skopeo copy as a client resolving push.bench to PEER,
  # with an empty blob-info cache (else skopeo mounts blobs it saw pushed in an earlier round)
  unshare --mount -- sh -c 'mount --bind "$1" /etc/hosts && mkdir -p /var/lib/containers/cache &&
      mount -t tmpfs tmpfs /var/lib/containers/cache && shift && exec skopeo copy -q "$@"' \
    sh "$W/hosts-push-$1" "${@:2}" >/dev/null
}
push_image() { # push_image PEER REPO: the bench image (oci layout) to PEER's private/REPO:1
  skopeo_at "$1" --dest-cert-dir "$W/certdir" --dest-creds bench:bench-pw \
    "oci:$W/oci:1" "docker://$PUSH_HOST/private/$2:1"
}
pull_pushed() { # pull_pushed PEER OUT: the pushed image back, by tag
  skopeo_at "$1" --src-cert-dir "$W/certdir" --src-creds bench:bench-pw \
    "docker://$PUSH_HOST/private/bench:1" "dir:$2"
}
push_hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/${PID[push-$1]}/status"; }

push_figures() { # push_figures REP: one push, its pull back, and 8 concurrent pushes, per peer
  local round p i t0 t1 failed pids
  local -A push_t=() pullb_t=()
  # Three rounds, peers taking turns: a push's time is mostly skopeo's and the disk's.
  for round in 0 1 2; do
    for p in $(rotate "$(($1 + round))" regmirror dist-auth); do
      push_start "$p"
      push_t[$p]+=" $(timed push_image "$p" bench)"
      pullb_t[$p]+=" $(timed pull_pushed "$p" "$W/pull-back")"
      cmp -s "$W/pull-back/manifest.json" "$W/oci/blobs/sha256/${MANIFEST#sha256:}" ||
        fail "$p: the manifest pulled back is not the one pushed"
      rm -rf "$W/pull-back"
      push_stop "$p"
    done
  done
  record_medians push_s push_t
  record_medians push_pull_s pullb_t
  for p in $(rotate "$1" regmirror dist-auth); do
    push_start "$p"
    pids=() failed=0
    t0=$(date +%s.%N)
    for i in $(seq 8); do push_image "$p" "bench-$i" & pids+=($!); done
    for i in "${pids[@]}"; do wait "$i" || failed=1; done
    t1=$(date +%s.%N)
    ((failed)) && fail "$p: one of 8 concurrent pushes failed"
    record push8_s "$p" "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')"
    record push8_rss_mib "$p" "$(($(push_hwm_kib "$p") / 1024))"
    push_stop "$p"
  done
}

if ((hold)); then
  for p in "${!IP[@]}"; do [[ $p == nginx-relay ]] || warm "$p"; done
  cat <<EOF
==> holding: every peer is up and warm (Ctrl-C stops them)
  peers:     $(for p in "${!IP[@]}"; do printf '%s=%s ' "$p" "${IP[$p]}"; done)
  regmirror: pid ${PID[regmirror]}, log $W/rm/log; restart: $RM_BIN serve --config $W/rm/config.toml
  manifest:  h2load --h1 -c 64 -D 4 -H 'Accept: $MT' --connect-to=$RM:443 $REPO_URL/manifests/$MANIFEST
  tag HEAD:  curl -sSI --resolve $H:443:$RM --cacert $W/trust.pem -H 'Accept: $MT' $REPO_URL/manifests/1
  big blob:  $REPO_URL/blobs/$BIG ($BIG_SIZE bytes); cold: rm -rf $W/rm/data and restart
EOF
  # In the background and waited for, so Ctrl-C (or a TERM) stops the
  # peers at once rather than after the sleep.
  while true; do sleep 3600 & wait $!; done
fi

for ((rep = 0; rep < reps; rep++)); do
  echo "==> repetition $((rep + 1))/$reps"
  # Cold first: each caching peer restarts empty, so its peak RSS below
  # covers a cold pull and then everything warm.
  # Three rounds for regmirror and direct (the target's pair): one cold GET
  # lasts ~0.5 s and swung by ±30% between repetitions.
  if want cold || want rss; then
    cold_t=()
    for round in 0 1 2; do
      peers=(direct regmirror); ((round)) || peers=(direct "${cached_peers[@]}")
      for p in $(rotate "$((rep + round))" "${peers[@]}"); do
        [[ $p == direct ]] || { wipe_peer "$p"; start_peer "$p"; }
        cold_t[$p]+=" $(cold_blob "$p")"
      done
    done
    record_medians cold_blob_s cold_t
  fi
  for p in "${all_peers[@]}"; do warm "$p"; done
  lap cold
  if want manifest; then
    for p in $(rotate "$rep" $(trim "$rep" "${all_peers[@]}")); do record manifest_h1 "$p" "$(manifest_rate "$p" h1)"; done
    for p in $(rotate "$rep" $(trim "$rep" "${all_peers[@]}")); do record manifest_h2 "$p" "$(manifest_rate "$p" h2)"; done
    lap manifest
  fi
  if want h2m1; then
    for p in $(rotate "$rep" $(trim "$rep" "${all_peers[@]}")); do record manifest_h2m1 "$p" "$(manifest_rate "$p" h2m1)"; done
    lap h2m1
  fi
  if want blob1; then
    for p in $(rotate "$rep" $(trim "$rep" "${all_peers[@]}")); do record blob1_mibs "$p" "$(blob_one "$p")"; done
    lap blob1
  fi
  # Beside blob1, while the disk backend's regmirror holds the bench image.
  if want s3; then
    replica_figures "$rep"
    lap s3
  fi
  # 64 × the big blob: only where a target is (distribution takes minutes).
  if want blob64 || want rss; then
    for p in $(rotate "$rep" regmirror nginx-cache nginx-static); do record blob64_mibs "$p" "$(blob_many "$p")"; done
    lap blob64
  fi
  # Tag HEAD and whole-image pulls: the peers take turns in three rounds, so a
  # drift in the machine's speed (or upstream's) falls on all of them alike.
  if want tag; then
    tag_ms=()
    for round in 0 1 2; do
      for p in $(rotate "$((rep + round))" direct "${cached_peers[@]}"); do
        tag_ms[$p]+=" $(tag_head "$p" "$((head_n / 3))")"
      done
    done
    record_medians tag_head_ms tag_ms
    lap tag
  fi
  # Connections: three rounds for regmirror and nginx-cache (the target's pair),
  # each also timing the CPU the server spent.
  if want conns; then
    conns_t=() conns_cpu=()
    for round in 0 1 2; do
      peers=(regmirror nginx-cache); ((round)) || peers=($(trim "$rep" "${all_peers[@]}"))
      for p in $(rotate "$((rep + round))" "${peers[@]}"); do
        cpu0=$(cpu_ticks "$p")
        conns_t[$p]+=" $(many_conns "$p")"
        conns_cpu[$p]+=" $(cpu_s "$cpu0" "$(cpu_ticks "$p")")"
      done
    done
    record_medians conns_s conns_t
    record_medians conns_cpu_s conns_cpu
    lap conns
  fi
  if want rss; then
    for p in "${cached_peers[@]}"; do record rss_mib "$p" "$(($(hwm_kib "$p") / 1024))"; done
    record rss_mib nginx-static "$(($(hwm_kib nginx-static) / 1024))"
  fi
  if want pull; then
    pull_t=() pull_cpu=()
    for p in direct $(trim "$rep" "${cached_peers[@]}"); do
      pull "$p" "$W/pull-warm-$p" # warm-up (tag, manifests, blobs)
      rm -rf "$W/pull-warm-$p"
    done
    # Five rounds for regmirror and direct (the target's pair), three for the
    # others: a pull's time is skopeo's CPU time, which swings by ±15%.
    for round in 0 1 2 3 4; do
      peers=(direct regmirror); ((round > 2)) || peers=(direct $(trim "$rep" "${cached_peers[@]}"))
      for p in $(rotate "$((rep + round))" "${peers[@]}"); do
        cpu0=$(cpu_ticks "$p")
        pull_t[$p]+=" $(timed pull "$p" "$W/pull-warm-$p")"
        pull_cpu[$p]+=" $(cpu_s "$cpu0" "$(cpu_ticks "$p")")"
        rm -rf "$W/pull-warm-$p"
      done
    done
    record_medians pull_warm_s pull_t
    record_medians pull_cpu_s pull_cpu
    lap pull
  fi
  # Two rounds for regmirror and nginx-cache (the target's pair).
  if want cold8; then
    cold8_b=() cold8_t=() cold8_cpu=()
    for round in 0 1; do
      peers=(regmirror nginx-cache); ((round)) || peers=($(trim "$rep" "${cached_peers[@]}"))
      for p in $(rotate "$((rep + round))" "${peers[@]}"); do concurrent_cold_pulls "$p"; done
    done
    record_medians cold8_upstream_bytes cold8_b largest
    record_medians cold8_s cold8_t
    record_medians cold8_cpu_s cold8_cpu
    lap cold8
  fi
  if want evict; then
    eviction_stalls
    lap evict
  fi
  # Idle connections and the herd restart their peers: after the figures that
  # read peak RSS and rely on warm caches.
  if want idle; then
    for proto in h1 h2; do
      for p in $(rotate "$rep" regmirror nginx-cache); do idle_conns "$p" "$proto"; done
    done
    lap idle
  fi
  # Two rounds, taking turns; each starts the peer empty.
  if want herd; then
    herd_t=() herd_p99=() herd_err=()
    for round in 0 1; do
      for p in $(rotate "$((rep + round))" regmirror nginx-cache); do herd "$p"; done
    done
    record_medians herd_s herd_t
    record_medians herd_p99_s herd_p99
    record_medians herd_errors herd_err
    # The herd left these caches holding only its image: the next repetition's
    # warm figures need the bench image back.
    if ((rep + 1 < reps)); then for p in regmirror nginx-cache; do warm_image "$p"; done; fi
    lap herd
  fi
  if want push; then
    push_figures "$rep"
    lap push
  fi
done
echo "bench: seconds per figure, all repetitions: $(for f in "${!SECS[@]}"; do printf '%s %s, ' "$f" "${SECS[$f]}"; done)" \
  "measuring $((SECONDS - measure_start)) s, the whole run $SECONDS s" >&2

# ---------------------------------------------------------------- report
machine="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), $(uname -r)"
versions="regmirror $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo '+dirty'), \
$("$NGINX" -v 2>&1 | sed 's/.*: //'), docker-registry $(dpkg-query -W -f '${Version}' docker-registry), \
h2load $(dpkg-query -W -f '${Version}' nghttp2-client), skopeo $(dpkg-query -W -f '${Version}' skopeo)"
python3 scripts/bench_report.py "$RESULTS" \
  --command "$command_line" --reps "$reps" --big-mib "$big_mib" --conns "$conns_many" \
  --herd "$herd_n" --herd-mib "${HERD_MIB:-0}" \
  --idle "$idle_n" --idle-settle "$idle_settle" \
  --image-mib "$(awk -v n="$IMAGE_BYTES" 'BEGIN {printf "%.0f", n / 1048576}')" \
  --machine "$machine" --versions "$versions" ${out:+--out "$out"}
