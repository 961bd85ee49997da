//! The private registry beside the cache (issue 26): `[[local]]` namespaces
//! that accept pushes through the OCI distribution-spec push API, with
//! htpasswd (bcrypt) logins, kept in the same content-addressed store.
//!
//! Every test runs its own regmirror binary (own loopback address, own data
//! dir) with a namespace `private` and talks HTTP to it as a registry client
//! would: upload sessions (monolithic, chunked, streamed, resumed, cancelled),
//! manifests and indexes, tags, referrers, deletes, logins and tokens, sha512,
//! mounts (also of content the cache pulled), and the faults a registry meets
//! (wrong digests, clients that go away, two uploads of one blob, quotas,
//! abandoned sessions, too many sessions).
//!
//! Users (tests/common/push.rs): admin writes and reads, ci reads, dev is in
//! the file with neither role (where roles are listed), other is a fourth
//! login.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};

use common::images::{
    parse_challenge, random_bytes, DOCKER_CONFIG, DOCKER_LAYER, DOCKER_MANIFEST, OCI_INDEX, OCI_LAYER, OCI_MANIFEST,
};
use common::push::{
    config_blob, descriptor, files_under, image_manifest, image_manifest_typed, mangle_session, send,
    send_partial_then_drop, sha512_digest, with_query, Auth, Local, Namespace, Registry, Resp, ADMIN, CI, DEV, OTHER,
    ROLES,
};
use common::regmirror::Config;
use common::{alloc_ip, block_on, sha256_digest, UpstreamEnv, UpstreamEnvOpts, UPSTREAM_HOST};

const KIB: usize = 1024;
const REPO: &str = "private/app";
const EMPTY_CONFIG_TYPE: &str = "application/vnd.oci.empty.v1+json";

fn admin() -> Auth {
    Auth::user(ADMIN)
}

/// HEAD, GET and a ranged GET of `/v2/<repo>/blobs/<digest>` give `data`.
async fn assert_blob(reg: &Registry, repo: &str, digest: &str, data: &[u8], auth: &Auth) {
    let path = format!("/v2/{repo}/blobs/{digest}");
    let head = reg.head(&path, auth).await;
    head.expect(200);
    assert_eq!(
        head.header("content-length"),
        Some(data.len().to_string().as_str()),
        "{}: Content-Length",
        head.what
    );
    assert_eq!(head.header("docker-content-digest"), Some(digest), "{}", head.what);
    let get = reg.get(&path, auth).await;
    get.expect(200);
    assert_eq!(get.header("docker-content-digest"), Some(digest), "{}", get.what);
    assert!(
        get.body == data,
        "{}: body differs from what was pushed ({} bytes, want {})",
        get.what,
        get.body.len(),
        data.len()
    );
    let ranged = send(reg.request("GET", &path, auth).header("range", "bytes=10-19")).await;
    ranged.expect(206);
    assert_eq!(
        ranged.header("content-range"),
        Some(format!("bytes 10-19/{}", data.len()).as_str()),
        "{}",
        ranged.what
    );
    assert_eq!(ranged.body, data[10..20], "{}: ranged body", ranged.what);
}

/// HEAD answers 404 and GET 404 BLOB_UNKNOWN: the blob is not there.
async fn assert_no_blob(reg: &Registry, repo: &str, digest: &str, auth: &Auth, why: &str) {
    let path = format!("/v2/{repo}/blobs/{digest}");
    let head = reg.head(&path, auth).await;
    assert_eq!(head.status, 404, "{why}: {} answered {}", head.what, head.status);
    reg.get(&path, auth).await.expect_error(404, "BLOB_UNKNOWN");
}

/// GET by `reference` gives exactly `body`, typed `media_type`, named `digest`;
/// HEAD gives the same headers.
async fn assert_manifest(reg: &Registry, repo: &str, reference: &str, media_type: &str, body: &[u8], auth: &Auth) {
    let digest = sha256_digest(body);
    let get = reg.get_manifest(repo, reference, auth).await;
    get.expect(200);
    assert_eq!(
        get.header("content-type"),
        Some(media_type),
        "{}: Content-Type",
        get.what
    );
    assert_eq!(
        get.header("docker-content-digest"),
        Some(digest.as_str()),
        "{}",
        get.what
    );
    assert!(
        get.body == body,
        "{}: body is not byte-identical to the pushed manifest:\n{}\nwant:\n{}",
        get.what,
        get.text(),
        String::from_utf8_lossy(body)
    );
    let head = send(
        reg.request("HEAD", &format!("/v2/{repo}/manifests/{reference}"), auth)
            .header("accept", common::push::ACCEPT_MANIFESTS),
    )
    .await;
    head.expect(200);
    assert_eq!(head.header("content-type"), Some(media_type), "{}", head.what);
    assert_eq!(
        head.header("docker-content-digest"),
        Some(digest.as_str()),
        "{}",
        head.what
    );
    assert_eq!(
        head.header("content-length"),
        Some(body.len().to_string().as_str()),
        "{}",
        head.what
    );
}

/// The `WWW-Authenticate` parameters of a 401 (asserting a Bearer challenge).
#[track_caller]
fn bearer_challenge(r: &Resp) -> Vec<(String, String)> {
    let www = r
        .header("www-authenticate")
        .unwrap_or_else(|| panic!("{} → {}: no WWW-Authenticate: {:?}", r.what, r.status, r.headers));
    assert!(
        www.starts_with("Bearer "),
        "{}: challenge {www:?} is not Bearer",
        r.what
    );
    parse_challenge(www)
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// `GET <realm>?service=..&scope=..` with `auth`; the raw answer.
async fn token_request(reg: &Registry, realm: &str, service: &str, scope: &str, auth: &Auth) -> Resp {
    let url = with_query(&with_query(realm, "service", service), "scope", scope);
    send(common::push::with_auth(reg.client.get(url), auth)).await
}

/// The `token` of a 200 token answer (asserting the fields clients read).
#[track_caller]
fn token_of(r: &Resp) -> String {
    r.expect(200);
    let v = r.json();
    let token = v["token"]
        .as_str()
        .unwrap_or_else(|| panic!("{}: no token in {v}", r.what));
    assert!(!token.is_empty(), "{}: empty token", r.what);
    assert_eq!(
        v["access_token"].as_str(),
        Some(token),
        "{}: access_token differs from token: {v}",
        r.what
    );
    assert!(
        v["expires_in"].as_u64().is_some_and(|s| s > 0),
        "{}: expires_in must be a positive number: {v}",
        r.what
    );
    token.to_string()
}

/// Refused with 401 UNAUTHORIZED or 403 DENIED (a token lacking the action).
#[track_caller]
fn assert_refused(r: &Resp) {
    assert!(
        matches!(r.status, 401 | 403),
        "{} must be refused (401/403), got {}: {:?}",
        r.what,
        r.status,
        r.text()
    );
    let code = r.code();
    assert!(
        code == "UNAUTHORIZED" || code == "DENIED",
        "{}: code {code}, want UNAUTHORIZED or DENIED",
        r.what
    );
}

fn tags_of(r: &Resp) -> Vec<String> {
    let v = r.json();
    match &v["tags"] {
        Value::Null => Vec::new(),
        Value::Array(a) => a
            .iter()
            .map(|t| {
                t.as_str()
                    .unwrap_or_else(|| panic!("tag {t} is not a string"))
                    .to_string()
            })
            .collect(),
        other => panic!("{}: tags is {other}", r.what),
    }
}

/// The URL of a `Link: <url>; rel="next"` header, if any.
fn next_link(r: &Resp) -> Option<String> {
    let link = r.header("link")?;
    assert!(
        link.contains("rel=\"next\""),
        "{}: Link {link:?} without rel=\"next\"",
        r.what
    );
    let start = link.find('<').expect("Link <url>") + 1;
    let end = link.find('>').expect("Link <url>");
    Some(link[start..end].to_string())
}

// ------------------------------------------------------------ blob uploads

/// Every way the spec pushes a blob lands it byte for byte: POST then PUT
/// with the body; a single POST with `?digest=`; chunked PATCHes with a
/// status query in between (the client resumes from the `Range` it is told)
/// and the last chunk in the PUT; a streamed PATCH (no Content-Range, no
/// Content-Length) and a plain PATCH, then an empty PUT.
#[test]
fn blob_uploads_monolithic_single_post_chunked_resumed_and_streamed() {
    let l = Local::start(ROLES);
    let admin = admin();
    block_on(async {
        // POST, then PUT with the whole body.
        let r = l.start_upload(REPO, &admin).await;
        r.expect(202);
        assert!(r.header("location").is_some(), "{}: no Location", r.what);
        assert!(
            r.header("docker-upload-uuid").is_some(),
            "{}: no Docker-Upload-UUID: {:?}",
            r.what,
            r.headers
        );
        assert!(r.header("range").is_some(), "{}: no Range: {:?}", r.what, r.headers);
        let loc = l.location(&r);
        let data = random_bytes(100 * KIB);
        let digest = sha256_digest(&data);
        assert_no_blob(&l, REPO, &digest, &admin, "before the PUT").await;
        let put = l.put_upload(&loc, &digest, &data, &admin).await;
        put.expect(201);
        assert_eq!(
            put.header("docker-content-digest"),
            Some(digest.as_str()),
            "{}",
            put.what
        );
        let blob_url = l.location(&put);
        let at = l.get(&blob_url, &admin).await;
        at.expect(200);
        assert!(
            at.body == data,
            "the Location of the PUT ({blob_url}) must serve the blob"
        );
        assert_blob(&l, REPO, &digest, &data, &admin).await;

        // One POST with ?digest= and the body.
        let data = random_bytes(50 * KIB);
        let digest = sha256_digest(&data);
        let r = send(
            l.request("POST", &format!("/v2/{REPO}/blobs/uploads/?digest={digest}"), &admin)
                .header("content-type", "application/octet-stream")
                .body(data.clone()),
        )
        .await;
        r.expect(201);
        assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()), "{}", r.what);
        assert!(r.header("location").is_some(), "{}: no Location", r.what);
        assert_blob(&l, REPO, &digest, &data, &admin).await;

        // Chunked, with a status query before the second chunk, the last
        // chunk sent with the PUT.
        let data = random_bytes(300 * KIB);
        let digest = sha256_digest(&data);
        let third = 100 * KIB;
        let mut loc = l.session(REPO, &admin).await;
        let r = l.patch_chunk(&loc, 0, &data[..third], &admin).await;
        r.expect(202);
        assert_eq!(
            r.range_end(),
            third as u64 - 1,
            "{}: Range after the first chunk",
            r.what
        );
        loc = l.location(&r);
        let status = l.get(&loc, &admin).await;
        status.expect(204);
        let resume_at = status.range_end() + 1;
        assert_eq!(
            resume_at, third as u64,
            "{}: the status query must report the first chunk",
            status.what
        );
        loc = l.location(&status);
        let r = l.patch_chunk(&loc, resume_at, &data[third..2 * third], &admin).await;
        r.expect(202);
        assert_eq!(r.range_end(), 2 * third as u64 - 1, "{}", r.what);
        loc = l.location(&r);
        assert_no_blob(&l, REPO, &digest, &admin, "mid-upload").await;
        let put = send(
            l.request("PUT", &with_query(&loc, "digest", &digest), &admin)
                .header("content-type", "application/octet-stream")
                .header("content-range", format!("{}-{}", 2 * third, data.len() - 1))
                .body(data[2 * third..].to_vec()),
        )
        .await;
        put.expect(201);
        assert_eq!(
            put.header("docker-content-digest"),
            Some(digest.as_str()),
            "{}",
            put.what
        );
        assert_blob(&l, REPO, &digest, &data, &admin).await;

        // Streamed (chunked transfer encoding, as docker sends a layer), then
        // a PATCH without Content-Range, then an empty PUT.
        let data = random_bytes(200 * KIB);
        let digest = sha256_digest(&data);
        let split = 120 * KIB;
        let loc = l.session(REPO, &admin).await;
        let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
            data[..split].chunks(16 * KIB).map(|c| Ok(c.to_vec())).collect();
        let r = send(
            l.request("PATCH", &loc, &admin)
                .header("content-type", "application/octet-stream")
                .body(reqwest::Body::wrap_stream(futures_util::stream::iter(pieces))),
        )
        .await;
        r.expect(202);
        assert_eq!(
            r.range_end(),
            split as u64 - 1,
            "{}: Range after a streamed PATCH",
            r.what
        );
        let loc = l.location(&r);
        let r = send(
            l.request("PATCH", &loc, &admin)
                .header("content-type", "application/octet-stream")
                .body(data[split..].to_vec()),
        )
        .await;
        r.expect(202);
        assert_eq!(
            r.range_end(),
            data.len() as u64 - 1,
            "{}: a second PATCH appends",
            r.what
        );
        let loc = l.location(&r);
        let put = l.put_upload(&loc, &digest, &[], &admin).await;
        put.expect(201);
        assert_eq!(
            put.header("docker-content-digest"),
            Some(digest.as_str()),
            "{}",
            put.what
        );
        assert_blob(&l, REPO, &digest, &data, &admin).await;

        // Nothing of the four sessions is left behind.
        l.assert_uploads_empty("four completed uploads");
    });
}

