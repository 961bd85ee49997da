//! Several regmirror replicas on one bucket of a real 3-node Garage cluster,
//! with real clients (skopeo) and a real upstream (distribution's access
//! log): an image pulled through one replica is pulled through the others
//! with no blob fetched upstream, a replica started later with an empty
//! local read cache serves it too, even while upstream is down (the tag
//! record another replica wrote), and pulls go on with one Garage node
//! stopped. Every replica uses the same CA, as a cluster's do.
//!
//! With `[cluster]`, replicas fetch a cold digest through its owner: eight
//! concurrent cold pulls spread over three replicas fetch each blob from
//! upstream exactly once, a stopped owner costs nothing but a fetch by the
//! asker itself, and a request forged as a replica's is refused.

mod common;

use common::garage::GarageCluster;
use common::images::Format;
use common::matrix::{assert_pulled, assert_warm};
use common::regmirror::{Config, Regmirror};
use common::{alloc_ip, UpstreamEnv, UpstreamEnvOpts, UPSTREAM_HOST};

use std::net::IpAddr;

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

/// Replicas on `ips` (one each), all members of one `[cluster]`.
struct Cluster {
    replicas: Vec<Regmirror>,
    _dir: tempfile::TempDir,
}

fn cluster(env: &UpstreamEnv, garage: &GarageCluster, n: usize) -> Cluster {
    let dir = common::tempdir("cluster-");
    let ca = dir.path().join("ca");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "a cluster secret of some length\n").unwrap();
    let ips: Vec<IpAddr> = (0..n).map(|_| alloc_ip()).collect();
    let peers: Vec<String> = ips.iter().map(|ip| format!("\"http://{ip}:5000\"")).collect();
    let replicas = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            let mut cfg = Config::new(*ip).with_standard_upstreams(UPSTREAM_HOST, env.upstream.ip, &env.ca_file);
            cfg.cache_extra = garage.cache_keys(i % garage.len(), "cluster");
            cfg.ca_dir = Some(ca.clone());
            cfg.extra_toml += &format!(
                "[cluster]\nself = \"http://{ip}:5000\"\npeers = [{}]\nsecret_file = {:?}\n",
                peers.join(", "),
                secret.display().to_string()
            );
            for (k, v) in garage.credentials_env() {
                cfg.env.push((k.into(), v.into()));
            }
            Regmirror::start(cfg)
        })
        .collect();
    Cluster { replicas, _dir: dir }
}

fn counter(rm: &Regmirror, name: &str) -> u64 {
    rm.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .map_or(0, |v| v.trim().parse().expect("a counter value"))
}

/// The member of `members` that owns `digest`, as regmirror decides it.
fn owner(members: &[String], digest: &str) -> usize {
    let d = regmirror::reference::Digest::parse(digest).unwrap();
    (0..members.len())
        .max_by_key(|&i| regmirror::cluster::weight(&url::Url::parse(&members[i]).unwrap(), &d))
        .unwrap()
}

fn member_urls(c: &Cluster) -> Vec<String> {
    c.replicas.iter().map(|r| format!("http://{}:5000", r.ip())).collect()
}

#[test]
fn concurrent_cold_pulls_over_a_cluster_fetch_each_blob_upstream_once() {
    let garage = GarageCluster::start(3, "regmirror-cluster");
    let env = UpstreamEnv::start(UpstreamEnvOpts::default());
    let image = common::images::build_image(
        Format::Docker,
        "amd64",
        &[
            2 * 1024 * 1024,
            3 * 1024 * 1024,
            512 * 1024,
            4 * 1024 * 1024,
            1024 * 1024,
        ],
    );
    env.pusher.push_image(REPO, "8", &image);
    let c = cluster(&env, &garage, 3);
    let members = member_urls(&c);
    let owners: std::collections::BTreeSet<usize> = image.blob_digests().iter().map(|d| owner(&members, d)).collect();
    assert!(
        owners.len() > 1,
        "the image's blobs have more than one owner: {owners:?}"
    );

    let name = format!("docker.io/{REPO}:8");
    let mark = env.upstream.mark();
    let pulls: Vec<_> = (0..8)
        .map(|i| {
            let sb = client(&c.replicas[i % 3]);
            let name = name.clone();
            std::thread::spawn(move || sb.skopeo_copy(&name, None))
        })
        .collect();
    for (i, p) in pulls.into_iter().enumerate() {
        let got = p.join().expect("pull thread");
        assert_pulled(
            &format!("pull {i} through replica {}", i % 3),
            &got,
            &image.manifest_digest,
        );
    }
    common::matrix::assert_cold(&env.upstream, mark, &image, "8 concurrent pulls over 3 replicas");
    let served_by_owners: u64 = c
        .replicas
        .iter()
        .map(|r| counter(r, "regmirror_peer_fetches_total{result=\"owner\"}"))
        .sum();
    assert!(served_by_owners > 0, "some blobs came from their owners");
    for r in &c.replicas {
        assert_eq!(
            counter(r, "regmirror_peer_fetches_total{result=\"fallback\"}"),
            0,
            "no owner failed to answer:\n{}",
            r.log()
        );
    }
}

#[test]
fn a_stopped_owner_costs_one_fetch_by_the_asker_and_forged_peers_are_refused() {
    let garage = GarageCluster::start(3, "regmirror-owner-down");
    let env = UpstreamEnv::start(UpstreamEnvOpts::default());
    let mut c = cluster(&env, &garage, 3);
    let members = member_urls(&c);
    // An image with a blob the third replica owns (random content: a few
    // tries find one).
    let image = (0..30)
        .map(|_| common::images::build_image(Format::Oci, "amd64", &[200 * 1024, 300 * 1024]))
        .find(|img| img.blob_digests().iter().any(|d| owner(&members, d) == 2))
        .expect("an image with a blob the third replica owns");
    let owned_by_stopped = image.blob_digests().iter().filter(|d| owner(&members, d) == 2).count() as u64;
    env.pusher.push_image(REPO, "down", &image);
    c.replicas[2].stop();

    let mark = env.upstream.mark();
    let name = format!("docker.io/{REPO}:down");
    assert_pulled(
        "through A with C stopped",
        &client(&c.replicas[0]).skopeo_copy(&name, None),
        &image.manifest_digest,
    );
    common::matrix::assert_cold(&env.upstream, mark, &image, "with the owner of some blobs stopped");
    assert_eq!(
        counter(&c.replicas[0], "regmirror_peer_fetches_total{result=\"fallback\"}"),
        owned_by_stopped,
        "each blob the stopped replica owns was fetched by A itself"
    );

    // A client posing as a replica is refused, logged and counted.
    let a = &c.replicas[0];
    let d = &image.blob_digests()[0];
    let resp = common::block_on(async {
        reqwest::Client::new()
            .get(format!("{}/v2/dockerhub/{REPO}/blobs/{d}", a.http_url()))
            .header("x-regmirror-peer", "1700000000.00ff")
            .send()
            .await
            .expect("request")
    });
    assert_eq!(resp.status(), 401);
    assert_eq!(counter(a, "regmirror_peer_refused_total"), 1);
    assert!(
        a.log().contains("refused a request signed as a replica"),
        "logged:\n{}",
        a.log()
    );
}
