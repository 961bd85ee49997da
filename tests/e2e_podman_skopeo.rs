//! podman and skopeo through regmirror in every mode: transparent (private
//! /etc/hosts from `regmirror setup hosts`, regmirror's CA), the
//! `registries.conf` mirrors `regmirror setup podman` writes (namespace
//! paths, `location = "PROXY:5000/quay"`), and explicit prefix on the plain
//! listener and over TLS on regmirror's own name. No daemons: every test
//! has its own upstream, regmirror and client sandboxes.

mod common;

use common::images::Format;
use common::matrix::{
    assert_cold, assert_one_platform, assert_pulled, assert_registry_error, assert_warm, cold_then_warm, Stack,
};

/// podman, names unchanged: `docker.io/library/x`, `x:1`, `org/x:1`,
/// `ghcr.io/org/x`, `quay.io/org/x`, `--arch arm64` of an index.
#[test]
fn podman_transparent() {
    let s = Stack::start();
    let pm = s.client();
    let other = s.client();
    for (name, repo, warm_name, format) in [
        (
            "docker.io/library/pt-full:1",
            "library/pt-full",
            "docker.io/library/pt-full:1",
            Format::Docker,
        ),
        (
            "pt-short:1",
            "library/pt-short",
            "docker.io/library/pt-short:1",
            Format::Oci,
        ),
        (
            "porg/pt-org:1",
            "porg/pt-org",
            "docker.io/porg/pt-org:1",
            Format::Docker,
        ),
        ("ghcr.io/org/pt-gh:1", "org/pt-gh", "ghcr.io/org/pt-gh:1", Format::Oci),
        (
            "quay.io/org/pt-quay:1",
            "org/pt-quay",
            "quay.io/org/pt-quay:1",
            Format::Docker,
        ),
    ] {
        let img = s.image(repo, format);
        cold_then_warm(
            s.up(),
            name,
            repo,
            &img,
            || pm.podman_pull(name, None),
            || other.skopeo_copy(warm_name, None),
        );
    }

    let idx = s.index("org/pt-multi", Format::Oci);
    let name = "quay.io/org/pt-multi:1";
    let mark = s.up().mark();
    let (out, digest) = pm.podman_pull(name, Some("arm64"));
    out.assert_ok();
    // podman 4.3 reports the index digest for an image pulled from an index.
    let arm = idx.platform("arm64");
    assert!(
        digest.as_deref() == Some(idx.index_digest.as_str()) || digest.as_deref() == Some(arm.manifest_digest.as_str()),
        "podman digest {digest:?}, index {}, arm64 {}",
        idx.index_digest,
        arm.manifest_digest
    );
    assert_eq!(pm.podman_inspect(name, "{{.Architecture}}").as_deref(), Some("arm64"));
    assert_one_platform(s.up(), mark, arm, idx.platform("amd64"), name);
    let mark = s.up().mark();
    assert_pulled(name, &other.skopeo_copy(name, Some("arm64")), &arm.manifest_digest);
    assert_warm(s.up(), mark, "org/pt-multi", name);

    assert_registry_error(
        &pm.podman_pull("docker.io/library/pt-full:nope", None).0,
        "manifest unknown",
    );
    assert_registry_error(&pm.podman_pull("ghcr.io/org/pt-gh:nope", None).0, "manifest unknown");
}

/// skopeo, names unchanged: `docker.io/library/x`, `ghcr.io/org/x`,
/// `quay.io/org/x`, `--override-arch arm64` of an index; podman pulls warm.
#[test]
fn skopeo_transparent() {
    let s = Stack::start();
    let sk = s.client();
    let other = s.client();
    for (name, repo, format) in [
        ("docker.io/library/st-full:1", "library/st-full", Format::Oci),
        ("ghcr.io/org/st-gh:1", "org/st-gh", Format::Docker),
        ("quay.io/org/st-quay:1", "org/st-quay", Format::Oci),
    ] {
        let img = s.image(repo, format);
        let mark = s.up().mark();
        assert_pulled(name, &sk.skopeo_copy(name, None), &img.manifest_digest);
        assert_eq!(
            sk.skopeo_digest(name).as_deref(),
            Some(img.manifest_digest.as_str()),
            "skopeo inspect {name}"
        );
        assert_cold(s.up(), mark, &img, name);
        let mark = s.up().mark();
        assert_pulled(name, &other.podman_pull(name, None), &img.manifest_digest);
        assert_warm(s.up(), mark, repo, name);
    }

    let idx = s.index("org/st-multi", Format::Docker);
    let name = "ghcr.io/org/st-multi:1";
    let arm = idx.platform("arm64");
    let mark = s.up().mark();
    assert_pulled(name, &sk.skopeo_copy(name, Some("arm64")), &arm.manifest_digest);
    assert_one_platform(s.up(), mark, arm, idx.platform("amd64"), name);
    assert_eq!(sk.skopeo_digest(name).as_deref(), Some(idx.index_digest.as_str()));

    assert_registry_error(&sk.skopeo_copy("quay.io/org/st-quay:nope", None).0, "manifest unknown");
}