/// A session survives an out-of-order chunk (416, and the client resumes
/// from the status); a chunk whose Content-Range and length disagree is
/// refused; a cancelled session (and one that never existed) is 404
/// BLOB_UPLOAD_UNKNOWN for every use, and its bytes are gone.
#[test]
fn upload_sessions_refuse_bad_chunks_and_die_when_cancelled() {
    let l = Local::start(ROLES);
    let admin = admin();
    block_on(async {
        // Cancel first, while it is the only session.
        let data = random_bytes(64 * KIB);
        let digest = sha256_digest(&data);
        let loc = l.session(REPO, &admin).await;
        let r = l.patch_chunk(&loc, 0, &data[..32 * KIB], &admin).await;
        r.expect(202);
        let loc = l.location(&r);
        l.delete(&loc, &admin).await.expect(204);
        l.get(&loc, &admin).await.expect_error(404, "BLOB_UPLOAD_UNKNOWN");
        l.patch_chunk(&loc, 32 * KIB as u64, &data[32 * KIB..], &admin)
            .await
            .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
        l.put_upload(&loc, &digest, &data[32 * KIB..], &admin)
            .await
            .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
        l.delete(&loc, &admin).await.expect_error(404, "BLOB_UPLOAD_UNKNOWN");
        assert_no_blob(&l, REPO, &digest, &admin, "after a cancelled upload").await;
        l.assert_uploads_empty("a cancelled upload");

        // An id of the same shape that was never handed out.
        let live = l.session(REPO, &admin).await;
        let never = mangle_session(&live);
        l.get(&never, &admin).await.expect_error(404, "BLOB_UPLOAD_UNKNOWN");
        l.patch_chunk(&never, 0, &data, &admin)
            .await
            .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
        l.put_upload(&never, &digest, &data, &admin)
            .await
            .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
        // ... and the live one was not touched by them.
        let st = l.get(&live, &admin).await;
        st.expect(204);

        // Out of order: a gap, then an overlap; each 416, the session lives on.
        let data = random_bytes(150 * KIB);
        let digest = sha256_digest(&data);
        let chunk = 50 * KIB;
        let mut loc = live;
        let r = l.patch_chunk(&loc, 0, &data[..chunk], &admin).await;
        r.expect(202);
        loc = l.location(&r);
        let gap = l
            .patch_chunk(&loc, chunk as u64 + 10, &data[chunk + 10..2 * chunk], &admin)
            .await;
        gap.expect(416);
        let overlap = l.patch_chunk(&loc, 0, &data[..2 * chunk], &admin).await;
        overlap.expect(416);
        let st = l.get(&loc, &admin).await;
        st.expect(204);
        assert_eq!(
            st.range_end(),
            chunk as u64 - 1,
            "{}: refused chunks must not count",
            st.what
        );
        let r = l.patch_chunk(&loc, chunk as u64, &data[chunk..], &admin).await;
        r.expect(202);
        assert_eq!(r.range_end(), data.len() as u64 - 1, "{}", r.what);
        let put = l.put_upload(&l.location(&r), &digest, &[], &admin).await;
        put.expect(201);
        assert_blob(&l, REPO, &digest, &data, &admin).await;

        // Content-Range claiming more than the body, and a malformed one.
        for content_range in ["0-99", "abc"] {
            let loc = l.session(REPO, &admin).await;
            let r = send(
                l.request("PATCH", &loc, &admin)
                    .header("content-type", "application/octet-stream")
                    .header("content-range", content_range)
                    .body(vec![7u8; 50]),
            )
            .await;
            assert!(
                matches!(r.status, 400 | 416),
                "{} with Content-Range {content_range} and 50 bytes: want 400 or 416, got {}: {:?}",
                r.what,
                r.status,
                r.text()
            );
            if r.status == 400 {
                assert_eq!(r.code(), "BLOB_UPLOAD_INVALID", "{}: {:?}", r.what, r.text());
            }
            let _ = l.delete(&loc, &admin).await;
        }

        // A PUT without ?digest= completes nothing.
        let loc = l.session(REPO, &admin).await;
        let data = random_bytes(KIB);
        let r = send(
            l.request("PUT", &loc, &admin)
                .header("content-type", "application/octet-stream")
                .body(data.clone()),
        )
        .await;
        assert!(
            (400..500).contains(&r.status),
            "{} without digest: want a 4xx, got {}: {:?}",
            r.what,
            r.status,
            r.text()
        );
        assert_no_blob(&l, REPO, &sha256_digest(&data), &admin, "after a PUT without digest").await;
    });
}

// ------------------------------------------------------------ manifests

/// Manifests pushed by tag and by digest come back byte for byte (GET and
/// HEAD, by tag and by digest) with the Content-Type they were pushed with:
/// an OCI manifest, a Docker schema2 manifest, an OCI index over both. A tag
/// pushed again moves; the old manifest stays by digest. Unknown references
/// are 404 MANIFEST_UNKNOWN.
#[test]
fn manifests_round_trip_by_tag_and_digest_byte_identical() {
    let l = Local::start(ROLES);
    let admin = admin();
    block_on(async {
        let config = config_blob();
        let layers = vec![random_bytes(3 * KIB), random_bytes(5 * KIB)];
        l.push_blob(REPO, &config, &admin).await;
        for layer in &layers {
            l.push_blob(REPO, layer, &admin).await;
        }
        // Odd whitespace and key order: only the same bytes have this digest.
        let mut oci = image_manifest(&config, &layers, json!({"annotations": {"org.example.k": "v"}}));
        oci.extend_from_slice(b"\n\n");
        let oci_digest = sha256_digest(&oci);
        let put = l.put_manifest(REPO, "v1", OCI_MANIFEST, &oci, &admin).await;
        put.expect(201);
        assert_eq!(
            put.header("docker-content-digest"),
            Some(oci_digest.as_str()),
            "{}",
            put.what
        );
        assert!(put.header("location").is_some(), "{}: no Location", put.what);
        assert_manifest(&l, REPO, "v1", OCI_MANIFEST, &oci, &admin).await;
        assert_manifest(&l, REPO, &oci_digest, OCI_MANIFEST, &oci, &admin).await;

        // Docker schema2, by digest (no tag).
        let docker = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": descriptor(DOCKER_CONFIG, &config),
            "layers": layers.iter().map(|x| descriptor(DOCKER_LAYER, x)).collect::<Vec<_>>(),
        }))
        .expect("json");
        let docker_digest = sha256_digest(&docker);
        let put = l
            .put_manifest(REPO, &docker_digest, DOCKER_MANIFEST, &docker, &admin)
            .await;
        put.expect(201);
        assert_eq!(
            put.header("docker-content-digest"),
            Some(docker_digest.as_str()),
            "{}",
            put.what
        );
        assert_manifest(&l, REPO, &docker_digest, DOCKER_MANIFEST, &docker, &admin).await;

        // An index over both.
        let index = serde_json::to_vec_pretty(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": oci_digest, "size": oci.len(),
                 "platform": {"architecture": "amd64", "os": "linux"}},
                {"mediaType": DOCKER_MANIFEST, "digest": docker_digest, "size": docker.len(),
                 "platform": {"architecture": "arm64", "os": "linux"}},
            ],
        }))
        .expect("json");
        l.put_manifest(REPO, "multi", OCI_INDEX, &index, &admin)
            .await
            .expect(201);
        assert_manifest(&l, REPO, "multi", OCI_INDEX, &index, &admin).await;
        assert_manifest(&l, REPO, &sha256_digest(&index), OCI_INDEX, &index, &admin).await;

        // The tag moves; the old manifest is still there by digest.
        let moved = image_manifest(&config, &layers[..1], json!({}));
        l.put_manifest(REPO, "v1", OCI_MANIFEST, &moved, &admin)
            .await
            .expect(201);
        assert_manifest(&l, REPO, "v1", OCI_MANIFEST, &moved, &admin).await;
        assert_manifest(&l, REPO, &oci_digest, OCI_MANIFEST, &oci, &admin).await;

        // A nested repository name is a repository of its own.
        l.push_blob("private/team/app", &config, &admin).await;
        for layer in &layers {
            l.push_blob("private/team/app", layer, &admin).await;
        }
        l.put_manifest("private/team/app", "v1", OCI_MANIFEST, &oci, &admin)
            .await
            .expect(201);
        assert_manifest(&l, "private/team/app", "v1", OCI_MANIFEST, &oci, &admin).await;

        // Unknown references.
        l.get_manifest(REPO, "nope", &admin)
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");
        let absent = sha256_digest(b"never pushed");
        l.get_manifest(REPO, &absent, &admin)
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");
        let head = l.head(&format!("/v2/{REPO}/manifests/nope"), &admin).await;
        assert_eq!(head.status, 404, "{}", head.what);
        l.get(&format!("/v2/{REPO}/blobs/{absent}"), &admin)
            .await
            .expect_error(404, "BLOB_UNKNOWN");
    });
}

