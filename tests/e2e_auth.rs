//! Private images through regmirror with real clients (issue 14; DESIGN.md
//! rules 9–11). The upstream is distribution behind the test token server,
//! with a public repository and private ones (`private/…`: only the token
//! server's user may pull them). Each test has its own stack and pulls in
//! transparent mode (registry names unchanged, private /etc/hosts) and in
//! prefix mode (`PROXY:5000/dockerhub/…`):
//!
//! 1. with the user's credentials the private image is pulled; anonymously
//!    the public image is, and the private one is refused, also once cached;
//! 2. then, for every cached private manifest and blob, by digest over plain
//!    HTTP and HTTPS: no token, regmirror's anonymous token, the public
//!    repository's name, a token for another repository — each refused; the
//!    user's token gets the bytes, with one upstream HEAD per (token,
//!    repository) and no upstream token request beyond the relayed one;
//! 3. then with upstream and its token server stopped: the cached public
//!    image is still pulled by a client doing the full token dance, and the
//!    cached private image is served to no client whose token was not checked.
//!
//! Three tests (skopeo + podman, docker, containerd), run in parallel, and
//! a fourth through the CONNECT proxy listener (skopeo and podman).

mod common;

use std::net::SocketAddr;

use common::daemons::{Containerd, Dockerd, DockerdOpts};
use common::images::{self, basic, Format, Image};
use common::matrix::{assert_pulled, assert_refused, summarize, Stack};
use common::token_server::TokenPolicy;
use common::{UpstreamEnvOpts, PUSH_PASSWORD, PUSH_USER};

const KIB: usize = 1024;
/// Repositories the token server denies to anonymous callers.
const PRIVATE_PREFIX: &str = "private/";
/// Every manifest type, as a client that takes any would ask.
const ACCEPT_ALL: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json";

fn creds() -> String {
    format!("{PUSH_USER}:{PUSH_PASSWORD}")
}

/// A stack whose upstream has private repositories; with `proxy_creds`,
/// regmirror itself holds credentials that can read them (which must not
/// make them visible to anyone without a token of their own).
fn start(proxy_creds: bool) -> Stack {
    start_with(proxy_creds, false)
}

/// [`start`], with the CONNECT proxy listener when `connect`.
fn start_with(proxy_creds: bool, connect: bool) -> Stack {
    let opts = UpstreamEnvOpts {
        policy: TokenPolicy {
            user: Some((PUSH_USER.into(), PUSH_PASSWORD.into())),
            private_prefixes: vec![PRIVATE_PREFIX.into()],
            ..Default::default()
        },
        ..Default::default()
    };
    Stack::start_with(opts, |cfg| {
        let cfg = if connect { cfg.with_connect() } else { cfg };
        if proxy_creds {
            cfg.with_credentials("docker.io", PUSH_USER, PUSH_PASSWORD)
        } else {
            cfg
        }
    })
}

/// One public image and two private ones (one per mode) of a test, pushed.
struct Images {
    /// `library/<t>-pub`
    public: (String, Image),
    /// `private/<t>-t`, pulled in transparent mode.
    private_t: (String, Image),
    /// `private/<t>-p`, pulled in prefix mode.
    private_p: (String, Image),
    /// `library/<t>-own`: public upstream, read through regmirror only with
    /// the user's token (so regmirror has it as not known public).
    own: (String, Image),
}

impl Images {
    fn push(s: &Stack, t: &str) -> Images {
        let push = |repo: String, format| {
            let img = images::build_image(format, "amd64", &[64 * KIB, 96 * KIB]);
            s.env.pusher.push_image(&repo, "1", &img);
            (repo, img)
        };
        Images {
            public: push(format!("library/{t}-pub"), Format::Docker),
            private_t: push(format!("{PRIVATE_PREFIX}{t}-t"), Format::Oci),
            private_p: push(format!("{PRIVATE_PREFIX}{t}-p"), Format::Docker),
            own: push(format!("library/{t}-own"), Format::Oci),
        }
    }
}

/// `docker.io/<repo>:1`
fn transparent(repo: &str) -> String {
    format!("docker.io/{repo}:1")
}

/// `PROXY:5000/dockerhub/<repo>:1`
fn prefixed(s: &Stack, repo: &str) -> String {
    format!("{}/dockerhub/{repo}:1", s.plain())
}

