//! `[[webhook]]` against a receiver on loopback: a cold pull, a warm pull
//! and an eviction arrive as signed CloudEvents with the right fields; with
//! the receiver down pulls go on at full speed, the events wait in the
//! queue and arrive once it is back, a full queue drops the oldest, an
//! upstream outage is an `upstream_down` and its end an `upstream_up`, and
//! a push to a local namespace is a `push`.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::images::Format;
use common::matrix::{assert_pulled, Stack};
use common::UpstreamEnvOpts;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

const SECRET: &str = "webhook-test-secret";

/// One POST the receiver got.
#[derive(Clone, Debug)]
struct Received {
    path: String,
    content_type: String,
    signature: String,
    body: Bytes,
    event: Value,
}

/// An HTTP receiver on a fixed loopback port that records every request and
/// answers 200. Dropping it closes the port and every connection to it, so
/// regmirror's pooled connections cannot keep delivering.
struct Receiver {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn listen(rt: &tokio::runtime::Runtime, addr: SocketAddr, log: Arc<Mutex<Vec<Received>>>) -> (Receiver, SocketAddr) {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(addr))
        .expect("bind the receiver");
    let addr = listener.local_addr().expect("receiver address");
    let task = rt.spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let log = log.clone();
            conns.spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let log = log.clone();
                    async move {
                        let header = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string()
                        };
                        let (path, content_type, signature) = (
                            req.uri().path().to_string(),
                            header("content-type"),
                            header("x-regmirror-signature"),
                        );
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let event = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        log.lock().unwrap().push(Received {
                            path,
                            content_type,
                            signature,
                            body,
                            event,
                        });
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (Receiver { task }, addr)
}

fn events(log: &Arc<Mutex<Vec<Received>>>, path: &str) -> Vec<Received> {
    log.lock().unwrap().iter().filter(|r| r.path == path).cloned().collect()
}

fn of_type<'a>(got: &'a [Received], kind: &str) -> Vec<&'a Value> {
    let t = format!("io.regmirror.{kind}");
    got.iter()
        .map(|r| &r.event)
        .filter(|e| e["type"] == t.as_str())
        .collect()
}

fn counter(s: &Stack, line_start: &str) -> f64 {
    s.rm.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(line_start))
        .map_or(0.0, |v| v.trim().parse().expect("a counter value"))
}

#[track_caller]
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    assert!(
        common::wait_until(Duration::from_secs(90), &mut done),
        "{what} within 90 s"
    );
}