/// Manifests that name content never pushed (a layer, a config, an index's
/// child manifest) are refused with 400 MANIFEST_BLOB_UNKNOWN; bodies that
/// are not manifests with 400 MANIFEST_INVALID; a PUT by a digest the body
/// doesn't hash to with 400 DIGEST_INVALID. None of them is stored.
#[test]
fn manifests_naming_missing_content_or_malformed_are_refused() {
    let l = Local::start(ROLES);
    let admin = admin();
    block_on(async {
        let config = config_blob();
        let layer = random_bytes(4 * KIB);
        l.push_blob(REPO, &config, &admin).await;
        l.push_blob(REPO, &layer, &admin).await;
        let missing_layer = random_bytes(KIB);
        let missing_config = config_blob();

        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "a layer never pushed",
                image_manifest(&config, &[layer.clone(), missing_layer], json!({})),
            ),
            (
                "a config never pushed",
                image_manifest(&missing_config, std::slice::from_ref(&layer), json!({})),
            ),
        ];
        for (why, body) in &cases {
            let r = l.put_manifest(REPO, "bad", OCI_MANIFEST, body, &admin).await;
            assert_eq!(
                r.status,
                400,
                "manifest naming {why}: {} answered {}: {:?}",
                r.what,
                r.status,
                r.text()
            );
            assert_eq!(
                r.code(),
                "MANIFEST_BLOB_UNKNOWN",
                "manifest naming {why}: {:?}",
                r.text()
            );
            l.get_manifest(REPO, &sha256_digest(body), &admin)
                .await
                .expect_error(404, "MANIFEST_UNKNOWN");
        }
        l.get_manifest(REPO, "bad", &admin)
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");

        // An index whose second child was never pushed.
        let child = image_manifest(&config, std::slice::from_ref(&layer), json!({}));
        l.put_manifest(REPO, &sha256_digest(&child), OCI_MANIFEST, &child, &admin)
            .await
            .expect(201);
        let absent_child = image_manifest(&config, &[], json!({"annotations": {"never": "pushed"}}));
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": sha256_digest(&child), "size": child.len()},
                {"mediaType": OCI_MANIFEST, "digest": sha256_digest(&absent_child), "size": absent_child.len()},
            ],
        }))
        .expect("json");
        l.put_manifest(REPO, "idx", OCI_INDEX, &index, &admin)
            .await
            .expect_error(400, "MANIFEST_BLOB_UNKNOWN");
        l.get_manifest(REPO, "idx", &admin)
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");

        // Not manifests.
        for (why, body) in [
            ("truncated JSON", br#"{"schemaVersion": 2, "mediaType": "#.to_vec()),
            ("not JSON", b"hello, registry".to_vec()),
        ] {
            let r = l.put_manifest(REPO, "junk", OCI_MANIFEST, &body, &admin).await;
            assert_eq!(r.status, 400, "{why}: {} answered {}: {:?}", r.what, r.status, r.text());
            assert_eq!(r.code(), "MANIFEST_INVALID", "{why}: {:?}", r.text());
        }
        l.get_manifest(REPO, "junk", &admin)
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");

        // PUT by a digest of other bytes.
        let good = image_manifest(
            &config,
            std::slice::from_ref(&layer),
            json!({"annotations": {"n": "1"}}),
        );
        let other = sha256_digest(b"some other manifest");
        l.put_manifest(REPO, &other, OCI_MANIFEST, &good, &admin)
            .await
            .expect_error(400, "DIGEST_INVALID");
        l.get_manifest(REPO, &other, &admin)
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");
        l.get_manifest(REPO, &sha256_digest(&good), &admin)
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");

        // The namespace alone is no repository.
        let r = l.start_upload("private", &admin).await;
        assert!(
            (400..500).contains(&r.status),
            "{}: a push to the bare namespace must be refused with a 4xx, got {}: {:?}",
            r.what,
            r.status,
            r.text()
        );

        // Manifests of a few MiB go in (the spec: at least 4 MB SHOULD);
        // a far larger one is refused with a 4xx, never a 5xx.
        let big = image_manifest(
            &config,
            std::slice::from_ref(&layer),
            json!({"annotations": {"org.example.padding": "x".repeat(3 * 1024 * KIB)}}),
        );
        l.put_manifest(REPO, "big", OCI_MANIFEST, &big, &admin)
            .await
            .expect(201);
        assert_manifest(&l, REPO, "big", OCI_MANIFEST, &big, &admin).await;
        let huge = image_manifest(
            &config,
            std::slice::from_ref(&layer),
            json!({"annotations": {"org.example.padding": "x".repeat(24 * 1024 * KIB)}}),
        );
        let r = raw_put(&l, &format!("/v2/{REPO}/manifests/huge"), OCI_MANIFEST, huge).await;
        assert!(
            (400..500).contains(&r.status),
            "a 24 MiB manifest: want a 4xx (413), got {} {:?}",
            r.status,
            r.headers
        );
    });
}

// ------------------------------------------------------------ tags

/// tags/list is sorted lexically; `n` limits a page and a `Link: <…>;
/// rel="next"` leads to the next one until none remain; `last` starts after
/// that tag. Repositories keep their own tags; an unknown repository is 404
/// NAME_UNKNOWN.
#[test]
fn tags_list_is_sorted_and_paginated() {
    let l = Local::start(ROLES);
    let admin = admin();
    block_on(async {
        let img = l.push_image(REPO, "v1.2", 1, &admin).await;
        let others = ["latest", "v1.10", "alpha", "0.9", "beta-1", "v2", "a"];
        for tag in others {
            l.put_manifest(REPO, tag, OCI_MANIFEST, &img.manifest, &admin)
                .await
                .expect(201);
        }
        let mut all: Vec<String> = others.iter().map(|t| t.to_string()).collect();
        all.push("v1.2".into());
        all.sort();
        // Another repository's tags stay its own.
        l.push_image("private/team/app", "only-here", 1, &admin).await;

        let r = l.get(&format!("/v2/{REPO}/tags/list"), &admin).await;
        r.expect(200);
        assert_eq!(r.json()["name"].as_str(), Some(REPO), "{}: {}", r.what, r.text());
        assert_eq!(tags_of(&r), all, "{}: every tag, sorted", r.what);
        assert!(r.header("link").is_none(), "{}: Link on a complete list", r.what);
        let r = l.get("/v2/private/team/app/tags/list", &admin).await;
        r.expect(200);
        assert_eq!(tags_of(&r), vec!["only-here".to_string()], "{}", r.what);

        // Pages of 3, following Link.
        let mut url = format!("/v2/{REPO}/tags/list?n=3");
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            let r = l.get(&url, &admin).await;
            r.expect(200);
            let page = tags_of(&r);
            assert!(page.len() <= 3, "{}: n=3 gave {page:?}", r.what);
            pages += 1;
            assert!(pages <= 4, "more pages than 8 tags in threes need: {seen:?}");
            seen.extend(page);
            match next_link(&r) {
                Some(next) => url = next,
                None => break,
            }
        }
        assert_eq!(seen, all, "pages of n=3 joined");
        assert_eq!(pages, 3, "8 tags in pages of 3");

        // last: strictly after.
        let r = l.get(&format!("/v2/{REPO}/tags/list?last=beta-1"), &admin).await;
        r.expect(200);
        let after: Vec<String> = all.iter().filter(|t| t.as_str() > "beta-1").cloned().collect();
        assert_eq!(tags_of(&r), after, "{}", r.what);
        let r = l.get(&format!("/v2/{REPO}/tags/list?n=2&last=alpha"), &admin).await;
        r.expect(200);
        let two: Vec<String> = all.iter().filter(|t| t.as_str() > "alpha").take(2).cloned().collect();
        assert_eq!(tags_of(&r), two, "{}", r.what);
        assert!(next_link(&r).is_some(), "{}: more remain, so a Link", r.what);
        let r = l.get(&format!("/v2/{REPO}/tags/list?last=v2"), &admin).await;
        r.expect(200);
        assert!(
            tags_of(&r).is_empty(),
            "{}: nothing after the last tag: {}",
            r.what,
            r.text()
        );
        assert!(r.header("link").is_none(), "{}: Link after the end", r.what);

        // n=0: an empty list and no Link.
        let r = l.get(&format!("/v2/{REPO}/tags/list?n=0"), &admin).await;
        r.expect(200);
        assert!(
            tags_of(&r).is_empty(),
            "{}: n=0 must list nothing: {}",
            r.what,
            r.text()
        );
        assert!(r.header("link").is_none(), "{}: n=0 must carry no Link", r.what);

        l.get("/v2/private/nope/tags/list", &admin)
            .await
            .expect_error(404, "NAME_UNKNOWN");
    });
}

// ------------------------------------------------------------ referrers

/// A manifest with a `subject` is answered with `OCI-Subject`; the referrers
/// API lists the descriptors of every manifest whose subject is the digest
/// (artifactType from the manifest or else its config's media type, with
/// annotations), filters by `artifactType` and says so, and answers an empty
/// index for a digest nothing refers to.
#[test]
fn referrers_list_manifests_whose_subject_is_the_digest() {
    let l = Local::start(ROLES);
    let admin = admin();
    block_on(async {
        let subject = l.push_image(REPO, "v1", 1, &admin).await;
        let subject_desc = json!({"mediaType": OCI_MANIFEST, "digest": subject.digest, "size": subject.manifest.len()});
        let empty = b"{}".to_vec();
        l.push_blob(REPO, &empty, &admin).await;

        let sig_type = "application/vnd.example.signature.v1";
        let sig_layer = random_bytes(512);
        l.push_blob(REPO, &sig_layer, &admin).await;
        let sig = image_manifest_typed(
            EMPTY_CONFIG_TYPE,
            &empty,
            &[sig_layer],
            json!({"artifactType": sig_type, "subject": subject_desc,
                   "annotations": {"org.example.signed-by": "ci"}}),
        );
        let sig_digest = sha256_digest(&sig);
        let put = l.put_manifest(REPO, &sig_digest, OCI_MANIFEST, &sig, &admin).await;
        put.expect(201);
        assert_eq!(
            put.header("oci-subject"),
            Some(subject.digest.as_str()),
            "{}: OCI-Subject",
            put.what
        );

        let sbom_config_type = "application/vnd.example.sbom.config.v1+json";
        let sbom_config = br#"{"format":"spdx"}"#.to_vec();
        let sbom_layer = random_bytes(700);
        l.push_blob(REPO, &sbom_config, &admin).await;
        l.push_blob(REPO, &sbom_layer, &admin).await;
        let sbom = image_manifest_typed(
            sbom_config_type,
            &sbom_config,
            &[sbom_layer],
            json!({"subject": subject_desc}),
        );
        let sbom_digest = sha256_digest(&sbom);
        let put = l.put_manifest(REPO, "sbom", OCI_MANIFEST, &sbom, &admin).await;
        put.expect(201);
        assert_eq!(
            put.header("oci-subject"),
            Some(subject.digest.as_str()),
            "{}: OCI-Subject",
            put.what
        );

        // No subject, no OCI-Subject.
        let plain = l.push_image(REPO, "plain", 1, &admin).await;
        let put = l
            .put_manifest(REPO, "plain2", OCI_MANIFEST, &plain.manifest, &admin)
            .await;
        put.expect(201);
        assert!(
            put.header("oci-subject").is_none(),
            "{}: OCI-Subject without a subject",
            put.what
        );

        let path = format!("/v2/{REPO}/referrers/{}", subject.digest);
        let r = l.get(&path, &admin).await;
        r.expect(200);
        assert_eq!(r.header("content-type"), Some(OCI_INDEX), "{}", r.what);
        assert!(
            r.header("oci-filters-applied").is_none(),
            "{}: no filter was asked for",
            r.what
        );
        let v = r.json();
        assert_eq!(v["schemaVersion"], 2, "{v}");
        assert_eq!(v["mediaType"].as_str(), Some(OCI_INDEX), "{v}");
        let list = v["manifests"]
            .as_array()
            .unwrap_or_else(|| panic!("no manifests list: {v}"));
        assert_eq!(list.len(), 2, "the signature and the SBOM: {v}");
        let find = |d: &str| {
            list.iter()
                .find(|m| m["digest"].as_str() == Some(d))
                .unwrap_or_else(|| panic!("{d} not listed: {v}"))
                .clone()
        };
        let s = find(&sig_digest);
        assert_eq!(s["mediaType"].as_str(), Some(OCI_MANIFEST), "{s}");
        assert_eq!(s["size"].as_u64(), Some(sig.len() as u64), "{s}");
        assert_eq!(s["artifactType"].as_str(), Some(sig_type), "{s}");
        assert_eq!(s["annotations"]["org.example.signed-by"].as_str(), Some("ci"), "{s}");
        let b = find(&sbom_digest);
        assert_eq!(b["size"].as_u64(), Some(sbom.len() as u64), "{b}");
        assert_eq!(
            b["artifactType"].as_str(),
            Some(sbom_config_type),
            "no artifactType: the config's media type stands in: {b}"
        );

        let r = l.get(&format!("{path}?artifactType={sig_type}"), &admin).await;
        r.expect(200);
        assert_eq!(r.header("oci-filters-applied"), Some("artifactType"), "{}", r.what);
        let v = r.json();
        let digests: Vec<&str> = v["manifests"]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"))
            .iter()
            .filter_map(|m| m["digest"].as_str())
            .collect();
        assert_eq!(digests, vec![sig_digest.as_str()], "filtered to signatures: {v}");

        let r = l
            .get(&format!("{path}?artifactType=application/vnd.example.none"), &admin)
            .await;
        r.expect(200);
        assert_eq!(r.header("oci-filters-applied"), Some("artifactType"), "{}", r.what);
        assert_eq!(r.json()["manifests"], json!([]), "{}", r.text());

        // An index referring to the image: listed with its own media type,
        // its annotations, and no artifactType (it has none, nor a config).
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": sig_digest, "size": sig.len()}],
            "subject": subject_desc,
            "annotations": {"org.example.bundle": "yes"},
        }))
        .expect("json");
        let index_digest = sha256_digest(&index);
        let put = l.put_manifest(REPO, &index_digest, OCI_INDEX, &index, &admin).await;
        put.expect(201);
        assert_eq!(
            put.header("oci-subject"),
            Some(subject.digest.as_str()),
            "{}: OCI-Subject",
            put.what
        );
        let r = l.get(&path, &admin).await;
        r.expect(200);
        let v = r.json();
        let list = v["manifests"].as_array().unwrap_or_else(|| panic!("{v}"));
        assert_eq!(list.len(), 3, "signature, SBOM and index: {v}");
        let i = list
            .iter()
            .find(|m| m["digest"].as_str() == Some(index_digest.as_str()))
            .unwrap_or_else(|| panic!("the index is not listed: {v}"));
        assert_eq!(i["mediaType"].as_str(), Some(OCI_INDEX), "{i}");
        assert_eq!(i["size"].as_u64(), Some(index.len() as u64), "{i}");
        assert!(
            i.get("artifactType").is_none(),
            "an index without artifactType lists none: {i}"
        );
        assert_eq!(i["annotations"]["org.example.bundle"].as_str(), Some("yes"), "{i}");

        // A digest of invalid syntax is a 400.
        let r = l.get(&format!("/v2/{REPO}/referrers/sha256:abc"), &admin).await;
        assert_eq!(r.status, 400, "{}: {:?}", r.what, r.text());

        // Nothing refers to the signature itself, nor to a digest never seen.
        for d in [sig_digest.clone(), sha256_digest(b"nobody")] {
            let r = l.get(&format!("/v2/{REPO}/referrers/{d}"), &admin).await;
            r.expect(200);
            assert_eq!(r.header("content-type"), Some(OCI_INDEX), "{}", r.what);
            assert_eq!(r.json()["manifests"], json!([]), "{}: {}", r.what, r.text());
        }
    });
}

