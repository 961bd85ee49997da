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
use common::matrix::{assert_pulled, assert_refused, assert_warm};
use common::regmirror::{Config, Regmirror};
use common::{alloc_ip, UpstreamEnv, UpstreamEnvOpts, UPSTREAM_HOST};

use std::net::IpAddr;

const REPO: &str = "library/replicated";

fn replica(env: &UpstreamEnv, garage: &GarageCluster, node: usize, ca_dir: &std::path::Path) -> Regmirror {
    replica_on(env, garage, node, ca_dir, "e2e")
}

fn replica_on(
    env: &UpstreamEnv,
    garage: &GarageCluster,
    node: usize,
    ca_dir: &std::path::Path,
    prefix: &str,
) -> Regmirror {
    let mut cfg = Config::new(alloc_ip()).with_standard_upstreams(UPSTREAM_HOST, env.upstream.ip, &env.ca_file);
    cfg.cache_extra = garage.cache_keys(node, prefix);
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
    cluster_on(env, garage, n, dir, &ca, "cluster", "")
}

/// [`cluster`] on keys under `prefix`, with `cache_extra` added to `[cache]`.
fn cluster_on(
    env: &UpstreamEnv,
    garage: &GarageCluster,
    n: usize,
    dir: tempfile::TempDir,
    ca: &std::path::Path,
    prefix: &str,
    cache_extra: &str,
) -> Cluster {
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "a cluster secret of some length\n").unwrap();
    let ips: Vec<IpAddr> = (0..n).map(|_| alloc_ip()).collect();
    let peers: Vec<String> = ips.iter().map(|ip| format!("\"http://{ip}:5000\"")).collect();
    let replicas = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            let mut cfg = Config::new(*ip).with_standard_upstreams(UPSTREAM_HOST, env.upstream.ip, &env.ca_file);
            cfg.cache_extra = garage.cache_keys(i % garage.len(), prefix) + cache_extra;
            cfg.ca_dir = Some(ca.to_path_buf());
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