#[test]
fn pulls_evictions_and_upstream_outages_reach_a_webhook_signed_and_survive_its_outage() {
    let rt = common::runtime();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (receiver, addr) = listen(&rt, "127.0.0.1:0".parse().unwrap(), log.clone());
    let dir = common::tempdir("webhook-");
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let hook = format!("http://{addr}/hook");
    let small = format!("http://{addr}/small");
    let mut s = Stack::start_with(UpstreamEnvOpts::default(), |mut cfg| {
        // Two images fit; a third pushes the oldest content out.
        cfg.max_size = "600KiB".into();
        cfg.extra_toml += &format!(
            "[[webhook]]\nurl = {hook:?}\nsecret_file = {:?}\n\n\
             [[webhook]]\nurl = {small:?}\nevents = [\"pull\"]\nqueue = 1\n",
            secret_file.display().to_string()
        );
        cfg
    });
    let client = s.client();
    let mac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());

    // Cold pull: a miss per blob and for the manifest, then the pull.
    let a = s.image("org/hook-a", Format::Oci);
    let name_a = "quay.io/org/hook-a:1";
    assert_pulled("cold", &client.skopeo_copy(name_a, None), &a.manifest_digest);
    let pulls_of_a = |got: &[Received]| {
        of_type(got, "pull")
            .into_iter()
            .filter(|e| e["data"]["repository"] == "org/hook-a")
            .count()
    };
    wait_for("the cold pull's event", || pulls_of_a(&events(&log, "/hook")) >= 1);
    let got = events(&log, "/hook");
    for r in &got {
        assert_eq!(r.content_type, "application/cloudevents+json");
        let hex = r
            .signature
            .strip_prefix("sha256=")
            .unwrap_or_else(|| panic!("no sha256= signature: {r:?}"));
        let sig = hex::decode(hex).expect("hex signature");
        ring::hmac::verify(&mac_key, &r.body, &sig).expect("the signature is the body's HMAC-SHA256 with the secret");
        assert_eq!(r.event["specversion"], "1.0");
        assert_eq!(r.event["datacontenttype"], "application/json");
        assert_eq!(r.event["source"], format!("regmirror://{}", s.name()).as_str());
        assert!(
            r.event["time"]
                .as_str()
                .is_some_and(|t| t.len() >= 20 && t.ends_with('Z')),
            "{:?}",
            r.event
        );
    }
    let ids: std::collections::HashSet<&str> = got.iter().filter_map(|r| r.event["id"].as_str()).collect();
    assert_eq!(ids.len(), got.len(), "every event has its own id");
    let pull = of_type(&got, "pull")[0];
    let data = &pull["data"];
    assert_eq!(data["repository"], "org/hook-a", "{pull}");
    assert_eq!(data["reference"], "1", "{pull}");
    assert_eq!(data["digest"], a.manifest_digest.as_str(), "{pull}");
    assert_eq!(data["mediaType"], a.media_type(), "{pull}");
    assert_eq!(data["upstream"], "quay.io", "{pull}");
    let client_ip: std::net::IpAddr = data["client"]
        .as_str()
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no client address: {pull}"));
    assert!(client_ip.is_loopback(), "{pull}");
    let misses: Vec<&str> = of_type(&got, "miss")
        .iter()
        .filter_map(|e| e["data"]["digest"].as_str())
        .collect();
    for blob in a.blob_digests() {
        assert!(misses.contains(&blob.as_str()), "no miss for blob {blob}: {misses:?}");
    }
    assert!(
        misses.contains(&a.manifest_digest.as_str()),
        "no miss for the manifest: {misses:?}"
    );
    let layer = &a.layers[0];
    let layer_miss = of_type(&got, "miss")
        .into_iter()
        .find(|e| e["data"]["digest"] == layer.digest.as_str())
        .unwrap();
    assert_eq!(layer_miss["data"]["size"], layer.data.len() as u64, "{layer_miss}");
    assert_eq!(layer_miss["data"]["repository"], "org/hook-a", "{layer_miss}");
    let position = |kind: &str, digest: &str| {
        got.iter()
            .position(|r| {
                r.event["type"] == format!("io.regmirror.{kind}").as_str() && r.event["data"]["digest"] == digest
            })
            .unwrap()
    };
    assert!(
        position("miss", &a.manifest_digest) < position("pull", &a.manifest_digest),
        "events arrive in the order they happened"
    );

    // Warm pull: another pull, no miss.
    let before = events(&log, "/hook").len();
    assert_pulled("warm", &client.skopeo_copy(name_a, None), &a.manifest_digest);
    wait_for("the warm pull's event", || pulls_of_a(&events(&log, "/hook")) >= 2);
    let got = events(&log, "/hook");
    let since = &got[before..];
    assert!(
        of_type(since, "miss").is_empty(),
        "a warm pull misses nothing: {since:?}"
    );
    let warm = of_type(since, "pull")[0];
    assert_eq!(warm["data"]["digest"], a.manifest_digest.as_str(), "{warm}");
    assert!(warm["id"] != pull["id"], "a new event, not the old one again");
    // The small webhook asked for pulls only.
    wait_for("pulls at the small webhook", || events(&log, "/small").len() >= 2);
    assert!(
        events(&log, "/small")
            .iter()
            .all(|r| r.event["type"] == "io.regmirror.pull" && r.signature.is_empty()),
        "only pulls, unsigned, at the small webhook"
    );

    // Eviction: a second and third image push A's content out.
    let b = s.image("org/hook-b", Format::Oci);
    assert_pulled(
        "second image",
        &client.skopeo_copy("quay.io/org/hook-b:1", None),
        &b.manifest_digest,
    );
    let c = s.image("org/hook-c", Format::Oci);
    assert_pulled(
        "third image",
        &client.skopeo_copy("quay.io/org/hook-c:1", None),
        &c.manifest_digest,
    );
    let a_blobs = a.blob_digests();
    wait_for("an eviction event for the first image's content", || {
        of_type(&events(&log, "/hook"), "evict")
            .iter()
            .any(|e| a_blobs.iter().any(|d| e["data"]["digest"] == d.as_str()))
    });
    let got = events(&log, "/hook");
    for e in of_type(&got, "evict") {
        assert!(
            e["data"]["size"].as_u64().is_some_and(|n| n > 0) && e["data"]["client"].is_null(),
            "{e}"
        );
    }
    assert!(
        counter(&s, "regmirror_evicted_blobs_total ") >= of_type(&got, "evict").len() as f64,
        "every evict event is an eviction"
    );
    // Everything so far delivered to the small webhook, so its queue is empty.
    wait_for("the third image's pull event", || {
        of_type(&events(&log, "/hook"), "pull")
            .iter()
            .any(|e| e["data"]["digest"] == c.manifest_digest.as_str())
    });
    let pulls_so_far = of_type(&events(&log, "/hook"), "pull").len();
    wait_for("every pull at the small webhook", || {
        events(&log, "/small").len() >= pulls_so_far
    });
    let small_before = events(&log, "/small").len();

    // Receiver down: pulls are not slowed; events wait in the queue.
    drop(receiver);
    let failed = format!("regmirror_webhook_deliveries_total{{webhook=\"{hook}\",result=\"failed\"}} ");
    let d = s.image("org/hook-d", Format::Oci);
    let started = Instant::now();
    assert_pulled(
        "receiver down",
        &client.skopeo_copy("quay.io/org/hook-d:1", None),
        &d.manifest_digest,
    );
    assert_pulled(
        "receiver down, warm",
        &client.skopeo_copy("quay.io/org/hook-d:1", None),
        &d.manifest_digest,
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "two pulls with the receiver down took {took:?}"
    );
    wait_for("failed deliveries counted", || counter(&s, &failed) >= 1.0);
    let dropped = format!("regmirror_webhook_dropped_total{{webhook=\"{small}\"}} ");
    assert!(
        counter(&s, &dropped) >= 1.0,
        "the small webhook (queue = 1) dropped the older of two pulls:\n{}",
        s.rm.metrics()
    );

    // Back on the same port: the queued events arrive, in order.
    let (_receiver, _) = listen(&rt, addr, log.clone());
    let pulls_of_d = |got: &[Received]| {
        of_type(got, "pull")
            .into_iter()
            .filter(|e| e["data"]["digest"] == d.manifest_digest.as_str())
            .count()
    };
    wait_for("both of the outage's pulls", || pulls_of_d(&events(&log, "/hook")) >= 2);
    let got = events(&log, "/hook");
    // In the order they happened: the cold pull's manifest miss, its pull,
    // the blobs' misses, then the warm pull.
    let at = |kind: &str, digest: &str, nth: usize| {
        got.iter()
            .enumerate()
            .filter(|(_, r)| {
                r.event["type"] == format!("io.regmirror.{kind}").as_str() && r.event["data"]["digest"] == digest
            })
            .nth(nth)
            .map(|(i, _)| i)
            .unwrap_or_else(|| panic!("the outage's {kind} #{nth} of {digest} never arrived"))
    };
    let (manifest_miss, cold_pull, warm_pull) = (
        at("miss", &d.manifest_digest, 0),
        at("pull", &d.manifest_digest, 0),
        at("pull", &d.manifest_digest, 1),
    );
    assert!(manifest_miss < cold_pull, "the outage's events arrive in order");
    for blob in d.blob_digests() {
        let miss = at("miss", &blob, 0);
        assert!(
            cold_pull < miss && miss < warm_pull,
            "the outage's events arrive in order"
        );
    }
    wait_for("the small webhook's newest pull", || {
        events(&log, "/small").len() > small_before
    });
    std::thread::sleep(Duration::from_secs(2));
    let small = events(&log, "/small");
    assert_eq!(
        small.len(),
        small_before + 1,
        "a queue of 1 kept only the newest of the outage's two pulls: {:?}",
        &small[small_before..]
    );
    assert_eq!(small[small_before].event["data"]["digest"], d.manifest_digest.as_str());
    let ok = format!("regmirror_webhook_deliveries_total{{webhook=\"{hook}\",result=\"ok\"}} ");
    assert!(counter(&s, &ok) >= got.len() as f64, "{}", s.rm.metrics());

    // Upstream down: the tag is served stale, and the outage is an event.
    s.env.upstream.stop();
    assert_pulled(
        "upstream down",
        &client.skopeo_copy("quay.io/org/hook-d:1", None),
        &d.manifest_digest,
    );
    wait_for("an upstream_down event", || {
        !of_type(&events(&log, "/hook"), "upstream_down").is_empty()
    });
    let got = events(&log, "/hook");
    let down = of_type(&got, "upstream_down")[0];
    assert_eq!(down["data"]["upstream"], "quay.io", "{down}");
    assert!(
        down["data"]["url"].as_str().is_some_and(|u| u.starts_with("https://"))
            && down["data"]["error"].as_str().is_some_and(|e| !e.is_empty())
            && down["data"]["client"].is_null(),
        "{down}"
    );

    // Back: the next request that reaches it is an `upstream_up`.
    s.env.upstream.restart();
    wait_for("an upstream_up event", || {
        // Each pull asks upstream for the tag; once the URL's back-off is
        // over, one of them gets through.
        let _ = client.skopeo_copy("quay.io/org/hook-d:1", None);
        !of_type(&events(&log, "/hook"), "upstream_up").is_empty()
    });
    let got = events(&log, "/hook");
    let up = of_type(&got, "upstream_up")[0];
    assert_eq!(up["data"]["upstream"], "quay.io", "{up}");
    assert_eq!(up["data"]["url"], down["data"]["url"], "{up}");
    s.rm.stop();
}