// ------------------------------------------------------------ deletes

/// Without `delete = true` no manifest, tag or blob can be deleted (405
/// UNSUPPORTED) and all stays; cancelling an upload still works.
#[test]
fn deletes_are_refused_unless_enabled() {
    let l = Local::start(ROLES);
    let admin = admin();
    block_on(async {
        let img = l.push_image(REPO, "v1", 1, &admin).await;
        let layer = sha256_digest(&img.layers[0]);
        for path in [
            format!("/v2/{REPO}/manifests/{}", img.digest),
            format!("/v2/{REPO}/manifests/v1"),
            format!("/v2/{REPO}/blobs/{layer}"),
        ] {
            l.delete(&path, &admin).await.expect_error(405, "UNSUPPORTED");
        }
        assert_manifest(&l, REPO, "v1", OCI_MANIFEST, &img.manifest, &admin).await;
        assert_manifest(&l, REPO, &img.digest, OCI_MANIFEST, &img.manifest, &admin).await;
        assert_blob(&l, REPO, &layer, &img.layers[0], &admin).await;

        let loc = l.session(REPO, &admin).await;
        l.delete(&loc, &admin).await.expect(204);
        l.get(&loc, &admin).await.expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    });
}

/// With `delete = true`: deleting a tag leaves the manifest by digest and the
/// other tags; deleting a manifest by digest removes it and the tags naming
/// it; deleting a blob removes it; deleting what is gone is 404; a referrer
/// deleted leaves the referrers list; a reader may delete nothing.
#[test]
fn deletes_when_enabled_remove_tags_manifests_and_blobs() {
    let l = Local::start(&format!("{ROLES}delete = true\n"));
    let admin = admin();
    let ci = Auth::user(CI);
    block_on(async {
        let img = l.push_image(REPO, "v1", 1, &admin).await;
        l.put_manifest(REPO, "alias", OCI_MANIFEST, &img.manifest, &admin)
            .await
            .expect(201);
        let layer = sha256_digest(&img.layers[0]);

        // A reader deletes nothing.
        for path in [
            format!("/v2/{REPO}/manifests/v1"),
            format!("/v2/{REPO}/manifests/{}", img.digest),
            format!("/v2/{REPO}/blobs/{layer}"),
        ] {
            l.delete(&path, &ci).await.expect_error(403, "DENIED");
        }
        assert_manifest(&l, REPO, "v1", OCI_MANIFEST, &img.manifest, &admin).await;

        // The tag.
        l.delete(&format!("/v2/{REPO}/manifests/v1"), &admin).await.expect(202);
        l.get_manifest(REPO, "v1", &admin)
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");
        assert_manifest(&l, REPO, &img.digest, OCI_MANIFEST, &img.manifest, &admin).await;
        assert_manifest(&l, REPO, "alias", OCI_MANIFEST, &img.manifest, &admin).await;
        let r = l.get(&format!("/v2/{REPO}/tags/list"), &admin).await;
        r.expect(200);
        assert_eq!(tags_of(&r), vec!["alias".to_string()], "{}", r.what);

        // The manifest: gone by digest and by the tag that named it.
        l.delete(&format!("/v2/{REPO}/manifests/{}", img.digest), &admin)
            .await
            .expect(202);
        l.get_manifest(REPO, &img.digest, &admin)
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");
        let head = l.head(&format!("/v2/{REPO}/manifests/{}", img.digest), &admin).await;
        assert_eq!(head.status, 404, "{}", head.what);
        l.get_manifest(REPO, "alias", &admin)
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");
        l.delete(&format!("/v2/{REPO}/manifests/{}", img.digest), &admin)
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");

        // The blob.
        l.delete(&format!("/v2/{REPO}/blobs/{layer}"), &admin).await.expect(202);
        assert_no_blob(&l, REPO, &layer, &admin, "after its DELETE").await;
        l.delete(&format!("/v2/{REPO}/blobs/{layer}"), &admin)
            .await
            .expect_error(404, "BLOB_UNKNOWN");

        // A referrer deleted is no longer listed.
        let subject = l.push_image(REPO, "s", 1, &admin).await;
        let empty = b"{}".to_vec();
        l.push_blob(REPO, &empty, &admin).await;
        let referrer = image_manifest_typed(
            EMPTY_CONFIG_TYPE,
            &empty,
            &[],
            json!({"artifactType": "application/vnd.example.note",
                   "subject": {"mediaType": OCI_MANIFEST, "digest": subject.digest, "size": subject.manifest.len()}}),
        );
        let referrer_digest = sha256_digest(&referrer);
        l.put_manifest(REPO, &referrer_digest, OCI_MANIFEST, &referrer, &admin)
            .await
            .expect(201);
        let path = format!("/v2/{REPO}/referrers/{}", subject.digest);
        let r = l.get(&path, &admin).await;
        r.expect(200);
        assert_eq!(r.json()["manifests"].as_array().map(Vec::len), Some(1), "{}", r.text());
        l.delete(&format!("/v2/{REPO}/manifests/{referrer_digest}"), &admin)
            .await
            .expect(202);
        let r = l.get(&path, &admin).await;
        r.expect(200);
        assert_eq!(
            r.json()["manifests"],
            json!([]),
            "a deleted referrer is still listed: {}",
            r.text()
        );
    });
}

// ------------------------------------------------------------ logins

/// Without credentials: 401 UNAUTHORIZED with a Bearer challenge naming the
/// realm on the host the client used and the scope it needs (pull to read,
/// push to write). A wrong password or an unknown user is 401. A reader can
/// read and is 403 DENIED for every write; a user with no role is 403 for
/// reads too.
#[test]
fn logins_challenges_and_roles() {
    let l = Local::start(ROLES);
    let admin = admin();
    block_on(async {
        let img = l.push_image(REPO, "v1", 1, &admin).await;
        let host = l.rm.config.http.to_string();

        let ping = l.get("/v2/", &Auth::None).await;
        ping.expect(401);
        let ch = bearer_challenge(&ping);
        assert_eq!(
            param(&ch, "realm"),
            Some(format!("http://{host}/token").as_str()),
            "{ch:?}"
        );
        assert!(param(&ch, "service").is_some(), "no service in {ch:?}");

        let r = l.get_manifest(REPO, "v1", &Auth::None).await;
        r.expect_error(401, "UNAUTHORIZED");
        let ch = bearer_challenge(&r);
        assert_eq!(
            param(&ch, "realm"),
            Some(format!("http://{host}/token").as_str()),
            "{ch:?}"
        );
        let scope = param(&ch, "scope").unwrap_or_else(|| panic!("no scope in {ch:?}"));
        assert!(
            scope.starts_with("repository:private/app:pull"),
            "read challenge scope {scope:?}"
        );
        let layer = sha256_digest(&img.layers[0]);
        l.get(&format!("/v2/{REPO}/blobs/{layer}"), &Auth::None)
            .await
            .expect_error(401, "UNAUTHORIZED");

        let r = l.start_upload(REPO, &Auth::None).await;
        r.expect_error(401, "UNAUTHORIZED");
        let ch = bearer_challenge(&r);
        let scope = param(&ch, "scope").unwrap_or_else(|| panic!("no scope in {ch:?}"));
        assert!(
            scope.starts_with("repository:private/app:") && scope.contains("push"),
            "write challenge scope {scope:?}"
        );
        l.put_manifest(REPO, "v2", OCI_MANIFEST, &img.manifest, &Auth::None)
            .await
            .expect_error(401, "UNAUTHORIZED");

        for bad in [
            Auth::Basic("admin".into(), "wrong".into()),
            Auth::Basic("nobody".into(), "admin-pw".into()),
            Auth::Basic("admin".into(), String::new()),
        ] {
            l.get_manifest(REPO, "v1", &bad).await.expect_error(401, "UNAUTHORIZED");
            l.start_upload(REPO, &bad).await.expect_error(401, "UNAUTHORIZED");
        }
        l.get_manifest(REPO, "v1", &Auth::Bearer("not-a-token".into()))
            .await
            .expect_error(401, "UNAUTHORIZED");

        // A reader.
        let ci = Auth::user(CI);
        assert_manifest(&l, REPO, "v1", OCI_MANIFEST, &img.manifest, &ci).await;
        assert_blob(&l, REPO, &layer, &img.layers[0], &ci).await;
        l.get(&format!("/v2/{REPO}/tags/list"), &ci).await.expect(200);
        l.start_upload(REPO, &ci).await.expect_error(403, "DENIED");
        let fresh = random_bytes(KIB);
        let r = send(
            l.request(
                "POST",
                &format!("/v2/{REPO}/blobs/uploads/?digest={}", sha256_digest(&fresh)),
                &ci,
            )
            .body(fresh.clone()),
        )
        .await;
        r.expect_error(403, "DENIED");
        assert_no_blob(&l, REPO, &sha256_digest(&fresh), &admin, "a reader's monolithic POST").await;
        let r = send(l.request(
            "POST",
            &format!("/v2/private/other/blobs/uploads/?mount={layer}&from={REPO}"),
            &ci,
        ))
        .await;
        r.expect_error(403, "DENIED");
        let moved = image_manifest(&img.config, &[], json!({}));
        l.put_manifest(REPO, "v1", OCI_MANIFEST, &moved, &ci)
            .await
            .expect_error(403, "DENIED");
        assert_manifest(&l, REPO, "v1", OCI_MANIFEST, &img.manifest, &admin).await;

        // A login with no role.
        let dev = Auth::user(DEV);
        l.get_manifest(REPO, "v1", &dev).await.expect_error(403, "DENIED");
        l.get(&format!("/v2/{REPO}/blobs/{layer}"), &dev)
            .await
            .expect_error(403, "DENIED");
        l.start_upload(REPO, &dev).await.expect_error(403, "DENIED");
    });
}

