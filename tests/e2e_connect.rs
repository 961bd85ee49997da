//! Clients through regmirror's CONNECT proxy listener: `HTTPS_PROXY` at
//! regmirror and its CA trusted, and no registry name in the client's
//! /etc/hosts at all (they do not even resolve there), so nothing but the
//! CONNECT target can have picked the upstream.

mod common;

use common::daemons::{Containerd, Dockerd, DockerdOpts};
use common::images::Format;
use common::matrix::{assert_one_platform, assert_pulled, assert_registry_error, Stack};
use common::UpstreamEnvOpts;

fn stack() -> Stack {
    Stack::start_with(UpstreamEnvOpts::default(), |c| c.with_connect())
}

/// The request log and `/metrics` say the requests came through the
/// CONNECT listener.
#[track_caller]
fn assert_came_through_connect(s: &Stack) {
    let metrics = s.rm.metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("regmirror_listener_requests_total{listener=\"connect\"}")),
        "no requests counted under listener=\"connect\":\n{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("regmirror_connect_requests_total{outcome=\"intercepted\"}")),
        "no intercepted CONNECT counted:\n{metrics}"
    );
    assert!(
        s.rm.log().lines().any(|l| l.contains("listener=connect")),
        "no request log line says listener=connect"
    );
}

/// skopeo with `HTTPS_PROXY`: `docker.io/library/x`, `ghcr.io/org/x`,
/// `quay.io/org/x` (cold: every blob once), then another skopeo warm (one
/// HEAD upstream), and `--override-arch arm64` of an index.
#[test]
fn skopeo_connect() {
    let s = stack();
    let sk = s.connect_client();
    let other = s.connect_client();
    s.cold_then_warm_each(
        &[
            ("docker.io/library/cs-full:1", "library/cs-full", Format::Oci),
            ("ghcr.io/org/cs-gh:1", "org/cs-gh", Format::Docker),
            ("quay.io/org/cs-quay:1", "org/cs-quay", Format::Oci),
        ],
        |n| sk.skopeo_copy(n, None),
        |n| other.skopeo_copy(n, None),
    );
    let idx = s.index("org/cs-multi", Format::Oci);
    let name = "ghcr.io/org/cs-multi:1";
    let mark = s.up().mark();
    let arm = idx.platform("arm64");
    assert_pulled(name, &sk.skopeo_copy(name, Some("arm64")), &arm.manifest_digest);
    assert_one_platform(s.up(), mark, arm, idx.platform("amd64"), name);
    assert_registry_error(&sk.skopeo_copy("quay.io/org/cs-quay:nope", None).0, "manifest unknown");
    assert_came_through_connect(&s);
}

/// podman with `HTTPS_PROXY`: the three registries cold, skopeo warm, and
/// `--arch arm64` of an index fetching nothing of amd64.
#[test]
fn podman_connect() {
    let s = stack();
    let pm = s.connect_client();
    let other = s.connect_client();
    s.cold_then_warm_each(
        &[
            ("docker.io/library/cp-full:1", "library/cp-full", Format::Docker),
            ("ghcr.io/org/cp-gh:1", "org/cp-gh", Format::Oci),
            ("quay.io/org/cp-quay:1", "org/cp-quay", Format::Docker),
        ],
        |n| pm.podman_pull(n, None),
        |n| other.skopeo_copy(n, None),
    );
    let idx = s.index("org/cp-multi", Format::Oci);
    let name = "quay.io/org/cp-multi:1";
    let mark = s.up().mark();
    let (out, _) = pm.podman_pull(name, Some("arm64"));
    out.assert_ok();
    assert_eq!(pm.podman_inspect(name, "{{.Architecture}}").as_deref(), Some("arm64"));
    assert_one_platform(s.up(), mark, idx.platform("arm64"), idx.platform("amd64"), name);
    assert_registry_error(
        &pm.podman_pull("docker.io/library/cp-full:nope", None).0,
        "manifest unknown",
    );
    assert_came_through_connect(&s);
}

/// dockerd with the environment of the systemd drop-in `regmirror setup
/// docker --connect` writes (`HTTPS_PROXY`, `NO_PROXY`) and the CA file it
/// writes as its roots: `docker pull` of the three registries cold, skopeo warm, and
/// `--platform linux/arm64` of an index.
#[test]
fn docker_connect() {
    let s = stack();
    let etc = common::tempdir("docker-etc-");
    let (env, ca) = s.connect_setup("docker");
    let dockerd = Dockerd::start(DockerdOpts {
        hosts: "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
        etc_docker: etc.path(),
        ssl_cert_file: Some(&ca),
        proxy_env: &env,
    });
    let other = s.connect_client();
    s.cold_then_warm_each(
        &[
            ("docker.io/library/cd-full:1", "library/cd-full", Format::Docker),
            ("ghcr.io/org/cd-gh:1", "org/cd-gh", Format::Oci),
            ("quay.io/org/cd-quay:1", "org/cd-quay", Format::Docker),
        ],
        |n| dockerd.pull(n, None),
        |n| other.skopeo_copy(n, None),
    );
    let idx = s.index("library/cd-multi", Format::Docker);
    let name = "docker.io/library/cd-multi:1";
    let mark = s.up().mark();
    assert_pulled(name, &dockerd.pull(name, Some("linux/arm64")), &idx.index_digest);
    assert_eq!(dockerd.inspect(name, "{{.Architecture}}").as_deref(), Some("arm64"));
    assert_one_platform(s.up(), mark, idx.platform("arm64"), idx.platform("amd64"), name);
    assert_registry_error(&dockerd.pull("ghcr.io/org/cd-gh:nope", None).0, "manifest unknown");
    assert_came_through_connect(&s);
}

/// `ctr images pull` with the environment of `regmirror setup containerd
/// --connect`'s drop-in (ctr fetches in its own process) and its CA file:
/// the three registries cold, skopeo warm, and `--platform linux/arm64` of
/// an index.
#[test]
fn containerd_connect() {
    let s = stack();
    let ctrd = Containerd::start();
    let (env, ca) = s.connect_setup("containerd");
    let sb = common::clients::Sandbox::behind_proxy(&env, &ca);
    let other = s.connect_client();
    s.cold_then_warm_each(
        &[
            ("docker.io/library/cc-full:1", "library/cc-full", Format::Oci),
            ("ghcr.io/org/cc-gh:1", "org/cc-gh", Format::Docker),
            ("quay.io/org/cc-quay:1", "org/cc-quay", Format::Oci),
        ],
        |n| ctrd.pull(&sb, n, None, None),
        |n| other.skopeo_copy(n, None),
    );
    let idx = s.index("org/cc-multi", Format::Oci);
    let name = "ghcr.io/org/cc-multi:1";
    let mark = s.up().mark();
    assert_pulled(
        name,
        &ctrd.pull(&sb, name, Some("linux/arm64"), None),
        &idx.index_digest,
    );
    assert_one_platform(s.up(), mark, idx.platform("arm64"), idx.platform("amd64"), name);
    // A missing tag: ctr resolves with HEAD (no error body), so it prints
    // its own "not found", never a TLS or proxy error.
    let out = ctrd.ctr(&sb, &["images", "pull", "quay.io/org/cc-quay:nope"]);
    assert!(!out.success());
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        all.contains("not found") && !all.contains("x509") && !all.contains("proxy"),
        "{all}"
    );
    assert_came_through_connect(&s);
}
