//! The private registry with real clients: `docker login`, `docker push`
//! and `docker pull` (a private dockerd), `podman login` and `podman push`,
//! `buildah push`, `ctr images push --user` (a private containerd), and
//! `skopeo copy --all` of a multi-arch index, on the
//! plain listener and over TLS on regmirror's own name. The digest pulled
//! back is the digest pushed; a wrong password and a user without write
//! access are refused with the clients' usual messages; anonymous pulls are
//! refused unless `anonymous_pull`; a push of an image the mirror already
//! cached uploads none of its bytes.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::clients::Sandbox;
use common::daemons::{Containerd, Dockerd, DockerdOpts};
use common::images::{build_image, build_index, Format};
use common::matrix::Stack;
use common::UpstreamEnvOpts;

const KIB: usize = 1024;

/// htpasswd with `admin` (may push) and `ci` (may only pull), bcrypt.
fn htpasswd(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("htpasswd");
    let admin = bcrypt::hash("admin-pw", 4).expect("bcrypt");
    let ci = bcrypt::hash("ci-pw", 4).expect("bcrypt");
    std::fs::write(&path, format!("admin:{admin}\nci:{ci}\n")).expect("write htpasswd");
    path
}

/// A stack whose regmirror hosts `private/` with the logins above.
fn stack(dir: &Path, anonymous_pull: bool) -> Stack {
    let file = htpasswd(dir);
    Stack::start_with(UpstreamEnvOpts::default(), |mut cfg| {
        cfg.extra_toml += &format!(
            "[[local]]\nnamespace = \"private\"\nhtpasswd = {:?}\nwriters = [\"admin\"]\nanonymous_pull = {anonymous_pull}\n",
            file.display().to_string()
        );
        cfg
    })
}

/// `/metrics`, parsed: `name{labels}` → value.
fn metrics(s: &Stack) -> HashMap<String, f64> {
    let url = format!("{}/metrics", s.rm.http_url());
    let text = common::block_on(async {
        reqwest::get(&url)
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("body")
    });
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            l.rsplit_once(' ')
                .and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        })
        .collect()
}

fn pushed_bytes(s: &Stack) -> f64 {
    metrics(s).get("regmirror_pushed_bytes_total").copied().unwrap_or(0.0)
}

fn skopeo(sb: &Sandbox, args: &[&str]) -> common::clients::Output {
    let policy = sb.path().join("policy.json").display().to_string();
    let mut all = vec!["skopeo", "--policy", &policy];
    all.extend_from_slice(args);
    sb.run(&all)
}

#[test]
fn skopeo_copies_a_multi_arch_index_in_and_out_and_a_cached_image_costs_no_upload() {
    let dir = common::tempdir("private-skopeo-");
    let s = stack(dir.path(), false);
    let multi = build_index(Format::Oci, &["amd64", "arm64"], &[64 * KIB, 32 * KIB]);
    s.env.pusher.push_index("library/pr-multi", "1", &multi);
    let sb = s.client();
    let plain = s.plain();

    // Pulled through the mirror first: everything is public in the cache.
    let src = format!("docker://{plain}/dockerhub/library/pr-multi:1");
    let cached = format!("docker://{plain}/private/pr-cached:1");
    let out_dir = sb.path().join("out/pull-through");
    let pulled = skopeo(
        &sb,
        &[
            "copy",
            "--all",
            "--src-tls-verify=false",
            &src,
            &format!("dir:{}", out_dir.display()),
        ],
    );
    pulled.assert_ok();
    let before = pushed_bytes(&s);
    skopeo(
        &sb,
        &[
            "copy",
            "--all",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            "--dest-creds",
            "admin:admin-pw",
            &src,
            &cached,
        ],
    )
    .assert_ok();
    assert_eq!(
        pushed_bytes(&s) - before,
        0.0,
        "every blob of an image the mirror cached is already there: the push uploads none"
    );
    let raw = skopeo(
        &sb,
        &["inspect", "--raw", "--tls-verify=false", "--creds", "ci:ci-pw", &cached],
    );
    raw.assert_ok();
    assert_eq!(
        common::sha256_digest(raw.stdout.as_bytes()),
        multi.index_digest,
        "the index pulled back is the one pushed"
    );

    // An image the cache never saw, from an OCI layout on disk: its blobs
    // are uploaded, over TLS on regmirror's own name.
    let fresh = build_image(Format::Oci, "amd64", &[48 * KIB]);
    let layout = common::images::write_layout(&sb.path().join("out/layout"), &fresh);
    let own = format!("docker://{}/private/pr-fresh:1", s.name());
    let before = pushed_bytes(&s);
    let copied = skopeo(
        &sb,
        &[
            "copy",
            "--dest-creds",
            "admin:admin-pw",
            &format!("oci:{}:1", layout.display()),
            &own,
        ],
    );
    copied.assert_ok();
    let sent: usize = fresh.layers.iter().map(|l| l.data.len()).sum::<usize>() + fresh.config.data.len();
    assert_eq!(
        pushed_bytes(&s) - before,
        sent as f64,
        "the new image's blobs, once each"
    );
    let back = skopeo(&sb, &["inspect", "--raw", "--creds", "ci:ci-pw", &own]);
    back.assert_ok();
    assert_eq!(common::sha256_digest(back.stdout.as_bytes()), fresh.manifest_digest);

    // The status page lists pushed repositories apart from cached ones.
    let page = common::block_on(async {
        reqwest::get(format!("{}/", s.rm.http_url()))
            .await
            .expect("status page")
            .text()
            .await
            .expect("page")
    });
    let local = page.split("<h2>Local repositories</h2>").nth(1).unwrap_or("");
    let local = local.split("<h2>").next().unwrap_or("");
    assert!(
        local.contains("private/pr-cached") && local.contains("private/pr-fresh"),
        "status page: {page}"
    );

    // Refusals as skopeo reports them.
    let denied = skopeo(
        &sb,
        &[
            "copy",
            "--src-creds",
            "ci:ci-pw",
            "--dest-creds",
            "ci:ci-pw",
            &format!("docker://{}/private/pr-fresh:1", s.name()),
            &format!("docker://{}/private/pr-other:1", s.name()),
        ],
    );
    assert!(!denied.success() && denied.stderr.contains("denied"), "{denied:?}");
    let anonymous = skopeo(&sb, &["inspect", "--raw", &own]);
    assert!(
        !anonymous.success() && anonymous.stderr.contains("unauthorized"),
        "{anonymous:?}"
    );
}