/// The token flow: `GET /token` with Basic credentials (docker, podman) and
/// `POST /token` with a password grant (containerd) give tokens that push
/// and pull; `/v2/` answers 200 to a token. A token carries only what its
/// user may do and only for its repository; a wrong password gets no token.
/// The same works over TLS on the proxy's own name, with the realm there.
#[test]
fn token_flow_get_and_post_and_the_tls_name() {
    let l = Local::start(ROLES);
    block_on(async {
        let ping = l.get("/v2/", &Auth::None).await;
        ping.expect(401);
        let ch = bearer_challenge(&ping);
        let realm = param(&ch, "realm").expect("realm").to_string();
        let service = param(&ch, "service").expect("service").to_string();
        let scope = "repository:private/app:pull,push";

        let token = token_of(&token_request(&l, &realm, &service, scope, &Auth::user(ADMIN)).await);
        let bearer = Auth::Bearer(token);
        l.get("/v2/", &bearer).await.expect(200);
        let img = l.push_image(REPO, "v1", 2, &bearer).await;
        assert_manifest(&l, REPO, "v1", OCI_MANIFEST, &img.manifest, &bearer).await;
        // The server name as documented is the service.
        let named = token_request(&l, &realm, &l.rm.config.name, scope, &Auth::user(ADMIN)).await;
        token_of(&named);

        // The token is for private/app only.
        let r = l.start_upload("private/elsewhere", &bearer).await;
        assert_refused(&r);
        let r = l.get_manifest("private/team/app", "v1", &bearer).await;
        assert_refused(&r);

        // A reader asking for push gets a pull token.
        let ci_token = token_of(&token_request(&l, &realm, &service, scope, &Auth::user(CI)).await);
        let ci = Auth::Bearer(ci_token);
        assert_manifest(&l, REPO, "v1", OCI_MANIFEST, &img.manifest, &ci).await;
        let r = l.start_upload(REPO, &ci).await;
        assert_refused(&r);

        // Wrong password, unknown user: no token.
        for bad in [
            Auth::Basic("admin".into(), "nope".into()),
            Auth::Basic("ghost".into(), "admin-pw".into()),
        ] {
            token_request(&l, &realm, &service, scope, &bad)
                .await
                .expect_error(401, "UNAUTHORIZED");
        }

        // containerd's POST form.
        let form = |user: &str, pw: &str| {
            let mut f = form_urlencoded::Serializer::new(String::new());
            f.append_pair("grant_type", "password")
                .append_pair("username", user)
                .append_pair("password", pw)
                .append_pair("scope", scope)
                .append_pair("service", &service)
                .append_pair("client_id", "containerd");
            f.finish()
        };
        let post = |body: String| {
            send(
                l.client
                    .post(&realm)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(body),
            )
        };
        let r = post(form(ADMIN.0, ADMIN.1)).await;
        r.expect(200);
        let access = r.json()["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("POST /token: no access_token: {}", r.text()))
            .to_string();
        let posted = Auth::Bearer(access);
        let blob = random_bytes(9 * KIB);
        let d = l.push_blob(REPO, &blob, &posted).await;
        assert_blob(&l, REPO, &d, &blob, &posted).await;
        post(form(ADMIN.0, "nope")).await.expect_error(401, "UNAUTHORIZED");

        // Over TLS on the proxy's own name.
        let tls = l.tls();
        let ping = tls.get("/v2/", &Auth::None).await;
        ping.expect(401);
        let ch = bearer_challenge(&ping);
        let tls_realm = format!("https://{}/token", l.rm.config.name);
        assert_eq!(param(&ch, "realm"), Some(tls_realm.as_str()), "{ch:?}");
        let tls_token = token_of(&token_request(&tls, &tls_realm, &service, scope, &Auth::user(ADMIN)).await);
        let tls_bearer = Auth::Bearer(tls_token);
        let blob = random_bytes(20 * KIB);
        let d = tls.push_blob(REPO, &blob, &tls_bearer).await;
        assert_blob(&tls, REPO, &d, &blob, &Auth::user(ADMIN)).await;
        // One store behind both listeners.
        assert_blob(&l, REPO, &d, &blob, &Auth::user(ADMIN)).await;
        assert_manifest(&tls, REPO, "v1", OCI_MANIFEST, &img.manifest, &Auth::user(CI)).await;
    });
}

/// `anonymous_pull = true`: anyone reads (directly, or with the anonymous
/// token a docker client fetches first), nobody writes without a login.
#[test]
fn anonymous_pull_reads_without_logins_but_never_writes() {
    let l = Local::start("writers = [\"admin\"]\nanonymous_pull = true\n");
    block_on(async {
        let img = l.push_image(REPO, "v1", 1, &admin()).await;
        let layer = sha256_digest(&img.layers[0]);
        let none = Auth::None;
        assert_manifest(&l, REPO, "v1", OCI_MANIFEST, &img.manifest, &none).await;
        assert_blob(&l, REPO, &layer, &img.layers[0], &none).await;
        let r = l.get(&format!("/v2/{REPO}/tags/list"), &none).await;
        r.expect(200);
        assert_eq!(tags_of(&r), vec!["v1".to_string()]);

        let r = l.start_upload(REPO, &none).await;
        r.expect_error(401, "UNAUTHORIZED");
        let ch = bearer_challenge(&r);
        let scope = param(&ch, "scope").unwrap_or_else(|| panic!("no scope in {ch:?}"));
        assert!(scope.contains("push"), "write challenge scope {scope:?}");
        let moved = image_manifest(&img.config, &[], json!({}));
        l.put_manifest(REPO, "v1", OCI_MANIFEST, &moved, &none)
            .await
            .expect_error(401, "UNAUTHORIZED");

        // docker's way: /v2/ → challenge → anonymous token → pull.
        let ping = l.get("/v2/", &none).await;
        ping.expect(401);
        let ch = bearer_challenge(&ping);
        let realm = param(&ch, "realm").expect("realm").to_string();
        let service = param(&ch, "service").expect("service").to_string();
        let anon = token_request(&l, &realm, &service, "repository:private/app:pull,push", &none).await;
        let anon = Auth::Bearer(token_of(&anon));
        assert_manifest(&l, REPO, "v1", OCI_MANIFEST, &img.manifest, &anon).await;
        let r = l.start_upload(REPO, &anon).await;
        assert_refused(&r);
        assert_manifest(&l, REPO, "v1", OCI_MANIFEST, &img.manifest, &none).await;

        // Default writers/readers aside, the non-writer login can read too.
        assert_manifest(&l, REPO, "v1", OCI_MANIFEST, &img.manifest, &Auth::user(CI)).await;
        l.start_upload(REPO, &Auth::user(CI)).await.expect_error(403, "DENIED");
    });
}

// ------------------------------------------------------------ digests

/// sha512 digests are accepted for blob uploads (single POST, POST+PUT,
/// chunked) and served back under that digest; a body not matching a sha512
/// digest is 400 DIGEST_INVALID; malformed digests are 400 DIGEST_INVALID,
/// never a 5xx.
#[test]
fn sha512_and_malformed_digests() {
    let l = Local::start(ROLES);
    let admin = admin();
    block_on(async {
        let data = random_bytes(40 * KIB);
        let d512 = sha512_digest(&data);
        assert_eq!(d512.len(), "sha512:".len() + 128);
        let r = send(
            l.request("POST", &format!("/v2/{REPO}/blobs/uploads/?digest={d512}"), &admin)
                .header("content-type", "application/octet-stream")
                .body(data.clone()),
        )
        .await;
        r.expect(201);
        assert_eq!(r.header("docker-content-digest"), Some(d512.as_str()), "{}", r.what);
        assert_blob(&l, REPO, &d512, &data, &admin).await;

        let data = random_bytes(30 * KIB);
        let d512 = sha512_digest(&data);
        let r = l.post_put(REPO, &d512, &data, &admin).await;
        r.expect(201);
        assert_eq!(r.header("docker-content-digest"), Some(d512.as_str()), "{}", r.what);
        assert_blob(&l, REPO, &d512, &data, &admin).await;

        let data = random_bytes(70 * KIB);
        let d512 = sha512_digest(&data);
        let loc = l.session(REPO, &admin).await;
        let r = l.patch_chunk(&loc, 0, &data[..35 * KIB], &admin).await;
        r.expect(202);
        let r = l
            .patch_chunk(&l.location(&r), 35 * KIB as u64, &data[35 * KIB..], &admin)
            .await;
        r.expect(202);
        l.put_upload(&l.location(&r), &d512, &[], &admin).await.expect(201);
        assert_blob(&l, REPO, &d512, &data, &admin).await;

        // A manifest may name sha512 blobs.
        let config = config_blob();
        let c512 = sha512_digest(&config);
        l.post_put(REPO, &c512, &config, &admin).await.expect(201);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c512, "size": config.len()},
            "layers": [{"mediaType": OCI_LAYER, "digest": d512, "size": data.len()}],
        }))
        .expect("json");
        l.put_manifest(REPO, "sha512", OCI_MANIFEST, &manifest, &admin)
            .await
            .expect(201);
        assert_manifest(&l, REPO, "sha512", OCI_MANIFEST, &manifest, &admin).await;

        // A body that isn't the sha512 digest's.
        let wrong = sha512_digest(b"something else");
        l.post_put(REPO, &wrong, &data, &admin)
            .await
            .expect_error(400, "DIGEST_INVALID");
        assert_no_blob(&l, REPO, &wrong, &admin, "a sha512 mismatch").await;

        let hex64 = "0".repeat(64);
        let malformed = [
            "sha256:abc".to_string(),
            format!("sha256:{}", "g".repeat(64)),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "0".repeat(63)),
            format!("sha512:{hex64}"),
            format!("md5:{}", "0".repeat(32)),
            hex64.clone(),
            "sha256".to_string(),
        ];
        for bad in &malformed {
            let r = l.post_put(REPO, bad, &data, &admin).await;
            assert_eq!(
                (r.status, r.code()),
                (400, "DIGEST_INVALID".to_string()),
                "PUT ?digest={bad}: {:?}",
                r.text()
            );
            // A small body: an early 400 then a close would race a client
            // still writing (tested on its own below).
            let r = send(
                l.request(
                    "POST",
                    &with_query(&l.url(&format!("/v2/{REPO}/blobs/uploads/")), "digest", bad),
                    &admin,
                )
                .body(b"tiny".to_vec()),
            )
            .await;
            assert_eq!(
                (r.status, r.code()),
                (400, "DIGEST_INVALID".to_string()),
                "POST ?digest={bad}: {:?}",
                r.text()
            );
            let r = l.get(&format!("/v2/{REPO}/blobs/{bad}"), &admin).await;
            assert!(
                (400..500).contains(&r.status),
                "GET blobs/{bad}: want a 4xx, got {}: {:?}",
                r.status,
                r.text()
            );
        }
    });
}

