//! A cluster member killed in the middle of a download (SIGKILL, as a node
//! lost), with two regmirror processes on a real Garage cluster and an
//! in-process upstream whose body can be held half-way: the client of the
//! surviving replica still gets the whole blob, verified, and the bucket
//! never shows part of it.

mod common;
mod fake_upstream;

use std::time::Duration;

use common::garage::GarageCluster;
use common::regmirror::{Config, Regmirror, UpstreamEntry, DOCKER_HOSTS};
use fake_upstream::{bytes_for, FakeUpstream};

#[test]
fn an_owner_killed_mid_download_costs_the_asker_a_resume_and_leaves_nothing_partial() {
    let rt = common::runtime();
    let garage = GarageCluster::start(3, "regmirror-killed");
    let fake = rt.block_on(FakeUpstream::start(&format!("{}:0", common::alloc_ip())));
    let (a_ip, b_ip) = (common::alloc_ip(), common::alloc_ip());
    let members = [format!("http://{a_ip}:5000"), format!("http://{b_ip}:5000")];

    // A blob B owns, held half-way by upstream until the gate opens.
    let owner_is_b = |data: &[u8]| {
        let d = regmirror::reference::Digest::of(data);
        let w = |m: &str| regmirror::cluster::weight(&url::Url::parse(m).unwrap(), &d);
        w(&members[1]) > w(&members[0])
    };
    let data = (0..50)
        .map(|i| bytes_for(&format!("killed-{i}"), 6 * 1024 * 1024))
        .find(|d| owner_is_b(d))
        .expect("a blob B owns");
    let (digest, path) = fake.add_blob("library/big", &data);
    fake.gate(&path);

    let dir = common::tempdir("killed-");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "the secret both replicas share").unwrap();
    let start = |ip: std::net::IpAddr, node: usize| {
        let mut cfg =
            Config::new(ip).with_upstream(UpstreamEntry::new("docker.io", DOCKER_HOSTS, &fake.url(), "dockerhub"));
        cfg.cache_extra = garage.cache_keys(node, "killed");
        cfg.ca_dir = Some(dir.path().join("ca"));
        cfg.extra_toml += &format!(
            "[cluster]\nself = \"http://{ip}:5000\"\npeers = [\"{}\", \"{}\"]\nsecret_file = {:?}\n",
            members[0],
            members[1],
            secret.display().to_string()
        );
        for (k, v) in garage.credentials_env() {
            cfg.env.push((k.into(), v.into()));
        }
        Regmirror::start(cfg)
    };
    let a = start(a_ip, 0);
    let b = start(b_ip, 1);

    // A's client asks; A asks B, B asks upstream, and the body stops half-way.
    let url = format!("{}/v2/dockerhub/library/big/blobs/{digest}", a.http_url());
    let pull = std::thread::spawn(move || {
        common::block_on(async {
            let resp = reqwest::Client::new().get(&url).send().await?;
            let status = resp.status();
            Ok::<_, reqwest::Error>((status, resp.bytes().await?))
        })
    });
    assert!(
        common::wait_until(Duration::from_secs(20), || fake.body_bytes(&path) > 0),
        "B started the download"
    );
    std::thread::sleep(Duration::from_millis(500));

    // B dies; upstream lets the rest through.
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &b.pid().to_string()])
        .status();
    std::thread::sleep(Duration::from_millis(300));
    fake.open_gate();

    let (status, body) = pull.join().expect("pull thread").expect("the pull through A completes");
    assert_eq!(status, 200);
    assert_eq!(body.len(), data.len(), "the whole blob");
    assert_eq!(common::sha256_digest(&body), digest, "verified bytes");
    let ranges = fake.ranges(&path);
    assert!(
        ranges
            .iter()
            .any(|r| r.as_deref().is_some_and(|r| r.starts_with("bytes=") && r != "bytes=0-")),
        "A resumed from upstream where B's stream broke: {ranges:?}"
    );
    assert!(a.log().contains("owner did not serve it"), "A fell back:\n{}", a.log());

    // The bucket holds the blob whole or not at all.
    let creds = dir.path().join("credentials");
    std::fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            common::garage::KEY_ID,
            common::garage::SECRET_KEY
        ),
    )
    .unwrap();
    let bucket = regmirror::cache::s3::S3Store::connect(&regmirror::config::BucketSettings {
        bucket: garage.bucket.clone(),
        endpoint: Some(url::Url::parse(&garage.endpoint(2)).unwrap()),
        region: Some(common::garage::REGION.into()),
        prefix: "killed/".into(),
        credentials_file: Some(creds),
        max_size: None,
    })
    .unwrap();
    let d = regmirror::reference::Digest::parse(&digest).unwrap();
    rt.block_on(async {
        use futures_util::TryStreamExt;
        use regmirror::cache::blob_store::StoredBlob;
        if let Some(blob) = bucket.open_blob(&d).await.unwrap() {
            let size = blob.info().size;
            let chunks: Vec<bytes::Bytes> = Box::new(blob).read(0, size).try_collect().await.unwrap();
            assert_eq!(
                common::sha256_digest(&chunks.concat()),
                digest,
                "only whole content is visible"
            );
        }
    });

    // And A serves it again from what it kept.
    let again = common::block_on(async {
        reqwest::get(format!("{}/v2/dockerhub/library/big/blobs/{digest}", a.http_url()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
    });
    assert_eq!(common::sha256_digest(&again), digest);
    rt.block_on(fake.stop());
}