#[test]
fn docker_login_push_and_pull_back() {
    let dir = common::tempdir("private-docker-");
    let s = stack(dir.path(), false);
    let image = build_image(Format::Docker, "amd64", &[40 * KIB, 20 * KIB]);
    s.env.pusher.push_image("library/pr-dock", "1", &image);
    let plain = s.plain();
    let etc = dir.path().join("etc-docker");
    std::fs::create_dir_all(&etc).expect("etc");
    std::fs::write(
        etc.join("daemon.json"),
        format!("{{\"insecure-registries\": [\"{plain}\"]}}"),
    )
    .expect("daemon.json");
    let hosts = "127.0.0.1 localhost\n".to_string();
    let dd = Dockerd::start(DockerdOpts {
        hosts: &hosts,
        etc_docker: &etc,
        ssl_cert_file: None,
        proxy_env: &[],
    });
    let cfg = dd.cli_config("push");
    // The image reaches the daemon through the mirror, then gets a private name.
    let (pulled, _) = dd.pull_as(&cfg, &format!("{plain}/dockerhub/library/pr-dock:1"));
    pulled.assert_ok();
    let name = format!("{plain}/private/team/pr-dock:1");
    dd.docker_as(&cfg, &["tag", &format!("{plain}/dockerhub/library/pr-dock:1"), &name])
        .assert_ok();

    let wrong = dd.login(&cfg, Some(&plain), "admin", "nope");
    assert!(!wrong.success() && wrong.stderr.contains("unauthorized"), "{wrong:?}");
    dd.login(&cfg, Some(&plain), "ci", "ci-pw").assert_ok();
    let reader = dd.docker_as(&cfg, &["push", &name]);
    assert!(!reader.success() && reader.stderr.contains("denied"), "{reader:?}");
    dd.login(&cfg, Some(&plain), "admin", "admin-pw").assert_ok();
    let push = dd.docker_as(&cfg, &["push", &name]);
    push.assert_ok();
    // docker writes the manifest itself: its digest is the one it reports.
    let pushed = push
        .stdout
        .split_whitespace()
        .skip_while(|w| *w != "digest:")
        .nth(1)
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no digest in docker push output: {push:?}"));
    // Both names gone, so the pull back downloads from the private repository.
    dd.docker_as(&cfg, &["rmi", &name, &format!("{plain}/dockerhub/library/pr-dock:1")])
        .assert_ok();

    let other = dd.cli_config("pull");
    let anonymous = dd.docker_as(&other, &["pull", &name]);
    assert!(!anonymous.success(), "anonymous pull refused: {anonymous:?}");
    dd.login(&other, Some(&plain), "ci", "ci-pw").assert_ok();
    let (back, digest) = dd.pull_as(&other, &name);
    back.assert_ok();
    assert_eq!(digest, Some(pushed), "pulled digest = pushed");
}

