//! docker (a real dockerd, pulling with `docker pull`) through regmirror in
//! every mode: transparent (private /etc/hosts from `regmirror setup hosts`,
//! regmirror's CA as the daemon's roots), `registry-mirrors` with Docker Hub
//! unreachable, and explicit prefix (`PROXY:5000/dockerhub/…` with
//! `insecure-registries`, and over TLS on regmirror's own name), with the
//! daemon.json that `regmirror setup docker` writes.
//!
//! Two dockerds, one per #[test], each running its cases in sequence (the
//! two tests run in parallel). Why two and not one reloaded daemon: the
//! modes need contradicting /etc/hosts for the same names — transparent
//! mode points registry-1.docker.io at regmirror, `registry-mirrors` must
//! have it dead so that docker's silent fallback to Docker Hub cannot hide
//! a broken mirror. The hosts file is bind-mounted into the daemon's mount
//! namespace and Go's resolver re-reads it only on its own schedule, so
//! swapping it under a running daemon would make the tests depend on
//! timing; a second daemon costs a few seconds and no flakiness.

mod common;

use common::daemons::{Dockerd, DockerdOpts};
use common::images::Format;
use common::matrix::{
    assert_cold, assert_one_platform, assert_pulled, assert_registry_error, assert_warm, cold_then_warm, summarize,
    Stack,
};

/// Transparent mode: the daemon's /etc/hosts is `regmirror setup hosts`'s
/// output, its roots are regmirror's CA (`SSL_CERT_FILE`, like a CA
/// installed in the system store), image names are unchanged.
#[test]
fn docker_transparent() {
    let s = Stack::start();
    let etc = common::tempdir("docker-etc-");
    let dockerd = Dockerd::start(DockerdOpts {
        hosts: &s.transparent_hosts(),
        etc_docker: etc.path(),
        ssl_cert_file: Some(&s.rm.ca_pem),
        proxy_env: &[],
    });
    let other = s.client();

    // Cold docker pull; then skopeo, warm.
    let img = s.image("library/dt-full", Format::Docker);
    let name = "docker.io/library/dt-full:1";
    let mark = s.up().mark();
    assert_pulled(name, &dockerd.pull(name, None), &img.manifest_digest);
    let cold = assert_cold(s.up(), mark, &img, name);
    eprintln!("docker cold pull of {name}, upstream: {}", summarize(&cold));
    let mark = s.up().mark();
    assert_pulled(name, &other.skopeo_copy(name, None), &img.manifest_digest);
    assert_warm(s.up(), mark, "library/dt-full", name);

    // Unqualified `x:1`: skopeo fills the cache, docker pulls warm.
    let img = s.image("library/dt-short", Format::Docker);
    assert_pulled(
        "skopeo",
        &other.skopeo_copy("docker.io/library/dt-short:1", None),
        &img.manifest_digest,
    );
    let mark = s.up().mark();
    assert_pulled("dt-short:1", &dockerd.pull("dt-short:1", None), &img.manifest_digest);
    let warm = assert_warm(s.up(), mark, "library/dt-short", "dt-short:1");
    eprintln!("docker warm pull of dt-short:1, upstream: {}", summarize(&warm));

    // `org/x:1`, ghcr.io and quay.io: docker cold, podman / skopeo warm.
    for (name, repo, format) in [
        ("dorg/dt-org:1", "dorg/dt-org", Format::Docker),
        ("ghcr.io/org/dt-gh:1", "org/dt-gh", Format::Oci),
        ("quay.io/org/dt-quay:1", "org/dt-quay", Format::Docker),
    ] {
        let img = s.image(repo, format);
        cold_then_warm(
            s.up(),
            name,
            repo,
            &img,
            || dockerd.pull(name, None),
            || other.podman_pull(name, None),
        );
    }

    // One platform of an index.
    let idx = s.index("library/dt-multi", Format::Docker);
    let name = "docker.io/library/dt-multi:1";
    let mark = s.up().mark();
    assert_pulled(name, &dockerd.pull(name, Some("linux/arm64")), &idx.index_digest);
    assert_eq!(dockerd.inspect(name, "{{.Architecture}}").as_deref(), Some("arm64"));
    assert_one_platform(s.up(), mark, idx.platform("arm64"), idx.platform("amd64"), name);
    let mark = s.up().mark();
    assert_pulled(
        name,
        &other.skopeo_copy(name, Some("arm64")),
        &idx.platform("arm64").manifest_digest,
    );
    assert_warm(s.up(), mark, "library/dt-multi", name);

    // A tag that does not exist: the registry's OCI error reaches the user.
    assert_registry_error(
        &dockerd.pull("docker.io/library/dt-full:nope", None).0,
        "manifest unknown",
    );
    assert_registry_error(&dockerd.pull("quay.io/org/dt-quay:nope", None).0, "manifest unknown");
}