/// `repo:1` as a client names it in `mode` ("prefix" or transparent).
fn image_name(s: &Stack, mode: &str, repo: &str) -> String {
    if mode == "prefix" {
        prefixed(s, repo)
    } else {
        transparent(repo)
    }
}

/// The token server saw a request by the user for `repo` (in upstream's
/// name) since `mark`: the client's credentials were relayed, scope rewritten.
#[track_caller]
fn assert_relayed(s: &Stack, mark: usize, repo: &str, what: &str) {
    let want = format!("repository:{repo}:pull");
    let reqs = s.env.token.as_ref().expect("token server").requests_since(mark);
    assert!(
        reqs.iter()
            .any(|r| r.user.as_deref() == Some(PUSH_USER) && r.status == 200 && r.scopes.contains(&want)),
        "{what}: no token request by {PUSH_USER} for {want} reached the token server: {reqs:#?}"
    );
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn token_served(s: &Stack) -> usize {
    s.env.token.as_ref().expect("token server").served()
}

// ------------------------------------------------------------------ plain HTTP(S) clients

/// How a script reaches regmirror: over plain HTTP in prefix mode, or over
/// HTTPS on `registry-1.docker.io` (resolved to the proxy) in transparent mode.
struct Via {
    what: &'static str,
    client: reqwest::Client,
    base: String,
    /// What comes before the upstream name in this mode (`dockerhub/` or nothing).
    prefix: &'static str,
}

/// One piece of cached content: manifest or blob, digest, bytes.
struct Content<'a> {
    kind: &'static str,
    digest: String,
    data: &'a [u8],
}

fn contents(img: &Image) -> Vec<Content<'_>> {
    let mut v = vec![Content {
        kind: "manifests",
        digest: img.manifest_digest.clone(),
        data: &img.manifest,
    }];
    v.push(Content {
        kind: "blobs",
        digest: img.config.digest.clone(),
        data: &img.config.data,
    });
    for l in &img.layers {
        v.push(Content {
            kind: "blobs",
            digest: l.digest.clone(),
            data: &l.data,
        });
    }
    v
}

struct Answer {
    status: u16,
    challenge: Option<String>,
    length: Option<String>,
    body: Vec<u8>,
}

impl Via {
    fn plain(s: &Stack) -> Via {
        Via {
            what: "prefix, plain HTTP",
            client: reqwest::Client::builder().no_proxy().build().expect("client"),
            base: s.rm.http_url(),
            prefix: "dockerhub/",
        }
    }

    fn tls(s: &Stack) -> Via {
        let ca = std::fs::read(&s.rm.ca_pem).expect("regmirror CA");
        let addr = SocketAddr::new(s.proxy_ip(), 443);
        Via {
            what: "transparent, HTTPS",
            client: common::http_client_resolving(&ca, &[("registry-1.docker.io", addr)]),
            base: "https://registry-1.docker.io".into(),
            prefix: "",
        }
    }

    fn url(&self, repo: &str, c: &Content<'_>) -> String {
        format!("{}/v2/{}{repo}/{}/{}", self.base, self.prefix, c.kind, c.digest)
    }

    /// `/token` for `repo` with the user's Basic credentials (relayed upstream).
    fn user_token(&self, repo: &str) -> String {
        self.token(repo, Some(basic(PUSH_USER, PUSH_PASSWORD)))
    }

    /// `/token` for `repo` without credentials: regmirror's own token.
    fn anonymous_token(&self, repo: &str) -> String {
        let t = self.token(repo, None);
        assert!(
            t.starts_with("regmirror-anonymous."),
            "{}: anonymous token {t}",
            self.what
        );
        t
    }

    fn token(&self, repo: &str, authorization: Option<String>) -> String {
        let url = format!(
            "{}/token?service={}&scope=repository:{}{repo}:pull",
            self.base,
            common::UPSTREAM_HOST,
            self.prefix
        );
        let (status, body) = common::block_on(async {
            let mut req = self.client.get(&url);
            if let Some(a) = authorization {
                req = req.header("authorization", a);
            }
            let r = req.send().await.expect("regmirror answers /token");
            (r.status().as_u16(), r.bytes().await.unwrap_or_default())
        });
        assert_eq!(
            status,
            200,
            "{}: GET {url}: {}",
            self.what,
            String::from_utf8_lossy(&body)
        );
        let v: serde_json::Value = serde_json::from_slice(&body).expect("token JSON");
        v["token"].as_str().expect("a token").to_string()
    }