/// A push to a local namespace is a `push` event naming what was stored
/// and who pushed it.
#[test]
fn a_push_to_a_local_namespace_is_an_event() {
    use common::push::{dead_upstream_config, Auth, Local, Namespace, ADMIN, CI, ROLES};
    let rt = common::runtime();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (_receiver, addr) = listen(&rt, "127.0.0.1:0".parse().unwrap(), log.clone());
    let mut cfg = dead_upstream_config();
    cfg.extra_toml += &format!("[[webhook]]\nurl = \"http://{addr}/hook\"\nevents = [\"push\"]\n");
    let l = Local::start_with(
        cfg,
        &[Namespace {
            namespace: "private",
            users: &[ADMIN, CI],
            keys: ROLES,
        }],
    );
    let pushed = rt.block_on(l.push_image("private/app", "1.0", 1, &Auth::user(ADMIN)));
    wait_for("the push event", || !events(&log, "/hook").is_empty());
    let got = events(&log, "/hook");
    assert!(
        got.iter().all(|r| r.event["type"] == "io.regmirror.push"),
        "only pushes: {got:?}"
    );
    let data = &got[0].event["data"];
    assert_eq!(data["repository"], "private/app", "{data}");
    assert_eq!(data["reference"], "1.0", "{data}");
    assert_eq!(data["digest"], pushed.digest.as_str(), "{data}");
    assert_eq!(
        data["mediaType"], "application/vnd.oci.image.manifest.v1+json",
        "{data}"
    );
    assert_eq!(data["size"], pushed.manifest.len() as u64, "{data}");
    assert!(
        data["client"]
            .as_str()
            .and_then(|c| c.parse::<std::net::IpAddr>().ok())
            .is_some_and(|ip| ip.is_loopback()),
        "{data}"
    );
}