/// `regmirror setup podman --proxy PROXY` as the client's registries.conf:
/// `[[registry.mirror]] location = "PROXY:5000/quay"` (and `/dockerhub`,
/// `/ghcr`); every registry name resolves to a dead address, so only the
/// mirror can serve. skopeo reads the same file.
#[test]
fn podman_registries_conf_mirror() {
    let s = Stack::start();
    let conf = s.setup_file("podman", &["--proxy", &s.proxy_ip().to_string()], "regmirror.conf");
    let conf = std::fs::read_to_string(conf).expect("registries.conf");
    assert!(conf.contains(&format!("location = \"{}/quay\"", s.plain())), "{conf}");
    let pm = s.mirror_client(false, &s.env.ca_file);
    pm.set_registries_conf(&conf);
    let warm = s.client();
    for (name, repo, upstream, format) in [
        ("quay.io/org/pm-quay:1", "org/pm-quay", "quay.io", Format::Docker),
        (
            "docker.io/library/pm-full:1",
            "library/pm-full",
            "docker.io",
            Format::Oci,
        ),
        ("pm-short:1", "library/pm-short", "docker.io", Format::Docker),
        ("ghcr.io/org/pm-gh:1", "org/pm-gh", "ghcr.io", Format::Oci),
    ] {
        let img = s.image(repo, format);
        let mark = s.up().mark();
        assert_pulled(name, &pm.podman_pull(name, None), &img.manifest_digest);
        assert_cold(s.up(), mark, &img, name);
        // The namespace path picked the upstream: the tag record is under its upstream's name.
        let tag_record = s.rm.cache_dir.join("meta").join(upstream).join(repo);
        assert!(tag_record.is_dir(), "{name}: no tag record at {}", tag_record.display());
        let mark = s.up().mark();
        let full = if name.contains('/') {
            name.to_string()
        } else {
            format!("docker.io/library/{name}")
        };
        assert_pulled(name, &warm.skopeo_copy(&full, None), &img.manifest_digest);
        assert_warm(s.up(), mark, repo, name);
    }

    // skopeo honours the same mirrors; and one platform through the mirror.
    let idx = s.index("org/pm-multi", Format::Oci);
    let name = "quay.io/org/pm-multi:1";
    let arm = idx.platform("arm64");
    let mark = s.up().mark();
    assert_pulled(name, &pm.skopeo_copy(name, Some("arm64")), &arm.manifest_digest);
    assert_one_platform(s.up(), mark, arm, idx.platform("amd64"), name);
    let mark = s.up().mark();
    let (out, _) = pm.podman_pull(name, Some("arm64"));
    out.assert_ok();
    assert_warm(s.up(), mark, "org/pm-multi", name);

    // The mirror's OCI error is in podman's output (next to the dead primary's).
    assert_registry_error(&pm.podman_pull("quay.io/org/pm-quay:nope", None).0, "manifest unknown");
}

/// Explicit prefix: `skopeo copy docker://PROXY:5000/ghcr/org/x:1`
/// (`--src-tls-verify=false`), `podman pull PROXY:5000/quay/org/x:1`, and
/// both over TLS on regmirror's own name (`regmirror.test/…`) with the
/// registry names dead.
#[test]
fn skopeo_and_podman_explicit_prefix() {
    let s = Stack::start();
    let c = s.mirror_client(true, &s.rm.ca_pem);
    let warm = s.client();
    let plain = s.plain();
    let own = s.name().to_string();
    type Pull<'a> = &'a dyn Fn(&str) -> (common::clients::Output, Option<String>);
    let skopeo_plain: Pull = &|n| c.skopeo_copy_opts(n, None, &["--src-tls-verify=false"]);
    let skopeo_tls: Pull = &|n| c.skopeo_copy(n, None);
    let podman_plain: Pull = &|n| c.podman_pull_opts(n, None, &["--tls-verify=false"]);
    let podman_tls: Pull = &|n| c.podman_pull(n, None);
    let cases: [(String, &str, &str, Pull); 4] = [
        (
            format!("{plain}/ghcr/org/pe-gh:1"),
            "org/pe-gh",
            "ghcr.io/org/pe-gh:1",
            skopeo_plain,
        ),
        (
            format!("{own}/ghcr/org/pe-ghtls:1"),
            "org/pe-ghtls",
            "ghcr.io/org/pe-ghtls:1",
            skopeo_tls,
        ),
        (
            format!("{plain}/quay/org/pe-quay:1"),
            "org/pe-quay",
            "quay.io/org/pe-quay:1",
            podman_plain,
        ),
        (
            format!("{own}/dockerhub/library/pe-dh:1"),
            "library/pe-dh",
            "docker.io/library/pe-dh:1",
            podman_tls,
        ),
    ];
    for (name, repo, upstream_name, pull) in cases {
        let img = s.image(repo, Format::Oci);
        cold_then_warm(
            s.up(),
            &name,
            repo,
            &img,
            || pull(&name),
            || warm.skopeo_copy(upstream_name, None),
        );
    }

    assert_registry_error(
        &skopeo_plain(&format!("{plain}/ghcr/org/pe-gh:nope")).0,
        "manifest unknown",
    );
    assert_registry_error(
        &podman_tls(&format!("{own}/quay/org/pe-quay:nope")).0,
        "manifest unknown",
    );
}