    fn request(&self, method: reqwest::Method, url: &str, token: Option<&str>) -> Answer {
        common::block_on(async {
            let mut req = self.client.request(method, url).header("accept", ACCEPT_ALL);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let r = req.send().await.expect("regmirror answers");
            let h = |n: &str| r.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
            let (challenge, length) = (h("www-authenticate"), h("content-length"));
            Answer {
                status: r.status().as_u16(),
                challenge,
                length,
                body: r.bytes().await.unwrap_or_default().to_vec(),
            }
        })
    }

    /// GET twice and HEAD once with `token`: the bytes, every time.
    #[track_caller]
    fn assert_served(&self, repo: &str, c: &Content<'_>, token: &str) {
        let url = self.url(repo, c);
        for _ in 0..2 {
            let a = self.request(reqwest::Method::GET, &url, Some(token));
            assert_eq!(a.status, 200, "{}: GET {url} with the user's token", self.what);
            assert_eq!(common::sha256_digest(&a.body), c.digest, "{}: GET {url}", self.what);
            assert_eq!(a.body, c.data);
        }
        let a = self.request(reqwest::Method::HEAD, &url, Some(token));
        assert_eq!(a.status, 200, "{}: HEAD {url} with the user's token", self.what);
        assert_eq!(a.length, Some(c.data.len().to_string()), "{}: HEAD {url}", self.what);
    }

    /// GET and HEAD of `c` through `repo` with `token` are a 401 with a
    /// challenge on this host, without the content, and answered exactly as
    /// a digest that exists nowhere is (nothing hints that `c` is cached).
    #[track_caller]
    fn assert_unauthorized(&self, repo: &str, c: &Content<'_>, token: Option<&str>, who: &str) {
        let url = self.url(repo, c);
        let nowhere = common::sha256_digest(&images::random_bytes(32));
        let unknown_url = url.replace(&c.digest, &nowhere);
        for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
            let a = self.request(method.clone(), &url, token);
            let what = format!("{}: {who}: {method} {url}", self.what);
            assert_eq!(a.status, 401, "{what}: {}", String::from_utf8_lossy(&a.body));
            let realm = format!("Bearer realm=\"{}/token\"", self.base);
            assert!(
                a.challenge.as_deref().is_some_and(|w| w.starts_with(&realm)),
                "{what}: challenge {:?}, want one starting with {realm}",
                a.challenge
            );
            assert_no_bytes(&a, c, &what);
            let u = self.request(method.clone(), &unknown_url, token);
            let body = String::from_utf8_lossy(&a.body).replace(&c.digest, "DIGEST");
            let unknown_body = String::from_utf8_lossy(&u.body).replace(&nowhere, "DIGEST");
            assert_eq!(
                (a.status, &a.challenge, &body),
                (u.status, &u.challenge, &unknown_body),
                "{what}: answered unlike a digest that exists nowhere"
            );
        }
    }
}

/// The bytes of `c` are not in an answer that is not a 200.
#[track_caller]
fn assert_not_served(a: &Answer, c: &Content<'_>, what: &str) {
    assert_ne!(a.status, 200, "{what}");
    assert_no_bytes(a, c, what);
}

#[track_caller]
fn assert_no_bytes(a: &Answer, c: &Content<'_>, what: &str) {
    let probe = &c.data[..c.data.len().min(64)];
    assert!(
        !a.body.windows(probe.len()).any(|w| w == probe),
        "{what}: content bytes leaked"
    );
}

