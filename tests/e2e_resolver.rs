//! Rule 15: regmirror resolves upstream names without /etc/hosts. The host
//! it runs on may map registry names to regmirror itself (that is how
//! transparent mode is set up), so reading /etc/hosts would make it dial
//! itself.

mod common;

use common::images::{self, Format};
use common::regmirror::{Config, Regmirror};
use common::{alloc_ip, block_on, UpstreamEnv, UpstreamEnvOpts, UPSTREAM_HOST};

#[test]
fn upstream_names_in_etc_hosts_are_not_used() {
    let env = UpstreamEnv::start(UpstreamEnvOpts::default());
    let image = images::build_image(Format::Docker, "amd64", &[64 * 1024]);
    env.pusher.push_image("library/hosts", "1", &image);

    // /etc/hosts knows the upstream's address; DNS (a nameserver where
    // nothing listens, so the query never leaves loopback) does not.
    let hosts = format!("127.0.0.1 localhost\n{} {UPSTREAM_HOST}\n", env.upstream.ip);
    let resolv = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n".to_string();
    let mut cfg = Config::new(alloc_ip()).with_standard_upstreams(UPSTREAM_HOST, env.upstream.ip, &env.ca_file);
    cfg.overrides.clear();
    cfg.private_etc = Some((hosts, resolv));
    let rm = Regmirror::start(cfg);

    let mark = env.upstream.mark();
    let url = format!("{}/v2/dockerhub/library/hosts/manifests/1", rm.http_url());
    let (status, body) = block_on(async {
        let resp = reqwest::Client::new()
            .get(&url)
            .send()
            .await
            .expect("regmirror answers");
        (resp.status(), resp.text().await.unwrap_or_default())
    });
    assert!(
        status.is_server_error(),
        "expected a gateway error, got {status}: {body}"
    );
    let v: serde_json::Value = serde_json::from_str(&body).expect("OCI error JSON");
    let message = v["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(UPSTREAM_HOST),
        "the error names the unresolvable host: {message}"
    );
    assert!(
        env.upstream.entries_since(mark).is_empty(),
        "regmirror reached the upstream through /etc/hosts"
    );
}