// ------------------------------------------------------------ mounts and the cache

/// A named mount from a repository the user reads is 201 (the blob is then
/// served there), as is an anonymous mount (no `from`) of a blob in the
/// store; an unknown digest falls back to an upload session (202). Nothing
/// crosses into another namespace the user has no login for: such a mount
/// is 202, and the blob is neither readable nor usable in a manifest.
#[test]
fn mounts_named_and_anonymous_never_across_namespaces() {
    let l = Local::start_with(
        common::push::dead_upstream_config(),
        &[
            Namespace {
                namespace: "private",
                users: &[ADMIN, CI, DEV],
                keys: ROLES,
            },
            Namespace {
                namespace: "secret",
                users: &[OTHER],
                keys: "",
            },
        ],
    );
    let admin = admin();
    let other = Auth::user(OTHER);
    block_on(async {
        let data = random_bytes(60 * KIB);
        let d = l.push_blob("private/src", &data, &admin).await;

        let r = send(l.request(
            "POST",
            &format!("/v2/private/dst/blobs/uploads/?mount={d}&from=private/src"),
            &admin,
        ))
        .await;
        r.expect(201);
        assert_eq!(r.header("docker-content-digest"), Some(d.as_str()), "{}", r.what);
        let at = l.get(&l.location(&r), &admin).await;
        at.expect(200);
        assert!(at.body == data, "the mount's Location must serve the blob");
        assert_blob(&l, "private/dst", &d, &data, &admin).await;

        let r = send(l.request("POST", &format!("/v2/private/dst2/blobs/uploads/?mount={d}"), &admin)).await;
        r.expect(201);
        assert_eq!(r.header("docker-content-digest"), Some(d.as_str()), "{}", r.what);
        assert_blob(&l, "private/dst2", &d, &data, &admin).await;

        // Unknown digest: a normal upload session.
        let fresh = random_bytes(10 * KIB);
        let fd = sha256_digest(&fresh);
        let r = send(l.request(
            "POST",
            &format!("/v2/private/dst/blobs/uploads/?mount={fd}&from=private/src"),
            &admin,
        ))
        .await;
        r.expect(202);
        l.put_upload(&l.location(&r), &fd, &fresh, &admin).await.expect(201);
        assert_blob(&l, "private/dst", &fd, &fresh, &admin).await;

        // Another namespace, other logins.
        let secret = random_bytes(30 * KIB);
        let s = l.push_blob("secret/vault", &secret, &other).await;
        assert_blob(&l, "secret/vault", &s, &secret, &other).await;
        l.get(&format!("/v2/secret/vault/blobs/{s}"), &admin)
            .await
            .expect_error(401, "UNAUTHORIZED");
        for path in [
            format!("/v2/private/app/blobs/uploads/?mount={s}&from=secret/vault"),
            format!("/v2/private/app/blobs/uploads/?mount={s}"),
        ] {
            let r = send(l.request("POST", &path, &admin)).await;
            r.expect(202);
            l.delete(&l.location(&r), &admin).await.expect(204);
        }
        assert_no_blob(&l, REPO, &s, &admin, "a blob of another namespace").await;
        let config = config_blob();
        l.push_blob(REPO, &config, &admin).await;
        let naming_secret = image_manifest(&config, std::slice::from_ref(&secret), json!({}));
        l.put_manifest(REPO, "steal", OCI_MANIFEST, &naming_secret, &admin)
            .await
            .expect_error(400, "MANIFEST_BLOB_UNKNOWN");
        // ... and the other way round.
        let r = send(l.request(
            "POST",
            &format!("/v2/secret/vault/blobs/uploads/?mount={d}&from=private/src"),
            &other,
        ))
        .await;
        r.expect(202);
        assert_no_blob(&l, "secret/vault", &d, &other, "a blob of another namespace").await;
    });
}

/// Follows a mirror 401 to regmirror's /token (anonymously, or with upstream
/// credentials) and GETs the blob with the token.
async fn pull_through(reg: &Registry, repo: &str, digest: &str, creds: Option<(&str, &str)>) -> Resp {
    let path = format!("/v2/{repo}/blobs/{digest}");
    let r = reg.get(&path, &Auth::None).await;
    if r.status != 401 {
        return r;
    }
    let ch = bearer_challenge(&r);
    let realm = param(&ch, "realm").expect("realm").to_string();
    let service = param(&ch, "service").unwrap_or_default().to_string();
    let scope = param(&ch, "scope").unwrap_or_default().to_string();
    let auth = creds.map_or(Auth::None, |(u, p)| Auth::Basic(u.into(), p.into()));
    let t = token_request(reg, &realm, &service, &scope, &auth).await;
    t.expect(200);
    let v = t.json();
    let token = v["token"]
        .as_str()
        .or_else(|| v["access_token"].as_str())
        .unwrap_or_else(|| panic!("{}: no token: {v}", t.what))
        .to_string();
    reg.get(&path, &Auth::Bearer(token)).await
}

/// Blobs the cache pulled anonymously (proven public) need no upload: HEAD in
/// the namespace is 200, an anonymous mount is 201, a manifest naming them is
/// accepted and they are served there. Pushing outside the namespace is still
/// 405 UNSUPPORTED: the mirror stays read-only.
#[test]
fn blobs_the_cache_pulled_publicly_are_mountable_and_seen_by_pushes() {
    let env = UpstreamEnv::start(UpstreamEnvOpts::default());
    let img = common::images::build_image(common::images::Format::Oci, "amd64", &[32 * KIB, 48 * KIB]);
    env.pusher.push_image("library/pub", "1", &img);
    let unpulled = common::images::build_image(common::images::Format::Oci, "amd64", &[8 * KIB]);
    env.pusher.push_image("library/pub", "2", &unpulled);
    let cfg = Config::new(alloc_ip()).with_standard_upstreams(UPSTREAM_HOST, env.upstream.ip, &env.ca_file);
    let l = Local::start_with(
        cfg,
        &[Namespace {
            namespace: "private",
            users: &[ADMIN, CI, DEV],
            keys: ROLES,
        }],
    );
    let admin = admin();
    block_on(async {
        let blobs: Vec<(String, Vec<u8>)> = std::iter::once(&img.config)
            .chain(img.layers.iter())
            .map(|b| (b.digest.clone(), b.data.clone()))
            .collect();
        for (d, data) in &blobs {
            let r = pull_through(&l, "dockerhub/library/pub", d, None).await;
            r.expect(200);
            assert!(r.body == *data, "{}: pulled bytes differ", r.what);
        }
        let (layer_d, layer) = &blobs[1];
        let head = l.head(&format!("/v2/{REPO}/blobs/{layer_d}"), &admin).await;
        head.expect(200);
        let r = send(l.request("POST", &format!("/v2/{REPO}/blobs/uploads/?mount={layer_d}"), &admin)).await;
        r.expect(201);
        assert_eq!(r.header("docker-content-digest"), Some(layer_d.as_str()), "{}", r.what);
        assert_blob(&l, REPO, layer_d, layer, &admin).await;

        // The image's own manifest, pushed with no blob upload at all.
        l.put_manifest(REPO, "from-cache", OCI_MANIFEST, &img.manifest, &admin)
            .await
            .expect(201);
        assert_manifest(&l, REPO, "from-cache", OCI_MANIFEST, &img.manifest, &admin).await;
        for (d, data) in &blobs {
            assert_blob(&l, REPO, d, data, &Auth::user(CI)).await;
        }
        // A blob of the upstream image never pulled is not there.
        assert_no_blob(
            &l,
            REPO,
            &unpulled.layers[0].digest,
            &admin,
            "a blob the cache never pulled",
        )
        .await;

        // The mirror is read-only.
        for auth in [Auth::None, admin.clone()] {
            for path in [
                "/v2/dockerhub/library/pub/blobs/uploads/",
                "/v2/library/pub/blobs/uploads/",
            ] {
                send(l.request("POST", path, &auth).header("content-length", "0"))
                    .await
                    .expect_error(405, "UNSUPPORTED");
            }
            l.put_manifest("dockerhub/library/pub", "9", OCI_MANIFEST, &img.manifest, &auth)
                .await
                .expect_error(405, "UNSUPPORTED");
        }
    });
}

/// A blob the cache fetched only with a client's private upstream
/// credential is not public: it cannot be mounted into a local namespace,
/// nor read or named there.
#[test]
fn a_blob_read_only_with_an_upstream_credential_is_not_mountable() {
    let env = UpstreamEnv::start(UpstreamEnvOpts {
        policy: common::token_server::TokenPolicy {
            user: Some((common::PUSH_USER.into(), common::PUSH_PASSWORD.into())),
            private_prefixes: vec!["hidden/".into()],
            ..Default::default()
        },
        ..Default::default()
    });
    let img = common::images::build_image(common::images::Format::Oci, "amd64", &[24 * KIB]);
    env.pusher.push_image("hidden/img", "1", &img);
    let cfg = Config::new(alloc_ip()).with_standard_upstreams(UPSTREAM_HOST, env.upstream.ip, &env.ca_file);
    let l = Local::start_with(
        cfg,
        &[Namespace {
            namespace: "private",
            users: &[ADMIN, CI, DEV],
            keys: ROLES,
        }],
    );
    let admin = admin();
    block_on(async {
        let layer = &img.layers[0];
        let r = pull_through(
            &l,
            "dockerhub/hidden/img",
            &layer.digest,
            Some((common::PUSH_USER, common::PUSH_PASSWORD)),
        )
        .await;
        r.expect(200);
        assert!(r.body == layer.data, "the user's pull through the cache");

        let r = send(l.request(
            "POST",
            &format!("/v2/{REPO}/blobs/uploads/?mount={}", layer.digest),
            &admin,
        ))
        .await;
        r.expect(202);
        l.delete(&l.location(&r), &admin).await.expect(204);
        let r = send(l.request(
            "POST",
            &format!(
                "/v2/{REPO}/blobs/uploads/?mount={}&from=dockerhub/hidden/img",
                layer.digest
            ),
            &admin,
        ))
        .await;
        r.expect(202);
        l.delete(&l.location(&r), &admin).await.expect(204);
        assert_no_blob(&l, REPO, &layer.digest, &admin, "a privately fetched blob").await;
        let config = config_blob();
        l.push_blob(REPO, &config, &admin).await;
        let naming = image_manifest(&config, std::slice::from_ref(&layer.data), json!({}));
        l.put_manifest(REPO, "x", OCI_MANIFEST, &naming, &admin)
            .await
            .expect_error(400, "MANIFEST_BLOB_UNKNOWN");
    });
}

// ------------------------------------------------------------ faults

/// A raw request head for `method url` on regmirror's plain listener.
fn raw_head(l: &Local, method: &str, url: &str, extra: &[(&str, String)]) -> String {
    let u = reqwest::Url::parse(url).expect("url");
    let target = match u.query() {
        Some(q) => format!("{}?{q}", u.path()),
        None => u.path().to_string(),
    };
    let mut h = format!(
        "{method} {target} HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\nContent-Type: application/octet-stream\r\n",
        l.rm.config.http,
        common::images::basic(ADMIN.0, ADMIN.1)
    );
    for (k, v) in extra {
        h += &format!("{k}: {v}\r\n");
    }
    h + "\r\n"
}