/// Test 2: every cached private manifest and blob, by digest, over both
/// listeners. Returns a user token that upstream accepted (checked) for
/// the transparent-mode private repository, for the upstream-down step.
fn private_content_is_isolated(s: &Stack, imgs: &Images) -> String {
    let (plain, tls) = (Via::plain(s), Via::tls(s));
    let public_repo = imgs.public.0.as_str();
    let mut checked = String::new();
    for (repo, img) in [&imgs.private_t, &imgs.private_p] {
        let items = contents(img);

        // The user's own token: served, one upstream HEAD per (token, repository).
        let (tokens, mark) = (token_served(s), s.up().mark());
        let t1 = plain.user_token(repo);
        for c in &items {
            plain.assert_served(repo, c, &t1);
            tls.assert_served(repo, c, &t1);
        }
        let entries = s.up().entries_since(mark);
        let heads = |entries: &[common::upstream::AccessEntry]| {
            entries
                .iter()
                .filter(|e| e.method == "HEAD" && e.repo() == Some(repo.as_str()))
                .count()
        };
        let gets = entries.iter().filter(|e| e.method == "GET").count();
        let token_requests = token_served(s) - tokens;
        eprintln!(
            "{repo}: {} requests with one user token (both listeners, GET x2 + HEAD each): upstream {}, token server {token_requests}",
            items.len() * 6,
            summarize(&entries)
        );
        assert_eq!(
            heads(&entries),
            1,
            "{repo}: one upstream HEAD per (token, repository): {entries:#?}"
        );
        assert_eq!(gets, 0, "{repo}: cached content fetched again: {entries:#?}");
        assert_eq!(
            token_requests, 1,
            "{repo}: the relayed token request only (the client's token goes upstream as is)"
        );

        // A second token of the same user: checked once more, once.
        let mark = s.up().mark();
        let t2 = tls.user_token(repo);
        for c in &items {
            tls.assert_served(repo, c, &t2);
        }
        let entries = s.up().entries_since(mark);
        assert_eq!(heads(&entries), 1, "{repo}: second token, one HEAD: {entries:#?}");

        // Refused: no token, regmirror's anonymous token (in the private
        // repository and through the public one's name), the user's token for
        // the public repository (in the private one's name, and in its own).
        let mark = s.up().mark();
        for via in [&plain, &tls] {
            let anon = via.anonymous_token(repo);
            let for_public = via.user_token(public_repo);
            for c in &items {
                via.assert_unauthorized(repo, c, None, "no token");
                via.assert_unauthorized(repo, c, Some(&anon), "regmirror's anonymous token");
                via.assert_unauthorized(public_repo, c, Some(&anon), "anonymous, through the public repository");
                via.assert_unauthorized(repo, c, Some(&for_public), "a token for another repository");
                for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
                    let url = via.url(public_repo, c);
                    let a = via.request(method.clone(), &url, Some(&for_public));
                    let what = format!(
                        "{}: the public repository's token, through its name: {method} {url}",
                        via.what
                    );
                    assert_not_served(&a, c, &what);
                }
            }
            // A token upstream accepted for another repository its holder
            // reads through regmirror (so that (token, repository) is
            // checked) does not open this content through that name either:
            // upstream would not serve it there.
            let (own_repo, own_img) = &imgs.own;
            let for_own = via.user_token(own_repo);
            via.assert_served(own_repo, &contents(own_img)[0], &for_own);
            for c in &items {
                for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
                    let url = via.url(own_repo, c);
                    let a = via.request(method.clone(), &url, Some(&for_own));
                    let what = format!(
                        "{}: a token checked for {own_repo}, through its name: {method} {url}",
                        via.what
                    );
                    assert_not_served(&a, c, &what);
                }
            }
        }
        eprintln!(
            "{repo}: refusals (no token, anonymous, public name, other repository's token): upstream {}",
            summarize(&s.up().entries_since(mark))
        );
        if repo.ends_with("-t") {
            checked = t1;
        }
    }
    checked
}

/// Test 3, HTTP part (upstream and token server already stopped): the
/// checked token still reads `img`; `unchecked` (issued while upstream was
/// up, never used) gets nothing, nor does anyone without a token.
fn private_content_with_upstream_down(s: &Stack, repo: &str, img: &Image, checked: &str, unchecked: &str) {
    let tls = Via::tls(s);
    for c in contents(img) {
        tls.assert_served(repo, &c, checked);
        for (who, token) in [("a token never checked", Some(unchecked)), ("no token", None)] {
            for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
                let url = tls.url(repo, &c);
                let a = tls.request(method.clone(), &url, token);
                let what = format!("upstream down, {who}: {method} {url}");
                assert_not_served(&a, &c, &what);
            }
        }
    }
}

