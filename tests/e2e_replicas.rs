//! Several regmirror replicas on one bucket of a real 3-node Garage cluster,
//! with real clients (skopeo) and a real upstream (distribution's access
//! log): an image pulled through one replica is pulled through the others
//! with no blob fetched upstream, a replica started later with an empty
//! local read cache serves it too, even while upstream is down (the tag
//! record another replica wrote), and pulls go on with one Garage node
//! stopped. Every replica uses the same CA, as a cluster's do.

mod common;

use common::garage::GarageCluster;
use common::images::Format;
use common::matrix::{assert_pulled, assert_warm};
use common::regmirror::{Config, Regmirror};
use common::{alloc_ip, UpstreamEnv, UpstreamEnvOpts, UPSTREAM_HOST};

const REPO: &str = "library/replicated";

fn replica(env: &UpstreamEnv, garage: &GarageCluster, node: usize, ca_dir: &std::path::Path) -> Regmirror {
    let mut cfg = Config::new(alloc_ip()).with_standard_upstreams(UPSTREAM_HOST, env.upstream.ip, &env.ca_file);
    cfg.cache_extra = garage.cache_keys(node, "e2e");
    cfg.ca_dir = Some(ca_dir.to_path_buf());
    for (k, v) in garage.credentials_env() {
        cfg.env.push((k.into(), v.into()));
    }
    Regmirror::start(cfg)
}

fn client(rm: &Regmirror) -> common::clients::Sandbox {
    let sb = common::clients::Sandbox::new(rm.ip(), &rm.config.client_hostnames(), &rm.ca_pem);
    let hosts: String = rm
        .config
        .client_hostnames()
        .iter()
        .map(|h| format!("{} {h}\n", rm.ip()))
        .collect();
    sb.set_hosts(&format!("127.0.0.1 localhost\n{hosts}"));
    sb
}

#[test]
fn replicas_on_one_bucket_fetch_an_image_from_upstream_once() {
    let mut garage = GarageCluster::start(3, "regmirror-e2e");
    let mut env = UpstreamEnv::start(UpstreamEnvOpts::default());
    let ca = common::tempdir("replicas-ca-");
    let image = common::images::build_image(Format::Oci, "amd64", &[300 * 1024, 9 * 1024 * 1024]);
    env.pusher.push_image(REPO, "1", &image);
    let name = format!("docker.io/{REPO}:1");

    let a = replica(&env, &garage, 0, ca.path());
    let b = replica(&env, &garage, 1, ca.path());
    let c = replica(&env, &garage, 2, ca.path());

    // Cold through A: every blob upstream once.
    let mark = env.upstream.mark();
    assert_pulled(
        "cold through A",
        &client(&a).skopeo_copy(&name, None),
        &image.manifest_digest,
    );
    common::matrix::assert_cold(&env.upstream, mark, &image, "cold through A");

    // B and C, local read caches empty: the bucket has it all.
    for (what, rm) in [("through B", &b), ("through C", &c)] {
        let mark = env.upstream.mark();
        assert_pulled(what, &client(rm).skopeo_copy(&name, None), &image.manifest_digest);
        assert_warm(&env.upstream, mark, REPO, what);
    }

    // A replica started now, upstream down: the tag record A wrote and the
    // content in the bucket serve the pull.
    env.upstream.stop();
    let d = replica(&env, &garage, 0, ca.path());
    let out = client(&d).skopeo_copy(&name, None);
    assert_pulled("through a new replica with upstream down", &out, &image.manifest_digest);

    // One Garage node stopped: the other two are a quorum.
    garage.kill_node(1);
    let e = replica(&env, &garage, 2, ca.path());
    assert_pulled(
        "through a new replica with a Garage node down",
        &client(&e).skopeo_copy(&name, None),
        &image.manifest_digest,
    );
    assert!(
        !e.log().contains("panicked"),
        "no panic in the replica's log:\n{}",
        e.log()
    );
}