#[test]
fn podman_login_and_push_buildah_push_and_anonymous_pull_where_allowed() {
    let dir = common::tempdir("private-podman-");
    let s = stack(dir.path(), true);
    let image = build_image(Format::Oci, "amd64", &[36 * KIB]);
    s.env.pusher.push_image("library/pr-pod", "1", &image);
    let sb = s.client();
    let plain = s.plain();
    sb.podman(&[
        "pull",
        "--tls-verify=false",
        &format!("{plain}/dockerhub/library/pr-pod:1"),
    ])
    .assert_ok();
    let local = format!("{plain}/dockerhub/library/pr-pod:1");

    let wrong = sb.podman(&["login", "--tls-verify=false", "-u", "admin", "-p", "nope", &plain]);
    assert!(
        !wrong.success() && wrong.stderr.contains("invalid username/password"),
        "{wrong:?}"
    );
    sb.podman(&["login", "--tls-verify=false", "-u", "admin", "-p", "admin-pw", &plain])
        .assert_ok();
    let pushed = format!("{plain}/private/pr-pod:1");
    sb.podman(&["push", "--tls-verify=false", &local, &pushed]).assert_ok();
    let bud = sb.run(&[
        "buildah",
        "--root",
        &sb.path().join("root").display().to_string(),
        "--runroot",
        &sb.path().join("runroot").display().to_string(),
        "--storage-driver",
        "vfs",
        "push",
        "--tls-verify=false",
        &local,
        &format!("docker://{plain}/private/pr-buildah:1"),
    ]);
    bud.assert_ok();
    sb.podman(&["logout", &plain]).assert_ok();

    // anonymous_pull = true: no login needed to read, still needed to write.
    let anon = Sandbox::new(s.proxy_ip(), &s.rm.config.client_hostnames(), &s.rm.ca_pem);
    for repo in ["pr-pod", "pr-buildah"] {
        let raw = skopeo(
            &anon,
            &[
                "inspect",
                "--raw",
                "--tls-verify=false",
                &format!("docker://{plain}/private/{repo}:1"),
            ],
        );
        raw.assert_ok();
        let got: serde_json::Value = serde_json::from_str(&raw.stdout).expect("manifest JSON");
        assert_eq!(
            got["config"]["digest"], image.config.digest,
            "{repo}: the image pushed is the image served"
        );
    }
    let push = skopeo(
        &anon,
        &[
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            &format!("docker://{pushed}"),
            &format!("docker://{plain}/private/pr-anon:1"),
        ],
    );
    assert!(!push.success() && push.stderr.contains("unauthorized"), "{push:?}");
}

#[test]
fn containerd_push_with_user_and_pull_back() {
    let dir = common::tempdir("private-ctr-");
    let s = stack(dir.path(), false);
    let image = build_image(Format::Oci, "amd64", &[44 * KIB, 12 * KIB]);
    s.env.pusher.push_image("library/pr-ctr", "1", &image);
    let ctrd = Containerd::start();
    let sb = s.client();
    let plain = s.plain();
    let cached = format!("{plain}/dockerhub/library/pr-ctr:1");
    let name = format!("{plain}/private/pr-ctr:1");
    let (pulled, _) = ctrd.pull_flags(&sb, &cached, &["--plain-http"]);
    pulled.assert_ok();
    ctrd.ctr(&sb, &["images", "tag", &cached, &name]).assert_ok();

    let push = |user: &str| ctrd.ctr(&sb, &["images", "push", "--plain-http", "--user", user, &name]);
    let wrong = push("admin:nope");
    assert!(
        !wrong.success() && wrong.stderr.contains("401 Unauthorized"),
        "a wrong password is refused: {wrong:?}"
    );
    let reader = push("ci:ci-pw");
    assert!(
        !reader.success() && reader.stderr.contains("403 Forbidden"),
        "a user without write access is refused: {reader:?}"
    );
    let before = pushed_bytes(&s);
    push("admin:admin-pw").assert_ok();
    assert_eq!(
        pushed_bytes(&s) - before,
        0.0,
        "containerd's blobs came through the mirror: the push uploads none"
    );

    // Both names and their content gone, so the pull back downloads.
    ctrd.ctr(&sb, &["images", "rm", "--sync", &name, &cached]).assert_ok();
    let (anonymous, _) = ctrd.pull_flags(&sb, &name, &["--plain-http"]);
    assert!(!anonymous.success(), "anonymous pull refused: {anonymous:?}");
    let back = ctrd.pull_flags(&sb, &name, &["--plain-http", "--user", "ci:ci-pw"]);
    common::matrix::assert_pulled("ctr pull of the pushed image", &back, &image.manifest_digest);
}