/// Stops the token server and distribution.
fn stop_upstream(s: &mut Stack) {
    drop(s.env.token.take());
    s.env.upstream.stop();
}

// ------------------------------------------------------------------ the tests

/// skopeo (`--src-creds`) and podman (`--creds`), transparent and prefix
/// mode. regmirror holds credentials of its own that can read the private
/// repositories: they must not make them readable to anyone else.
#[test]
fn skopeo_and_podman_private_images() {
    let mut s = start(true);
    let imgs = Images::push(&s, "sp");
    let c = creds();
    let (pub_repo, pub_img) = &imgs.public;

    for (mode, prefix_mode) in [("transparent", false), ("prefix", true)] {
        let (repo, img) = if prefix_mode { &imgs.private_p } else { &imgs.private_t };
        let name = |r: &str| if prefix_mode { prefixed(&s, r) } else { transparent(r) };
        let sk_flags: &[&str] = if prefix_mode { &["--src-tls-verify=false"] } else { &[] };
        let pm_flags: &[&str] = if prefix_mode { &["--tls-verify=false"] } else { &[] };
        let with = |flags: &[&str], extra: [&str; 2]| -> Vec<String> {
            flags
                .iter()
                .map(|f| f.to_string())
                .chain(extra.map(String::from))
                .collect()
        };

        // With the user's credentials, cold: skopeo.
        let mark = token_served(&s);
        let sk_creds = with(sk_flags, ["--src-creds", &c]);
        let pulled = s.client().skopeo_copy_opts(&name(repo), None, &refs(&sk_creds));
        assert_pulled(&format!("{mode}: skopeo --src-creds"), &pulled, &img.manifest_digest);
        let skopeo_tokens = mark;

        // Anonymous, now that it is cached: refused, by tag and by digest
        // (which needs no tag HEAD upstream).
        let (sk, pm) = (s.client(), s.client());
        let by_digest = name(repo).replace(":1", &format!("@{}", img.manifest_digest));
        assert_refused(&sk.skopeo_copy_opts(&name(repo), None, sk_flags).0);
        assert_refused(&sk.skopeo_copy_opts(&by_digest, None, sk_flags).0);
        assert_refused(&pm.podman_pull_opts(&name(repo), None, pm_flags).0);
        assert_refused(&pm.podman_pull_opts(&by_digest, None, pm_flags).0);

        // With the user's credentials, warm: podman.
        let mark = token_served(&s);
        let pm_creds = with(pm_flags, ["--creds", &c]);
        let pulled = s.client().podman_pull_opts(&name(repo), None, &refs(&pm_creds));
        assert_pulled(&format!("{mode}: podman --creds"), &pulled, &img.manifest_digest);
        // regmirror's own credentials never read private content for a
        // client: the user's token requests are the clients', relayed.
        assert_relayed(&s, skopeo_tokens, repo, &format!("{mode}: skopeo"));
        assert_relayed(&s, mark, repo, &format!("{mode}: podman"));

        // Anonymous: the public image.
        let pulled = sk.skopeo_copy_opts(&name(pub_repo), None, sk_flags);
        assert_pulled(&format!("{mode}: skopeo anonymous"), &pulled, &pub_img.manifest_digest);
        let pulled = pm.podman_pull_opts(&name(pub_repo), None, pm_flags);
        assert_pulled(&format!("{mode}: podman anonymous"), &pulled, &pub_img.manifest_digest);
    }

    let checked = private_content_is_isolated(&s, &imgs);
    let (priv_repo, priv_img) = &imgs.private_t;
    let unchecked = Via::plain(&s).user_token(priv_repo);

    stop_upstream(&mut s);
    let (sk, pm) = (s.client(), s.client());
    for (name, sk_flags, pm_flags) in [
        (transparent(pub_repo), &[][..], &[][..]),
        (
            prefixed(&s, pub_repo),
            &["--src-tls-verify=false"][..],
            &["--tls-verify=false"][..],
        ),
    ] {
        assert_pulled(
            "upstream down: skopeo",
            &sk.skopeo_copy_opts(&name, None, sk_flags),
            &pub_img.manifest_digest,
        );
        assert_pulled(
            "upstream down: podman",
            &pm.podman_pull_opts(&name, None, pm_flags),
            &pub_img.manifest_digest,
        );
    }
    assert!(!sk.skopeo_copy(&transparent(priv_repo), None).0.success());
    let c = creds();
    assert!(
        !sk.skopeo_copy_opts(&transparent(priv_repo), None, &["--src-creds", &c])
            .0
            .success(),
        "upstream down: a fresh login cannot be checked, nothing private is served"
    );
    private_content_with_upstream_down(&s, priv_repo, priv_img, &checked, &unchecked);
}