/// Wrong digests (after a PUT with the body, after chunks, on a single POST,
/// on an empty session) are 400 DIGEST_INVALID and leave no blob and no
/// session bytes; so does a client that goes away in the middle of a PATCH or
/// of a PUT. A clean upload of the same bytes works afterwards.
#[test]
fn failed_uploads_leave_nothing_behind() {
    let l = Local::start(ROLES);
    let admin = admin();
    let addr: SocketAddr = l.rm.config.http;
    block_on(async {
        let data = random_bytes(200 * KIB);
        let real = sha256_digest(&data);
        let claimed = sha256_digest(b"not these bytes");

        l.post_put(REPO, &claimed, &data, &admin)
            .await
            .expect_error(400, "DIGEST_INVALID");
        l.assert_uploads_empty("a PUT with the wrong digest");

        let loc = l.session(REPO, &admin).await;
        let r = l.patch_chunk(&loc, 0, &data[..80 * KIB], &admin).await;
        r.expect(202);
        let r = l
            .patch_chunk(&l.location(&r), 80 * KIB as u64, &data[80 * KIB..], &admin)
            .await;
        r.expect(202);
        l.put_upload(&l.location(&r), &claimed, &[], &admin)
            .await
            .expect_error(400, "DIGEST_INVALID");
        l.assert_uploads_empty("chunks closed with the wrong digest");

        send(
            l.request("POST", &format!("/v2/{REPO}/blobs/uploads/?digest={claimed}"), &admin)
                .body(data.clone()),
        )
        .await
        .expect_error(400, "DIGEST_INVALID");

        let loc = l.session(REPO, &admin).await;
        l.put_upload(&loc, &real, &[], &admin)
            .await
            .expect_error(400, "DIGEST_INVALID");
        l.assert_uploads_empty("an empty session closed with a digest");
        for d in [&real, &claimed] {
            assert_no_blob(&l, REPO, d, &admin, "after wrong-digest uploads").await;
        }

        // Gone mid-PATCH: half of the declared Content-Length, then the
        // connection closes.
        let loc = l.session(REPO, &admin).await;
        let head = raw_head(
            &l,
            "PATCH",
            &loc,
            &[
                ("Content-Length", data.len().to_string()),
                ("Content-Range", format!("0-{}", data.len() - 1)),
            ],
        );
        let half = data.len() / 2;
        let part = data[..half].to_vec();
        tokio::task::spawn_blocking(move || send_partial_then_drop(addr, &head, &part))
            .await
            .expect("raw client");
        l.assert_uploads_empty("a client gone mid-PATCH");
        let st = l.get(&loc, &admin).await;
        match st.status {
            404 => assert_eq!(st.code(), "BLOB_UPLOAD_UNKNOWN", "{}", st.text()),
            204 => assert!(
                st.header("range")
                    .is_none_or(|r| r.trim_start_matches("bytes=") == "0-0"),
                "{}: the session claims bytes that are no longer stored: {:?}",
                st.what,
                st.header("range")
            ),
            s => panic!("{}: after a client went mid-PATCH: {s} {:?}", st.what, st.text()),
        }
        assert_no_blob(&l, REPO, &real, &admin, "a client gone mid-PATCH").await;

        // Gone mid-PUT (monolithic).
        let loc = l.session(REPO, &admin).await;
        let head = raw_head(
            &l,
            "PUT",
            &with_query(&loc, "digest", &real),
            &[("Content-Length", data.len().to_string())],
        );
        let part = data[..half].to_vec();
        tokio::task::spawn_blocking(move || send_partial_then_drop(addr, &head, &part))
            .await
            .expect("raw client");
        l.assert_uploads_empty("a client gone mid-PUT");
        assert_no_blob(&l, REPO, &real, &admin, "a client gone mid-PUT").await;

        // The same bytes, pushed properly.
        let d = l.push_blob(REPO, &data, &admin).await;
        assert_blob(&l, REPO, &d, &data, &admin).await;
        l.assert_uploads_empty("a clean upload");
    });
}

/// Two clients pushing the same blob at once (interleaved chunks, then both
/// PUTs together; and three monolithic pushes together) all succeed, and the
/// store holds one copy.
#[test]
fn concurrent_uploads_of_one_blob_all_succeed_and_store_it_once() {
    let l = Local::start(ROLES);
    let admin = admin();
    block_on(async {
        let data = random_bytes(512 * KIB);
        let d = sha256_digest(&data);
        let half = data.len() / 2;
        let a = l.session(REPO, &admin).await;
        let b = l.session("private/app2", &admin).await;
        let ra = l.patch_chunk(&a, 0, &data[..half], &admin).await;
        ra.expect(202);
        let rb = l.patch_chunk(&b, 0, &data[..half], &admin).await;
        rb.expect(202);
        let ra = l
            .patch_chunk(&l.location(&ra), half as u64, &data[half..], &admin)
            .await;
        ra.expect(202);
        let rb = l
            .patch_chunk(&l.location(&rb), half as u64, &data[half..], &admin)
            .await;
        rb.expect(202);
        let (la, lb) = (l.location(&ra), l.location(&rb));
        let (pa, pb) = tokio::join!(l.put_upload(&la, &d, &[], &admin), l.put_upload(&lb, &d, &[], &admin));
        pa.expect(201);
        pb.expect(201);
        assert_blob(&l, REPO, &d, &data, &admin).await;
        assert_blob(&l, "private/app2", &d, &data, &admin).await;

        let other = random_bytes(300 * KIB);
        let od = sha256_digest(&other);
        let (x, y, z) = tokio::join!(
            l.post_put(REPO, &od, &other, &admin),
            l.post_put(REPO, &od, &other, &admin),
            l.post_put("private/app3", &od, &other, &admin)
        );
        for r in [x, y, z] {
            r.expect(201);
        }
        assert_blob(&l, "private/app3", &od, &other, &admin).await;
        l.assert_uploads_empty("five completed uploads");

        for (digest, len) in [(&d, data.len()), (&od, other.len())] {
            let hex = digest.trim_start_matches("sha256:");
            let copies: Vec<_> = files_under(&l.data())
                .into_iter()
                .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().contains(hex)))
                .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() == len as u64))
                .collect();
            assert_eq!(copies.len(), 1, "copies of {digest} in the store: {copies:?}");
        }
    });
}

/// `quota = "1MiB"`: a push that would take the namespace past it is refused
/// with 403 DENIED naming the quota (mid-upload or at the PUT, and a single
/// too-large POST at once); the refused bytes don't count, and a push that
/// fits still works.
#[test]
fn a_push_past_the_quota_is_refused() {
    let l = Local::start(&format!("{ROLES}quota = \"1MiB\"\n"));
    let admin = admin();
    block_on(async {
        let first = random_bytes(600 * KIB);
        l.push_blob(REPO, &first, &admin).await;

        let data = random_bytes(600 * KIB);
        let d = sha256_digest(&data);
        let mut loc = l.session(REPO, &admin).await;
        let chunk = 100 * KIB;
        let mut refused = None;
        for start in (0..data.len()).step_by(chunk) {
            let r = l
                .patch_chunk(&loc, start as u64, &data[start..start + chunk], &admin)
                .await;
            if r.status != 202 {
                refused = Some(r);
                break;
            }
            loc = l.location(&r);
        }
        let refused = match refused {
            Some(r) => r,
            None => l.put_upload(&loc, &d, &[], &admin).await,
        };
        refused.expect_error(403, "DENIED");
        assert!(
            refused.message().to_lowercase().contains("quota"),
            "{}: the message must name the quota: {:?}",
            refused.what,
            refused.text()
        );
        assert_no_blob(&l, REPO, &d, &admin, "a push past the quota").await;
        let _ = l.delete(&loc, &admin).await;
        l.assert_uploads_empty("a refused upload, cancelled");

        // A single POST far past the quota, read as raw HTTP: regmirror may
        // answer before it has read the body (see the early-refusal test).
        let big = random_bytes(2 * 1024 * KIB);
        let bd = sha256_digest(&big);
        let r = raw_post(
            &l,
            &format!("/v2/{REPO}/blobs/uploads/?digest={bd}"),
            "application/octet-stream",
            big,
        )
        .await;
        assert_eq!(r.status, 403, "2 MiB POST past a 1 MiB quota: {r:?}");
        let body: Value = serde_json::from_slice(&r.body).expect("OCI error JSON");
        assert_eq!(body["errors"][0]["code"].as_str(), Some("DENIED"), "{body}");
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .unwrap_or_default()
                .to_lowercase()
                .contains("quota"),
            "the message must name the quota: {body}"
        );
        assert_no_blob(&l, REPO, &bd, &admin, "a single POST past the quota").await;

        // What fits still goes in.
        let small = random_bytes(100 * KIB);
        let sd = l.push_blob(REPO, &small, &admin).await;
        assert_blob(&l, REPO, &sd, &small, &admin).await;
    });
}

/// Open uploads share the quota: what one session has received counts
/// against another's room before either commits, and a cancelled session
/// gives its room back.
#[test]
fn concurrent_uploads_cannot_together_pass_the_quota() {
    let l = Local::start(&format!("{ROLES}quota = \"1MiB\"\n"));
    let admin = admin();
    block_on(async {
        let a = random_bytes(600 * KIB);
        let b = random_bytes(600 * KIB);
        let loc_a = l.session(REPO, &admin).await;
        let loc_b = l.session(REPO, &admin).await;
        let r = l.patch_chunk(&loc_a, 0, &a, &admin).await;
        r.expect(202);
        let loc_a = l.location(&r);
        let refused = l.patch_chunk(&loc_b, 0, &b, &admin).await;
        refused.expect_error(403, "DENIED");
        assert!(
            refused.message().to_lowercase().contains("quota"),
            "{:?}",
            refused.text()
        );
        assert_no_blob(
            &l,
            REPO,
            &sha256_digest(&b),
            &admin,
            "the second of two uploads past the quota",
        )
        .await;
        l.put_upload(&loc_a, &sha256_digest(&a), &[], &admin).await.expect(201);
        assert_blob(&l, REPO, &sha256_digest(&a), &a, &admin).await;

        // 424 KiB are left: a cancelled 300 KiB session gives its room back.
        let loc_c = l.session(REPO, &admin).await;
        l.patch_chunk(&loc_c, 0, &random_bytes(300 * KIB), &admin)
            .await
            .expect(202);
        let loc_d = l.session(REPO, &admin).await;
        l.patch_chunk(&loc_d, 0, &random_bytes(300 * KIB), &admin)
            .await
            .expect_error(403, "DENIED");
        l.delete(&loc_c, &admin).await.expect(204);
        let fits = random_bytes(400 * KIB);
        let d = l.push_blob(REPO, &fits, &admin).await;
        assert_blob(&l, REPO, &d, &fits, &admin).await;
    });
}