/// `registry-mirrors` and explicit prefix, from `regmirror setup docker
/// --proxy PROXY` (daemon.json with `registry-mirrors` and
/// `insecure-registries`). Every Docker Hub name resolves to a dead address;
/// regmirror's own name resolves to the proxy and is trusted through
/// `/etc/docker/certs.d/<name>/ca.crt`.
#[test]
fn docker_registry_mirrors_and_explicit_prefix() {
    let s = Stack::start();
    let daemon_json = s.setup_file("docker", &["--proxy", &s.proxy_ip().to_string()], "daemon.json");
    let etc_docker = daemon_json.parent().expect("etc/docker").to_path_buf();
    let certs_d = etc_docker.join("certs.d").join(s.name());
    std::fs::create_dir_all(&certs_d).expect("certs.d");
    std::fs::copy(&s.rm.ca_pem, certs_d.join("ca.crt")).expect("copy ca");
    let dockerd = Dockerd::start(DockerdOpts {
        hosts: &s.dead_registries_hosts(true),
        etc_docker: &etc_docker,
        ssl_cert_file: None,
        proxy_env: &[],
    });
    let other = s.client();

    // `docker pull x:1` via the mirror; skopeo warm.
    let img = s.image("library/dm-short", Format::Docker);
    let mark = s.up().mark();
    assert_pulled("dm-short:1", &dockerd.pull("dm-short:1", None), &img.manifest_digest);
    let cold = assert_cold(s.up(), mark, &img, "dm-short:1");
    eprintln!(
        "docker (registry-mirrors) cold pull of dm-short:1, upstream: {}",
        summarize(&cold)
    );
    let mark = s.up().mark();
    assert_pulled(
        "skopeo",
        &other.skopeo_copy("docker.io/library/dm-short:1", None),
        &img.manifest_digest,
    );
    assert_warm(s.up(), mark, "library/dm-short", "dm-short:1");

    // `docker pull org/x:1` via the mirror, warm after skopeo.
    let img = s.image("dorg/dm-org", Format::Oci);
    assert_pulled(
        "skopeo",
        &other.skopeo_copy("docker.io/dorg/dm-org:1", None),
        &img.manifest_digest,
    );
    let mark = s.up().mark();
    assert_pulled(
        "dorg/dm-org:1",
        &dockerd.pull("dorg/dm-org:1", None),
        &img.manifest_digest,
    );
    let warm = assert_warm(s.up(), mark, "dorg/dm-org", "dorg/dm-org:1");
    eprintln!(
        "docker (registry-mirrors) warm pull of dorg/dm-org:1, upstream: {}",
        summarize(&warm)
    );

    // One platform of an index via the mirror.
    let idx = s.index("library/dm-multi", Format::Oci);
    let mark = s.up().mark();
    assert_pulled(
        "dm-multi:1",
        &dockerd.pull("dm-multi:1", Some("linux/arm64")),
        &idx.index_digest,
    );
    assert_one_platform(s.up(), mark, idx.platform("arm64"), idx.platform("amd64"), "dm-multi:1");

    // Explicit prefix on the plain listener (insecure-registries) and over
    // TLS on regmirror's own name.
    let plain = format!("{}/dockerhub/library/dm-prefix:1", s.plain());
    let tls = format!("{}/ghcr/org/dm-tls:1", s.name());
    for (name, repo, upstream_name) in [
        (plain.as_str(), "library/dm-prefix", "docker.io/library/dm-prefix:1"),
        (tls.as_str(), "org/dm-tls", "ghcr.io/org/dm-tls:1"),
    ] {
        let img = s.image(repo, Format::Docker);
        cold_then_warm(
            s.up(),
            name,
            repo,
            &img,
            || dockerd.pull(name, None),
            || other.skopeo_copy(upstream_name, None),
        );
    }

    // Errors: the registry's OCI error text reaches the user.
    let missing = format!("{}/dockerhub/library/dm-prefix:nope", s.plain());
    assert_registry_error(&dockerd.pull(&missing, None).0, "manifest unknown");
    let missing = format!("{}/ghcr/org/dm-tls:nope", s.name());
    assert_registry_error(&dockerd.pull(&missing, None).0, "manifest unknown");
    // Through `registry-mirrors`, docker treats any mirror error as "try the
    // next endpoint" and reports Docker Hub's (here: connection refused); the
    // mirror's OCI error is what dockerd logs for the attempt.
    let out = dockerd.pull("dm-short:nope", None).0;
    assert!(!out.success(), "pull of a missing tag succeeded");
    assert!(
        dockerd
            .log()
            .lines()
            .any(|l| l.contains("Attempting next endpoint") && l.contains("manifest unknown")),
        "dockerd did not log the mirror's OCI error; client said: {}{}",
        out.stdout,
        out.stderr
    );
}