/// Through the CONNECT proxy listener (`HTTPS_PROXY`, no /etc/hosts entry),
/// with regmirror holding credentials of its own: skopeo with the user's
/// credentials pulls the private image; anonymous skopeo and podman are
/// refused once it is cached, by tag and by digest; podman with the
/// credentials pulls it warm; the user's token requests are the clients'
/// own, relayed; anonymous clients get the public image.
#[test]
fn private_images_through_the_connect_listener() {
    let s = start_with(true, true);
    let imgs = Images::push(&s, "cx");
    let c = creds();
    let (repo, img) = &imgs.private_t;
    let name = transparent(repo);
    let by_digest = name.replace(":1", &format!("@{}", img.manifest_digest));

    let mark = token_served(&s);
    let pulled = s.connect_client().skopeo_copy_opts(&name, None, &["--src-creds", &c]);
    assert_pulled("CONNECT: skopeo --src-creds", &pulled, &img.manifest_digest);
    assert_relayed(&s, mark, repo, "CONNECT: skopeo");

    let (sk, pm) = (s.connect_client(), s.connect_client());
    assert_refused(&sk.skopeo_copy(&name, None).0);
    assert_refused(&sk.skopeo_copy(&by_digest, None).0);
    assert_refused(&pm.podman_pull(&name, None).0);
    assert_refused(&pm.podman_pull(&by_digest, None).0);

    let mark = token_served(&s);
    let pulled = s.connect_client().podman_pull_opts(&name, None, &["--creds", &c]);
    assert_pulled("CONNECT: podman --creds", &pulled, &img.manifest_digest);
    assert_relayed(&s, mark, repo, "CONNECT: podman");

    let (pub_repo, pub_img) = &imgs.public;
    let pulled = sk.skopeo_copy(&transparent(pub_repo), None);
    assert_pulled("CONNECT: skopeo anonymous", &pulled, &pub_img.manifest_digest);
    let pulled = pm.podman_pull(&transparent(pub_repo), None);
    assert_pulled("CONNECT: podman anonymous", &pulled, &pub_img.manifest_digest);
    assert!(
        s.rm.metrics()
            .lines()
            .any(|l| l.starts_with("regmirror_listener_requests_total{listener=\"connect\"}")),
        "the pulls did not come through the CONNECT listener"
    );
}

