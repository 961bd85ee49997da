#!/usr/bin/env bash
# Runs every regmirror test: installs the real clients and the real upstream
# registry the end-to-end tests drive, then cargo's tests, fmt and clippy,
# then `scripts/bench.sh --quick` (checks the benchmark still runs; its
# figures are not asserted).
# Needs root (the e2e tests use private mount namespaces and port 443 on
# loopback addresses). A missing tool is an error, never a skipped test.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(docker-registry skopeo podman buildah containerd docker.io systemd nghttp2-client nginx-light curl openssl python3 chromium tinyproxy)
tools=(docker-registry skopeo podman buildah containerd ctr dockerd docker unshare systemd-analyze h2load curl openssl python3 chromium tinyproxy)

missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "scripts/test.sh: missing packages ${missing[*]} and not root to install them" >&2
    exit 1
  fi
  echo "==> installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
for t in "${tools[@]}"; do
  command -v "$t" >/dev/null || { echo "scripts/test.sh: $t not found after install" >&2; exit 1; }
done
if [[ $(id -u) -ne 0 ]]; then
  echo "scripts/test.sh: the end-to-end tests need root (unshare --mount, port 443)" >&2
  exit 1
fi

# Garage, the S3 store the replica tests run on (a real 3-node cluster on
# loopback): built from crates.io once (~15 min on 2 cores) into a directory
# later runs on this machine reuse.
garage_version=2.5.0
garage_root=/var/cache/regmirror-ci/garage
if [[ $("$garage_root/bin/garage" --version 2>/dev/null | awk '{print $2}') != "cargo:$garage_version" ]]; then
  echo "==> cargo install garage $garage_version (once per machine)"
  cargo install --locked --quiet garage --version "$garage_version" --root "$garage_root"
fi
export REGMIRROR_GARAGE_BIN="$garage_root/bin/garage"

# tests/deploy.rs validates deploy/kubernetes/ with kubernetes-validate
# (PyPI, pinned): it bundles the Kubernetes schemas, so the test runs offline.
kubernetes_validate=1.37.0
if [[ $(python3 -m pip show kubernetes-validate 2>/dev/null | sed -n 's/^Version: //p') != "$kubernetes_validate" ]]; then
  echo "==> pip install kubernetes-validate==$kubernetes_validate"
  python3 -m pip install -q --root-user-action=ignore "kubernetes-validate==$kubernetes_validate"
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
# The static binary tests/deploy.rs builds the container image from (the
# Dockerfile's command). Without fat LTO and with 16 codegen units: that test
# only runs `check` and `ca export` in the image, which the release profile's
# whole-program optimisation does not change, and it would cost minutes of
# CI time on 2 cores. Build an image to ship with the Dockerfile's command.
echo "==> static binary for the image test"
RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
  cargo build --locked --release --target x86_64-unknown-linux-gnu
echo "==> cargo test"
cargo test --locked --all-targets -- --test-threads="${TEST_THREADS:-4}"
echo "==> scripts/bench.sh --quick"
scripts/bench.sh --quick