/// Upstream GETs of the manifest `digest` among `entries`.
fn manifest_gets(entries: &[common::upstream::AccessEntry], digest: &str) -> usize {
    entries
        .iter()
        .filter(|e| e.method == "GET" && e.manifest_ref() == Some(digest))
        .count()
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
    let entries = common::matrix::assert_cold(&env.upstream, mark, &image, "8 concurrent pulls over 3 replicas");
    // The tag is asked by every replica (a HEAD); the manifest it names is
    // content, fetched once for the cluster like the blobs.
    let manifest_gets = manifest_gets(&entries, &image.manifest_digest);
    assert_eq!(
        manifest_gets,
        1,
        "upstream GETs of the manifest by digest: {:#?}",
        entries
            .iter()
            .filter(|e| e.manifest_ref().is_some())
            .collect::<Vec<_>>()
    );
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
    // An image whose manifest and some blob the third replica owns
    // (random content: a few tries find one).
    let image = (0..60)
        .map(|_| common::images::build_image(Format::Oci, "amd64", &[200 * 1024, 300 * 1024]))
        .find(|img| {
            owner(&members, &img.manifest_digest) == 2 && img.blob_digests().iter().any(|d| owner(&members, d) == 2)
        })
        .expect("an image with a manifest and a blob the third replica owns");
    // Blobs and the manifest alike are asked of their owner.
    let content = image.blob_digests().into_iter().chain([image.manifest_digest.clone()]);
    let owned_by_stopped = content.filter(|d| owner(&members, d) == 2).count() as u64;
    env.pusher.push_image(REPO, "down", &image);
    c.replicas[2].stop();

    let mark = env.upstream.mark();
    let name = format!("docker.io/{REPO}:down");
    assert_pulled(
        "through A with C stopped",
        &client(&c.replicas[0]).skopeo_copy(&name, None),
        &image.manifest_digest,
    );
    let entries = common::matrix::assert_cold(&env.upstream, mark, &image, "with the owner of some blobs stopped");
    let manifest_gets = manifest_gets(&entries, &image.manifest_digest);
    assert_eq!(
        manifest_gets, 1,
        "A fetched the manifest the stopped replica owns itself"
    );
    assert_eq!(
        counter(&c.replicas[0], "regmirror_peer_fetches_total{result=\"fallback\"}"),
        owned_by_stopped,
        "each digest the stopped replica owns was fetched by A itself"
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

/// `regmirror cache ARGS` with a replica's config (the bucket's keys and
/// credentials): its stdout, or a panic with what it said.
fn cache_cmd(rm: &Regmirror, garage: &GarageCluster, args: &[&str]) -> String {
    let out = std::process::Command::new(common::regmirror::binary())
        .arg("cache")
        .args(args)
        .arg("--config")
        .arg(&rm.config_path)
        .envs(garage.credentials_env())
        .output()
        .expect("run regmirror cache");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "regmirror cache {args:?}: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn total_bytes(du: &str) -> u64 {
    du.lines()
        .find_map(|l| l.strip_prefix("total_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no total_bytes in: {du}"))
}

#[test]
fn one_replica_keeps_the_bucket_under_its_bound_and_the_cache_commands_see_the_bucket() {
    const MIB: usize = 1024 * 1024;
    let garage = GarageCluster::start(3, "regmirror-bound");
    let env = UpstreamEnv::start(UpstreamEnvOpts::default());
    let old = common::images::build_image(Format::Oci, "amd64", &[3 * MIB]);
    let new = common::images::build_image(Format::Oci, "amd64", &[3 * MIB]);
    env.pusher.push_image(REPO, "old", &old);
    env.pusher.push_image(REPO, "new", &new);
    let (old_name, new_name) = (format!("docker.io/{REPO}:old"), format!("docker.io/{REPO}:new"));

    // Filled by a replica without a bound, the older image first.
    let dir = common::tempdir("bound-");
    let ca = dir.path().join("ca");
    let mut filler = replica_on(&env, &garage, 0, &ca, "bound");
    assert_pulled(
        "old",
        &client(&filler).skopeo_copy(&old_name, None),
        &old.manifest_digest,
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_pulled(
        "new",
        &client(&filler).skopeo_copy(&new_name, None),
        &new.manifest_digest,
    );
    let before = total_bytes(&cache_cmd(&filler, &garage, &["du"]));
    assert!(before >= (6 * MIB) as u64, "the bucket holds both images: {before}");
    let listed = cache_cmd(&filler, &garage, &["ls"]);
    assert!(
        listed.contains("library/replicated") && listed.contains("old") && listed.contains("new"),
        "cache ls lists the bucket's tags:\n{listed}"
    );
    // With the bytes each tag reaches in the bucket and its last use there.
    let rows: Vec<serde_json::Value> = serde_json::from_str(&cache_cmd(&filler, &garage, &["ls", "--json"])).unwrap();
    let row = |tag: &str| {
        rows.iter()
            .find(|r| r["tag"] == tag)
            .unwrap_or_else(|| panic!("no {tag} row: {rows:#?}"))
            .clone()
    };
    let (old_row, new_row) = (row("old"), row("new"));
    for r in [&old_row, &new_row] {
        assert!(r["size"].as_u64().unwrap() > (3 * MIB) as u64, "the tag's bytes: {r}");
    }
    assert!(
        new_row["last_used_ms"].as_u64().unwrap() > old_row["last_used_ms"].as_u64().unwrap(),
        "the newer pull is the later use: {old_row} {new_row}"
    );
    assert!(cache_cmd(&filler, &garage, &["verify"]).contains("0 mismatched"));
    filler.stop();

    // Three replicas with a 5 MiB bound: one of them evicts, the older
    // image's layer first, down to 90%.
    let c = cluster_on(&env, &garage, 3, dir, &ca, "bound", "bucket_max_size = \"5MiB\"\n");
    let evicted = |r: &Regmirror| counter(r, "regmirror_bucket_evicted_blobs_total");
    assert!(
        common::wait_until(std::time::Duration::from_secs(30), || c
            .replicas
            .iter()
            .any(|r| evicted(r) > 0)),
        "a replica evicted from the bucket within 30 s"
    );
    std::thread::sleep(std::time::Duration::from_secs(1));
    let evictors: Vec<usize> = (0..3).filter(|&i| evicted(&c.replicas[i]) > 0).collect();
    assert_eq!(evictors.len(), 1, "exactly one replica evicts: {evictors:?}");
    let after = total_bytes(&cache_cmd(&c.replicas[0], &garage, &["du"]));
    assert!(after <= (5 * MIB) as u64 / 10 * 9, "under 90% of the bound: {after}");

    // The newer image is still in the bucket; the older one's layer comes
    // from upstream again.
    let mark = env.upstream.mark();
    assert_pulled(
        "new, after eviction",
        &client(&c.replicas[1]).skopeo_copy(&new_name, None),
        &new.manifest_digest,
    );
    assert_warm(&env.upstream, mark, REPO, "the newer image survived eviction");
    let mark = env.upstream.mark();
    assert_pulled(
        "old, after eviction",
        &client(&c.replicas[2]).skopeo_copy(&old_name, None),
        &old.manifest_digest,
    );
    let fetched = env.upstream.blob_fetches_since(mark);
    assert_eq!(
        fetched.get(&old.layers[0].digest),
        Some(&1),
        "the evicted layer is fetched again: {fetched:?}"
    );

    // gc --to 0 on the bucket empties it (nothing is pushed here).
    cache_cmd(&c.replicas[0], &garage, &["gc", "--to", "0"]);
    assert_eq!(total_bytes(&cache_cmd(&c.replicas[0], &garage, &["du"])), 0);

    // An object whose bytes are not its key's digest (written behind
    // regmirror's back): verify names it, fails, and takes it out of blobs/.
    let claimed = common::sha256_digest(b"what the key claims");
    let url = format!(
        "{}/{}/bound/blobs/sha256/{}",
        garage.endpoint(0),
        garage.bucket,
        &claimed["sha256:".len()..]
    );
    let put = std::process::Command::new("curl")
        .args(["-sS", "-f", "-X", "PUT", "--aws-sigv4", "aws:amz:garage:s3", "--user"])
        .arg(format!("{}:{}", common::garage::KEY_ID, common::garage::SECRET_KEY))
        .args([
            "-H",
            "x-amz-content-sha256: UNSIGNED-PAYLOAD",
            "--data-binary",
            "other bytes",
            &url,
        ])
        .output()
        .expect("curl");
    assert!(
        put.status.success(),
        "PUT the corrupt object: {}",
        String::from_utf8_lossy(&put.stderr)
    );
    assert!(total_bytes(&cache_cmd(&c.replicas[0], &garage, &["du"])) > 0);
    let verify = std::process::Command::new(common::regmirror::binary())
        .args(["cache", "verify", "--config"])
        .arg(&c.replicas[0].config_path)
        .envs(garage.credentials_env())
        .output()
        .expect("regmirror cache verify");
    let said = String::from_utf8_lossy(&verify.stdout);
    assert!(!verify.status.success(), "verify fails on a mismatch: {said}");
    assert!(
        said.contains(&format!("MISMATCH {claimed}")) && said.contains("quarantine/"),
        "{said}"
    );
    assert_eq!(
        total_bytes(&cache_cmd(&c.replicas[0], &garage, &["du"])),
        0,
        "out of blobs/"
    );
}

#[test]
fn a_private_image_one_replica_cached_is_served_by_another_only_with_the_clients_own_login() {
    let garage = GarageCluster::start(3, "regmirror-private");
    let env = UpstreamEnv::start(UpstreamEnvOpts {
        policy: common::token_server::TokenPolicy {
            user: Some((common::PUSH_USER.into(), common::PUSH_PASSWORD.into())),
            private_prefixes: vec!["private/".into()],
            ..Default::default()
        },
        ..Default::default()
    });
    let image = common::images::build_image(Format::Oci, "amd64", &[400 * 1024, 700 * 1024]);
    env.pusher.push_image("private/app", "1", &image);
    let c = cluster(&env, &garage, 3);
    let name = "docker.io/private/app:1";
    let creds = format!("{}:{}", common::PUSH_USER, common::PUSH_PASSWORD);
    let with_login = ["--src-creds", creds.as_str()];

    let mark = env.upstream.mark();
    let pulled = client(&c.replicas[0]).skopeo_copy_opts(name, None, &with_login);
    assert_pulled("with the login, through A", &pulled, &image.manifest_digest);
    common::matrix::assert_cold(&env.upstream, mark, &image, "private, cold through A");

    // Cached in the bucket, marked private: anonymous clients of the other
    // replicas are refused, by tag and by digest.
    assert_refused(&client(&c.replicas[1]).skopeo_copy_opts(name, None, &[]).0);
    let by_digest = format!("docker.io/private/app@{}", image.manifest_digest);
    assert_refused(&client(&c.replicas[2]).skopeo_copy_opts(&by_digest, None, &[]).0);

    // With the login, another replica serves it from the bucket.
    let mark = env.upstream.mark();
    let pulled = client(&c.replicas[1]).skopeo_copy_opts(name, None, &with_login);
    assert_pulled("with the login, through B", &pulled, &image.manifest_digest);
    let blobs = env.upstream.blob_fetches_since(mark);
    assert!(blobs.is_empty(), "B fetched no blob upstream: {blobs:?}");
}

#[test]
fn a_push_through_one_replica_is_pulled_through_another() {
    use common::push::{dead_upstream_config, Auth, Local, Namespace, ACCEPT_MANIFESTS, ADMIN, CI, ROLES};
    let garage = GarageCluster::start(3, "regmirror-push");
    let namespaces = [Namespace {
        namespace: "private",
        users: &[ADMIN, CI],
        keys: ROLES,
    }];
    let start = |node: usize| {
        let mut cfg = dead_upstream_config();
        cfg.cache_extra = garage.cache_keys(node, "push");
        for (k, v) in garage.credentials_env() {
            cfg.env.push((k.into(), v.into()));
        }
        Local::start_with(cfg, &namespaces)
    };
    let (a, b) = (start(0), start(1));
    let rt = common::runtime();
    let pushed = rt.block_on(a.push_image("private/app", "1.0", 2, &Auth::user(ADMIN)));

    rt.block_on(async {
        let got = b
            .request("GET", "/v2/private/app/manifests/1.0", &Auth::user(CI))
            .header("accept", ACCEPT_MANIFESTS)
            .send()
            .await
            .unwrap();
        assert_eq!(got.status(), 200, "B serves A's push by tag");
        assert_eq!(
            got.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()),
            Some(pushed.digest.as_str())
        );
        assert_eq!(got.bytes().await.unwrap(), pushed.manifest);
        for layer in &pushed.layers {
            let d = common::sha256_digest(layer);
            let got = b
                .request("GET", &format!("/v2/private/app/blobs/{d}"), &Auth::user(CI))
                .send()
                .await
                .unwrap();
            assert_eq!(got.status(), 200, "B serves A's pushed layer {d}");
            assert_eq!(&got.bytes().await.unwrap()[..], &layer[..]);
        }
        let tags = b
            .request("GET", "/v2/private/app/tags/list", &Auth::user(CI))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(tags.contains("\"1.0\""), "B lists A's tag: {tags}");
        let anonymous = b
            .request("GET", "/v2/private/app/manifests/1.0", &Auth::None)
            .send()
            .await
            .unwrap();
        assert_eq!(anonymous.status(), 401, "B refuses an anonymous pull of the push");
    });
}

#[test]
fn an_upload_session_opened_on_one_replica_goes_on_through_the_others() {
    use common::push::{dead_upstream_config, Auth, Local, Namespace, ADMIN, CI, ROLES};
    let garage = GarageCluster::start(3, "regmirror-sessions");
    let dir = common::tempdir("sessions-");
    let (secret, ca) = (dir.path().join("secret"), dir.path().join("ca"));
    std::fs::write(&secret, "a cluster secret of some length\n").unwrap();
    let configs: Vec<Config> = (0..3).map(|_| dead_upstream_config()).collect();
    let peers: Vec<String> = configs.iter().map(|c| format!("\"http://{}\"", c.http)).collect();
    let namespaces = [Namespace {
        namespace: "private",
        users: &[ADMIN, CI],
        keys: ROLES,
    }];
    let mut replicas: Vec<Local> = configs
        .into_iter()
        .enumerate()
        .map(|(i, mut cfg)| {
            cfg.cache_extra = garage.cache_keys(i, "sessions");
            // One token key for all (beside the CA): a login on one replica holds on every other.
            cfg.ca_dir = Some(ca.clone());
            cfg.extra_toml += &format!(
                "[cluster]\nself = \"http://{}\"\npeers = [{}]\nsecret_file = {:?}\n",
                cfg.http,
                peers.join(", "),
                secret.display().to_string()
            );
            for (k, v) in garage.credentials_env() {
                cfg.env.push((k.into(), v.into()));
            }
            Local::start_with(cfg, &namespaces)
        })
        .collect();
    let rt = common::runtime();
    let admin = Auth::user(ADMIN);
    rt.block_on(async {
        // Opened on A, written through B and C, its state asked of C, and
        // finished through B: each request lands on another replica.
        let blob: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let d = common::sha256_digest(&blob);
        let opened = replicas[0].start_upload("private/app", &admin).await;
        opened.expect(202);
        let location = opened.header("location").expect("a Location").to_string();
        let (first, rest) = blob.split_at(1_000_000);
        let r = replicas[1].patch_chunk(&location, 0, first, &admin).await;
        assert_eq!(
            r.expect(202).range_end(),
            999_999,
            "B wrote the first chunk into A's session"
        );
        let r = replicas[2].get(&location, &admin).await;
        assert_eq!(r.expect(204).range_end(), 999_999, "C reports A's session");
        let r = replicas[2].patch_chunk(&location, 1_000_000, rest, &admin).await;
        assert_eq!(r.expect(202).range_end(), blob.len() as u64 - 1);
        replicas[1]
            .put_upload(&replicas[1].url(&location), &d, &[], &admin)
            .await
            .expect(201);
        let got = replicas[2]
            .get(&format!("/v2/private/app/blobs/{d}"), &Auth::user(CI))
            .await;
        got.expect(200);
        assert_eq!(got.body.len(), blob.len());
        assert_eq!(
            common::sha256_digest(&got.body),
            d,
            "the blob pushed through three replicas"
        );

        // A real client behind a load balancer without affinity (nginx,
        // round robin): each of skopeo's requests may land on another
        // replica, its upload sessions included.
        let lb = RoundRobin::start(&replicas.iter().map(|r| r.rm.http_url()).collect::<Vec<_>>());
        let image = common::images::build_image(Format::Oci, "amd64", &[2_500_000, 600_000]);
        let sb = common::clients::Sandbox::new(replicas[0].rm.ip(), &[], &replicas[0].rm.ca_pem);
        let layout = common::images::write_layout(&sb.path().join("layout"), &image);
        let policy = sb.path().join("policy.json").display().to_string();
        let creds = format!("{}:{}", ADMIN.0, ADMIN.1);
        let pushed = sb.run(&[
            "skopeo",
            "--policy",
            &policy,
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            &creds,
            &format!("oci:{}:1", layout.display()),
            &format!("docker://{}/private/balanced:1", lb.addr),
        ]);
        pushed.assert_ok();
        let spread = lb.sessions_spread();
        assert!(
            spread > 0,
            "some session's requests reached two replicas:\n{}",
            lb.log()
        );
        let got = replicas[2].get_manifest("private/balanced", "1", &Auth::user(CI)).await;
        got.expect(200);
        assert_eq!(
            got.header("docker-content-digest"),
            Some(image.manifest_digest.as_str())
        );
        for l in &image.layers {
            let blob = replicas[1]
                .get(&format!("/v2/private/balanced/blobs/{}", l.digest), &Auth::user(CI))
                .await;
            assert_eq!(blob.expect(200).body, l.data, "layer {} as pushed", l.digest);
        }
        drop(lb);

        // A session of a replica that went away is unknown (the client
        // starts the blob again), never half-written.
        let opened = replicas[0].start_upload("private/app", &admin).await;
        let location = opened.expect(202).header("location").expect("a Location").to_string();
        replicas[1].patch_chunk(&location, 0, first, &admin).await.expect(202);
        replicas[0].rm.stop();
        replicas[1]
            .patch_chunk(&location, 1_000_000, rest, &admin)
            .await
            .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
        // An id no member's tag names is unknown too, and is not passed on.
        replicas[1]
            .get(
                "/v2/private/app/blobs/uploads/0badc0de-00000000000000000000000000000000",
                &admin,
            )
            .await
            .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    });
    replicas.clear();
}

/// nginx in front of `backends` (`http://IP:PORT`), round robin, no
/// affinity, bodies streamed; its access log names the backend of each
/// request. Stopped on drop.
struct RoundRobin {
    addr: String,
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl RoundRobin {
    fn start(backends: &[String]) -> RoundRobin {
        let dir = common::tempdir("round-robin-");
        let addr = format!("{}:5000", alloc_ip());
        let servers: String = backends
            .iter()
            .map(|b| format!("    server {};\n", b.trim_start_matches("http://")))
            .collect();
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 256; }}\n\
             http {{\n  log_format lb '$request_method $uri $upstream_addr $status';\n  access_log {d}/access.log lb;\n\
             client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
             upstream replicas {{\n{servers}  }}\n\
             server {{\n    listen {addr};\n    client_max_body_size 0;\n    proxy_request_buffering off;\n    proxy_buffering off;\n\
             location / {{ proxy_pass http://replicas; proxy_http_version 1.1; proxy_set_header Host $http_host; }}\n  }}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = std::process::Command::new("nginx")
            .args(["-c", &path.display().to_string(), "-p", &d.to_string()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nginx");
        let lb = RoundRobin { addr, child, dir };
        let up = common::wait_until(std::time::Duration::from_secs(10), || {
            std::net::TcpStream::connect(&lb.addr).is_ok()
        });
        assert!(up, "nginx did not listen on {}", lb.addr);
        lb
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// Upload sessions whose requests (PATCH, PUT) went to more than one
    /// replica.
    fn sessions_spread(&self) -> usize {
        let mut by_session: std::collections::HashMap<String, std::collections::HashSet<String>> = Default::default();
        for line in self.log().lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if let [method, uri, upstream, _] = f.as_slice() {
                if let Some((_, id)) = uri.split_once("/blobs/uploads/") {
                    if !id.is_empty() && (*method == "PATCH" || *method == "PUT") {
                        by_session
                            .entry(id.to_string())
                            .or_default()
                            .insert(upstream.to_string());
                    }
                }
            }
        }
        by_session.values().filter(|u| u.len() > 1).count()
    }
}

impl Drop for RoundRobin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A webhook receiver that keeps every request body and answers 200.
fn receiver() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind((alloc_ip(), 0)).expect("bind receiver");
    let addr = listener.local_addr().unwrap();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let keep = keep.clone();
            std::thread::spawn(move || {
                let mut w = conn.try_clone().expect("clone socket");
                let mut r = BufReader::new(conn);
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    if let Ok(v) = serde_json::from_slice(&body) {
                        keep.lock().unwrap().push(v);
                    }
                    if w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, got)
}

#[test]
fn content_leaving_the_bucket_is_an_evict_event_and_a_local_copy_leaving_the_read_cache_is_not() {
    const KIB: usize = 1024;
    let garage = GarageCluster::start(3, "regmirror-events");
    let env = UpstreamEnv::start(UpstreamEnvOpts::default());
    let (addr, got) = receiver();
    let image = common::images::build_image(Format::Oci, "amd64", &[700 * KIB, 700 * KIB, 700 * KIB]);
    env.pusher.push_image(REPO, "ev", &image);
    let mut cfg = Config::new(alloc_ip()).with_standard_upstreams(UPSTREAM_HOST, env.upstream.ip, &env.ca_file);
    // A local read cache too small for the image, a bucket bound that
    // holds less than it: both evict.
    cfg.max_size = "1MiB".into();
    cfg.cache_extra = garage.cache_keys(0, "events") + "bucket_max_size = \"1MiB\"\n";
    cfg.extra_toml += &format!("[[webhook]]\nurl = \"http://{addr}/hook\"\nevents = [\"evict\", \"pull\"]\n");
    for (k, v) in garage.credentials_env() {
        cfg.env.push((k.into(), v.into()));
    }
    let rm = Regmirror::start(cfg);
    let name = format!("docker.io/{REPO}:ev");
    assert_pulled("pull", &client(&rm).skopeo_copy(&name, None), &image.manifest_digest);
    let of_type = |t: &str| {
        got.lock()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == format!("io.regmirror.{t}"))
            .count() as u64
    };
    assert!(
        common::wait_until(std::time::Duration::from_secs(30), || {
            counter(&rm, "regmirror_bucket_evicted_blobs_total") > 0
                && counter(&rm, "regmirror_evicted_blobs_total") > 0
                && of_type("pull") > 0
        }),
        "both the read cache and the bucket evicted, and the pull was delivered: {:?}",
        got.lock().unwrap()
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    let bucket = counter(&rm, "regmirror_bucket_evicted_blobs_total");
    assert_eq!(
        of_type("evict"),
        bucket,
        "one evict event per blob that left the bucket, none for local copies ({} evicted locally)",
        counter(&rm, "regmirror_evicted_blobs_total")
    );
}