/// `upload_timeout = "2s"`: a session kept busy outlives it; an abandoned one
/// is removed (its bytes gone, its URL 404 BLOB_UPLOAD_UNKNOWN).
#[test]
fn abandoned_upload_sessions_expire() {
    let l = Local::start(&format!("{ROLES}upload_timeout = \"2s\"\n"));
    let admin = admin();
    block_on(async {
        let data = random_bytes(100 * KIB);
        let d = sha256_digest(&data);
        let loc = l.session(REPO, &admin).await;
        let r = l.patch_chunk(&loc, 0, &data[..50 * KIB], &admin).await;
        r.expect(202);
        let loc = l.location(&r);
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let st = l.get(&loc, &admin).await;
            st.expect(204);
        }
        let r = l.patch_chunk(&loc, 50 * KIB as u64, &data[50 * KIB..], &admin).await;
        r.expect(202);
        l.put_upload(&l.location(&r), &d, &[], &admin).await.expect(201);
        assert_blob(&l, REPO, &d, &data, &admin).await;

        let loc = l.session(REPO, &admin).await;
        let r = l.patch_chunk(&loc, 0, &data[..50 * KIB], &admin).await;
        r.expect(202);
        let loc = l.location(&r);
        assert!(
            !l.upload_files().is_empty(),
            "an open session with 50 KiB keeps nothing under data/uploads/"
        );
        // Only look at the disk: any request would keep the session alive.
        let mut expired = false;
        for _ in 0..80 {
            if l.upload_files().is_empty() {
                expired = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(expired, "abandoned session still on disk: {:?}", l.upload_files());
        l.get(&loc, &admin).await.expect_error(404, "BLOB_UPLOAD_UNKNOWN");
        l.patch_chunk(&loc, 50 * KIB as u64, &data[50 * KIB..], &admin)
            .await
            .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    });
}

/// `max_uploads_per_user = 4`: a fifth open session of one user is 429
/// TOOMANYREQUESTS; other users are not affected; finishing or cancelling a
/// session makes room. (No roles listed: every login may push and pull.)
#[test]
fn open_upload_sessions_per_user_are_bounded() {
    let l = Local::start("max_uploads_per_user = 4\n");
    let admin = admin();
    let other = Auth::user(OTHER);
    block_on(async {
        let mut open = Vec::new();
        for _ in 0..4 {
            open.push(l.session(REPO, &admin).await);
        }
        l.start_upload(REPO, &admin).await.expect_error(429, "TOOMANYREQUESTS");
        l.start_upload("private/elsewhere", &admin)
            .await
            .expect_error(429, "TOOMANYREQUESTS");

        // Others are not held back (and, no writers listed, may push).
        let theirs = l.session(REPO, &other).await;
        let data = random_bytes(8 * KIB);
        l.put_upload(&theirs, &sha256_digest(&data), &data, &other)
            .await
            .expect(201);
        let dev_blob = random_bytes(4 * KIB);
        let dd = l.push_blob(REPO, &dev_blob, &Auth::user(DEV)).await;
        assert_blob(&l, REPO, &dd, &dev_blob, &Auth::user(CI)).await;

        // A session is its user's: another login can neither read, feed,
        // complete nor cancel it.
        let mine = open.last().expect("a session").clone();
        let intruder = [
            l.get(&mine, &other).await,
            l.patch_chunk(&mine, 0, &data, &other).await,
            l.put_upload(&mine, &sha256_digest(&data), &data, &other).await,
            l.delete(&mine, &other).await,
        ];
        for r in &intruder {
            assert!(
                matches!(r.status, 403 | 404),
                "{} by another user must be refused (403/404), got {}: {:?}",
                r.what,
                r.status,
                r.text()
            );
        }
        let st = l.get(&mine, &admin).await;
        st.expect(204);
        assert!(
            st.header("range")
                .is_none_or(|r| r.trim_start_matches("bytes=") == "0-0"),
            "{}: another user's bytes landed in the session: {:?}",
            st.what,
            st.header("range")
        );

        // Finishing one makes room for one.
        let done = open.pop().expect("a session");
        l.put_upload(&done, &sha256_digest(&data), &data, &admin)
            .await
            .expect(201);
        open.push(l.session(REPO, &admin).await);
        l.start_upload(REPO, &admin).await.expect_error(429, "TOOMANYREQUESTS");
        // So does cancelling one.
        let cancelled = open.pop().expect("a session");
        l.delete(&cancelled, &admin).await.expect(204);
        open.push(l.session(REPO, &admin).await);
        l.start_upload(REPO, &admin).await.expect_error(429, "TOOMANYREQUESTS");
        for loc in open {
            l.delete(&loc, &admin).await.expect(204);
        }
        l.assert_uploads_empty("every session cancelled");
    });
}

/// Pushed content is kept: the cache's size bound evicts pulled content
/// around it but never what was pushed, and after a restart every tag,
/// manifest, blob and referrer is served as before; an upload session open
/// across the restart is resumed or cleanly unknown, never an error.
#[test]
fn pushed_content_survives_eviction_and_a_restart() {
    let env = UpstreamEnv::start(UpstreamEnvOpts::default());
    let public: Vec<_> = (0..4)
        .map(|_| common::images::build_image(common::images::Format::Oci, "amd64", &[400 * KIB]))
        .collect();
    for (i, img) in public.iter().enumerate() {
        env.pusher.push_image(&format!("library/big{i}"), "1", img);
    }
    let mut cfg = Config::new(alloc_ip()).with_standard_upstreams(UPSTREAM_HOST, env.upstream.ip, &env.ca_file);
    cfg.max_size = "1MiB".into();
    let mut l = Local::start_with(
        cfg,
        &[Namespace {
            namespace: "private",
            users: &[ADMIN, CI, DEV],
            keys: ROLES,
        }],
    );
    let admin = admin();
    let layer = random_bytes(700 * KIB);
    let (img, layer_d, referrer, open_loc) = block_on(async {
        let layer_d = l.push_blob(REPO, &layer, &admin).await;
        let config = config_blob();
        l.push_blob(REPO, &config, &admin).await;
        let manifest = image_manifest(&config, std::slice::from_ref(&layer), json!({}));
        l.put_manifest(REPO, "v1", OCI_MANIFEST, &manifest, &admin)
            .await
            .expect(201);
        let img = (manifest, config);
        let empty = b"{}".to_vec();
        l.push_blob(REPO, &empty, &admin).await;
        let referrer = image_manifest_typed(
            EMPTY_CONFIG_TYPE,
            &empty,
            &[],
            json!({"artifactType": "application/vnd.example.note",
                   "subject": {"mediaType": OCI_MANIFEST, "digest": sha256_digest(&img.0), "size": img.0.len()}}),
        );
        l.put_manifest(REPO, &sha256_digest(&referrer), OCI_MANIFEST, &referrer, &admin)
            .await
            .expect(201);

        // 1.6 MiB of public layers through a 1 MiB cache.
        for (i, p) in public.iter().enumerate() {
            let r = pull_through(&l, &format!("dockerhub/library/big{i}"), &p.layers[0].digest, None).await;
            r.expect(200);
            assert!(r.body == p.layers[0].data, "{}: pulled bytes", r.what);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_blob(&l, REPO, &layer_d, &layer, &admin).await;
        assert_manifest(&l, REPO, "v1", OCI_MANIFEST, &img.0, &admin).await;

        let loc = l.session(REPO, &admin).await;
        let r = l.patch_chunk(&loc, 0, &layer[..100 * KIB], &admin).await;
        r.expect(202);
        (img, layer_d, referrer, l.location(&r))
    });

    l.restart();
    block_on(async {
        assert_blob(&l, REPO, &layer_d, &layer, &admin).await;
        assert_blob(&l, REPO, &sha256_digest(&img.1), &img.1, &admin).await;
        assert_manifest(&l, REPO, "v1", OCI_MANIFEST, &img.0, &admin).await;
        assert_manifest(&l, REPO, &sha256_digest(&img.0), OCI_MANIFEST, &img.0, &admin).await;
        let r = l.get(&format!("/v2/{REPO}/tags/list"), &admin).await;
        r.expect(200);
        assert_eq!(tags_of(&r), vec!["v1".to_string()], "{}", r.what);
        let r = l
            .get(&format!("/v2/{REPO}/referrers/{}", sha256_digest(&img.0)), &admin)
            .await;
        r.expect(200);
        let listed: Vec<String> = r.json()["manifests"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["digest"].as_str())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(
            listed,
            vec![sha256_digest(&referrer)],
            "the referrer after a restart: {}",
            r.text()
        );

        let st = l.get(&open_loc, &admin).await;
        match st.status {
            204 => {
                let next = st.range_end() + 1;
                let r = l
                    .patch_chunk(&l.location(&st), next, &layer[next as usize..], &admin)
                    .await;
                r.expect(202);
                l.put_upload(&l.location(&r), &layer_d, &[], &admin).await.expect(201);
            }
            404 => assert_eq!(st.code(), "BLOB_UPLOAD_UNKNOWN", "{}", st.text()),
            s => panic!(
                "{}: a session open across a restart answered {s}: {:?}",
                st.what,
                st.text()
            ),
        }
        // Still pushable after the restart.
        let fresh = random_bytes(50 * KIB);
        let d = l.push_blob(REPO, &fresh, &admin).await;
        assert_blob(&l, REPO, &d, &fresh, &Auth::user(CI)).await;
    });
}

/// A request with a large body sent as raw HTTP by admin, read even when
/// regmirror answers before it has read the body.
async fn raw_send(l: &Local, method: &str, path: &str, content_type: &str, body: Vec<u8>) -> common::push::RawResp {
    let head = raw_head(l, method, &l.url(path), &[("Content-Length", body.len().to_string())]).replacen(
        "Content-Type: application/octet-stream",
        &format!("Content-Type: {content_type}"),
        1,
    );
    let addr = l.rm.config.http;
    let what = format!("{method} {path}");
    tokio::task::spawn_blocking(move || {
        let s = std::net::TcpStream::connect(addr).expect("connect");
        common::push::raw_exchange(&s, &head, body)
    })
    .await
    .expect("raw client")
    .unwrap_or_else(|| panic!("{what}: no response"))
}

async fn raw_post(l: &Local, path: &str, content_type: &str, body: Vec<u8>) -> common::push::RawResp {
    raw_send(l, "POST", path, content_type, body).await
}

async fn raw_put(l: &Local, path: &str, content_type: &str, body: Vec<u8>) -> common::push::RawResp {
    raw_send(l, "PUT", path, content_type, body).await
}

/// A request refused before its body was read (a bad digest, or no login, on
/// a 2 MiB monolithic upload) leaves the client a usable connection: either
/// regmirror reads the rest and answers the next request on the connection,
/// or it says `Connection: close`. Otherwise a client that reuses the
/// connection fails its next, unrelated request.
#[test]
fn an_early_refusal_closes_the_connection_openly_or_keeps_it_usable() {
    let l = Local::start(ROLES);
    let addr = l.rm.config.http;
    let len = 2 * 1024 * KIB;
    for (what, path, login) in [
        (
            "POST ?digest=sha256:abc",
            format!("/v2/{REPO}/blobs/uploads/?digest=sha256:abc"),
            true,
        ),
        (
            "POST without a login",
            format!("/v2/{REPO}/blobs/uploads/?digest={}", sha256_digest(b"x")),
            false,
        ),
    ] {
        let mut head = raw_head(&l, "POST", &l.url(&path), &[("Content-Length", len.to_string())]);
        if !login {
            head = head
                .split("\r\n")
                .filter(|h| !h.starts_with("Authorization:"))
                .collect::<Vec<_>>()
                .join("\r\n");
        }
        let s = std::net::TcpStream::connect(addr).expect("connect");
        let r = common::push::raw_exchange(&s, &head, random_bytes(len))
            .unwrap_or_else(|| panic!("{what}: no response at all"));
        assert!((400..500).contains(&r.status), "{what}: {r:?}");
        if r.header("connection").is_some_and(|c| c.eq_ignore_ascii_case("close")) {
            continue;
        }
        assert!(
            r.write_error.is_none(),
            "{what}: answered {} {:?} without `Connection: close`, then stopped reading the request body ({:?})",
            r.status,
            r.headers,
            r.write_error
        );
        let next = format!(
            "GET /v2/ HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\n\r\n",
            l.rm.config.http,
            common::images::basic(ADMIN.0, ADMIN.1)
        );
        let again = common::push::raw_exchange(&s, &next, Vec::new());
        assert!(
            again.is_some(),
            "{what}: answered {} without `Connection: close`, then closed the connection before answering \
             the next request on it",
            r.status
        );
    }
}
