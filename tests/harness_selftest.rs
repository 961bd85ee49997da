//! Harness self-test, no regmirror involved: skopeo and podman pull straight
//! from the distribution upstream (their hosts file maps the registry names to
//! it), which proves the token server, the pusher, the client sandboxes and
//! the access-log parsing. If this fails, e2e failures say nothing about
//! regmirror.
mod common;

use common::images::{self, Format};
use common::{clients::Sandbox, UpstreamEnv, UpstreamEnvOpts};

fn env() -> UpstreamEnv {
    UpstreamEnv::start(UpstreamEnvOpts {
        extra_dns: Sandbox::standard_hostnames(&[]),
        ..Default::default()
    })
}

#[test]
fn clients_pull_directly_from_upstream_with_token_auth() {
    let env = env();
    let img = images::build_image(Format::Docker, "amd64", &[200 << 10, 300 << 10, 100 << 10]);
    env.pusher.push_image("library/alpha", "1", &img);
    let oci = images::build_image(Format::Oci, "amd64", &[150 << 10]);
    env.pusher.push_image("org/ociapp", "1", &oci);
    let multi = images::build_index(Format::Docker, &["amd64", "arm64"], &[200 << 10, 100 << 10]);
    env.pusher.push_index("org/multi", "1", &multi);
    let tokens_after_push = env.tokens_served();
    assert!(tokens_after_push >= 3);

    let sb = Sandbox::new(env.upstream.ip, &Sandbox::standard_hostnames(&[]), &env.ca_file);
    let m = env.upstream.mark();
    let (out, digest) = sb.skopeo_copy("docker.io/library/alpha:1", None);
    out.assert_ok();
    assert_eq!(digest.as_deref(), Some(img.manifest_digest.as_str()));
    let gets = env.upstream.blob_gets_since(m);
    let mut want = img.blob_digests();
    want.sort();
    let mut got = gets.clone();
    got.sort();
    assert_eq!(got, want, "each blob fetched once");
    assert!(
        env.tokens_served() > tokens_after_push,
        "skopeo fetched an anonymous token"
    );
    let anon = env.token.as_ref().unwrap().requests_since(tokens_after_push);
    assert!(anon.iter().all(|r| r.user.is_none() && r.status == 200), "{anon:?}");

    let (out, digest) = sb.skopeo_copy("quay.io/org/ociapp:1", None);
    out.assert_ok();
    assert_eq!(digest.as_deref(), Some(oci.manifest_digest.as_str()));

    // arm64 only
    let m = env.upstream.mark();
    let (out, digest) = sb.skopeo_copy("ghcr.io/org/multi:1", Some("arm64"));
    out.assert_ok();
    assert_eq!(
        digest.as_deref(),
        Some(multi.platform("arm64").manifest_digest.as_str())
    );
    let gets = env.upstream.blob_gets_since(m);
    for d in multi.platform("amd64").blob_digests() {
        assert!(!gets.contains(&d), "amd64 blob {d} fetched");
    }
    assert_eq!(gets.len(), 3, "{gets:?}");
    assert_eq!(
        sb.skopeo_digest("ghcr.io/org/multi:1").as_deref(),
        Some(multi.index_digest.as_str())
    );

    // podman
    let pm = Sandbox::new(env.upstream.ip, &Sandbox::standard_hostnames(&[]), &env.ca_file);
    let (out, digest) = pm.podman_pull("docker.io/library/alpha:1", None);
    out.assert_ok();
    assert_eq!(digest.as_deref(), Some(img.manifest_digest.as_str()));
    let (out, digest) = pm.podman_pull("quay.io/org/multi:1", Some("arm64"));
    out.assert_ok();
    // podman 4.3 records the index digest for one platform pulled from an index.
    assert_eq!(digest.as_deref(), Some(multi.index_digest.as_str()));
    // Short names resolve through the sandbox's registries.conf to docker.io.
    let (out, digest) = pm.podman_pull("org/ociapp:1", None);
    out.assert_ok();
    assert_eq!(digest.as_deref(), Some(oci.manifest_digest.as_str()));

    assert_eq!(
        pm.podman_inspect("quay.io/org/multi:1", "{{.Architecture}}").as_deref(),
        Some("arm64")
    );

    // Token server policy: wrong password → 401; anonymous gets pull only.
    let token = env.token.as_ref().unwrap();
    let client = common::http_client(env.ca.pem.as_bytes());
    let url = format!(
        "{}?service=upstream.test&scope=repository:library/alpha:pull,push",
        token.realm
    );
    let bad = common::block_on(async { client.get(&url).basic_auth("pusher", Some("nope")).send().await }).unwrap();
    assert_eq!(bad.status(), 401);
    let anon = common::block_on(async { client.get(&url).send().await.unwrap().text().await.unwrap() });
    let anon: serde_json::Value = serde_json::from_str(&anon).unwrap();
    let jwt = anon["token"].as_str().unwrap();
    use base64::Engine as _;
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(jwt.split('.').nth(1).unwrap())
        .unwrap();
    let claims: serde_json::Value = serde_json::from_slice(&claims).unwrap();
    assert_eq!(claims["access"][0]["actions"], serde_json::json!(["pull"]));
    assert_eq!(anon["expires_in"], 300);
    assert_eq!(claims["aud"], "upstream.test");

    let log = env.upstream.access_log();
    assert!(log.iter().any(|e| e.method == "HEAD" || e.method == "GET"));
    assert!(
        log.iter().any(|e| e.user_agent.starts_with("skopeo/")),
        "user agents parsed"
    );
}