/// `docker login` + `docker pull` with a private dockerd (transparent mode:
/// `docker login` with no server, as Docker Hub users do; prefix mode:
/// `docker login PROXY:5000`). A wrong password fails the login. Each login
/// lives in a docker CLI config of this test only.
#[test]
fn docker_login_and_private_images() {
    let mut s = start(false);
    let imgs = Images::push(&s, "dk");
    let etc = common::tempdir("docker-etc-");
    std::fs::write(
        etc.path().join("daemon.json"),
        format!(r#"{{"insecure-registries": ["{}"]}}"#, s.plain()),
    )
    .expect("daemon.json");
    let dockerd = Dockerd::start(DockerdOpts {
        hosts: &s.transparent_hosts(),
        etc_docker: etc.path(),
        ssl_cert_file: Some(&s.rm.ca_pem),
        proxy_env: &[],
    });
    let (pub_repo, pub_img) = &imgs.public;
    let anon = dockerd.cli_config("anonymous");
    let user = dockerd.cli_config("user");
    let plain = s.plain();

    for (mode, server) in [("transparent", None), ("prefix", Some(plain.as_str()))] {
        let wrong = dockerd.cli_config(&format!("wrong-{mode}"));
        let out = dockerd.login(&wrong, server, PUSH_USER, "not-the-password");
        assert_refused(&out);
        let stored = std::fs::read_to_string(wrong.join("config.json")).unwrap_or_default();
        assert!(
            !stored.contains("\"auth\""),
            "{mode}: a failed login stored credentials: {stored}"
        );
        dockerd.login(&user, server, PUSH_USER, PUSH_PASSWORD).assert_ok();
    }

    for (mode, private, name) in [
        ("transparent", &imgs.private_t, transparent(&imgs.private_t.0)),
        ("prefix", &imgs.private_p, prefixed(&s, &imgs.private_p.0)),
    ] {
        let (repo, img) = private;
        let mark = token_served(&s);
        assert_pulled(
            &format!("{mode}: docker pull after docker login"),
            &dockerd.pull_as(&user, &name),
            &img.manifest_digest,
        );
        assert_relayed(&s, mark, repo, mode);
        let public = image_name(&s, mode, pub_repo);
        assert_pulled(
            &format!("{mode}: docker pull, anonymous"),
            &dockerd.pull_as(&anon, &public),
            &pub_img.manifest_digest,
        );
        // The private image is in the daemon and in regmirror's cache: the
        // daemon still asks, and regmirror refuses.
        assert_refused(&dockerd.pull_as(&anon, &name).0);
    }

    let checked = private_content_is_isolated(&s, &imgs);
    let (priv_repo, priv_img) = &imgs.private_t;
    let unchecked = Via::plain(&s).user_token(priv_repo);

    stop_upstream(&mut s);
    for public in [transparent(pub_repo), prefixed(&s, pub_repo)] {
        dockerd.docker_as(&anon, &["rmi", &public]).assert_ok();
    }
    for public in [transparent(pub_repo), prefixed(&s, pub_repo)] {
        assert_pulled(
            &format!("upstream down: docker pull {public}"),
            &dockerd.pull_as(&anon, &public),
            &pub_img.manifest_digest,
        );
    }
    assert!(!dockerd.pull_as(&anon, &transparent(priv_repo)).0.success());
    private_content_with_upstream_down(&s, priv_repo, priv_img, &checked, &unchecked);
}

/// containerd: `ctr images pull --user user:pw` (containerd's OAuth2
/// password grant, POSTed to regmirror's /token), transparent mode and
/// prefix mode over plain HTTP (`--plain-http`).
#[test]
fn containerd_private_images() {
    let mut s = start(false);
    let imgs = Images::push(&s, "ct");
    let ctrd = Containerd::start();
    let sb = s.client();
    let (pub_repo, pub_img) = &imgs.public;
    let c = creds();

    for (mode, private, name, flags) in [
        ("transparent", &imgs.private_t, transparent(&imgs.private_t.0), &[][..]),
        (
            "prefix",
            &imgs.private_p,
            prefixed(&s, &imgs.private_p.0),
            &["--plain-http"][..],
        ),
    ] {
        let (repo, img) = private;
        let mut with_user = flags.to_vec();
        with_user.extend(["--user", &c]);
        let mark = token_served(&s);
        assert_pulled(
            &format!("{mode}: ctr --user"),
            &ctrd.pull_flags(&sb, &name, &with_user),
            &img.manifest_digest,
        );
        assert_relayed(&s, mark, repo, mode);
        let public = image_name(&s, mode, pub_repo);
        assert_pulled(
            &format!("{mode}: ctr anonymous"),
            &ctrd.pull_flags(&sb, &public, flags),
            &pub_img.manifest_digest,
        );
        assert_refused(&ctrd.pull_flags(&sb, &name, flags).0);
    }

    let checked = private_content_is_isolated(&s, &imgs);
    let (priv_repo, priv_img) = &imgs.private_t;
    let unchecked = Via::plain(&s).user_token(priv_repo);

    stop_upstream(&mut s);
    let fresh = s.client();
    for (public, flags) in [
        (transparent(pub_repo), &[][..]),
        (prefixed(&s, pub_repo), &["--plain-http"][..]),
    ] {
        ctrd.ctr(&fresh, &["images", "rm", &public]).assert_ok();
        assert_pulled(
            &format!("upstream down: ctr pull {public}"),
            &ctrd.pull_flags(&fresh, &public, flags),
            &pub_img.manifest_digest,
        );
    }
    assert!(!ctrd.pull_flags(&fresh, &transparent(priv_repo), &[]).0.success());
    private_content_with_upstream_down(&s, priv_repo, priv_img, &checked, &unchecked);
}
