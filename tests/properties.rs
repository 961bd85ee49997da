//! Property tests over everything a client can put in a request line and
//! its headers: paths, hosts, references, digests, query strings and Accept
//! lists. Whatever comes in, nothing panics, and every rejection becomes an
//! OCI error body with a 4xx status.

use futures_util::FutureExt;
use http_body_util::BodyExt;
use proptest::prelude::*;
use regmirror::config::Settings;
use regmirror::reference::{Digest, Reference, RepoName};
use regmirror::registry::errors::RegistryError;
use regmirror::registry::manifests::parse_accept;
use regmirror::route::{route, Endpoint, Kind, RouteTable};

fn table() -> RouteTable {
    RouteTable::from_settings(&Settings::load(None).expect("built-in config"))
}

/// A rejection as the client sees it: a 4xx with `{"errors":[{code,...}]}`.
fn assert_oci_rejection(e: regmirror::route::RouteError) {
    let resp = RegistryError::from(e).into_response();
    let status = resp.status();
    assert!(status.is_client_error(), "rejections are the request's fault: {status}");
    let body = resp
        .into_body()
        .collect()
        .now_or_never()
        .expect("error bodies are in memory")
        .expect("error body")
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).expect("error body is JSON");
    assert!(v["errors"][0]["code"].is_string(), "{v}");
    assert!(v["errors"][0]["message"].is_string(), "{v}");
}

/// Path pieces that look like a registry request, with the odd bytes
/// hostile clients send.
fn path_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]{1,8}",
        Just("..".to_string()),
        Just(".".to_string()),
        Just("%2f".to_string()),
        Just("".to_string()),
        Just("library".to_string()),
        Just("dockerhub".to_string()),
        Just("manifests".to_string()),
        Just("blobs".to_string()),
        Just("tags".to_string()),
        Just("list".to_string()),
        Just("uploads".to_string()),
        "sha(256|512):[0-9a-fA-F]{0,130}",
        "[ -~]{0,12}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(path_piece(), 0..8).prop_map(|parts| format!("/v2/{}", parts.join("/")))
}

fn host() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![
        Just("registry-1.docker.io".to_string()),
        Just("ghcr.io".to_string()),
        Just("quay.io".to_string()),
        Just("regmirror.local".to_string()),
        "[a-z0-9.-]{0,20}",
    ])
}

fn query() -> impl Strategy<Value = Option<String>> {
    prop::option::of(
        prop::collection::vec(
            (
                prop_oneof![Just("n"), Just("last"), Just("ns"), Just("x"), Just("")],
                "[ -~]{0,12}",
            ),
            0..5,
        )
        .prop_map(|kv| {
            kv.into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("&")
        }),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn routing_never_panics_and_rejects_with_oci_errors(p in path(), h in host(), q in query()) {
        let t = table();
        match route(&t, h.as_deref(), &p, q.as_deref()) {
            Err(e) => assert_oci_rejection(e),
            Ok(Endpoint::Repo(r)) => {
                // What was accepted is valid by construction.
                prop_assert!(RepoName::parse(r.repo.as_str()).is_ok());
                prop_assert!(!r.repo.as_str().contains(".."));
                if let Some(fq) = &r.forward_query {
                    prop_assert_eq!(&r.kind, &Kind::TagsList);
                    for (k, _) in form_urlencoded::parse(fq.as_bytes()) {
                        prop_assert!(k == "n" || k == "last", "only pagination is forwarded: {}", fq);
                    }
                }
            }
            Ok(_) => {}
        }
    }

    #[test]
    fn arbitrary_bytes_in_the_path_never_panic(raw in "[\\x00-\\x7f]{0,200}", q in "[ -~]{0,60}") {
        let t = table();
        if let Err(e) = route(&t, Some("docker.io"), &raw, Some(&q)) {
            assert_oci_rejection(e);
        }
    }

    #[test]
    fn digests_parse_only_in_their_own_grammar_and_round_trip(s in "(sha256|sha512|md5|SHA256)?:?[0-9a-fA-F./]{0,140}") {
        if let Ok(d) = Digest::parse(&s) {
            prop_assert_eq!(d.to_string(), s.clone());
            let hex_len = if s.starts_with("sha256:") { 64 } else { 128 };
            prop_assert_eq!(d.hex().len(), hex_len);
            prop_assert!(d.hex().bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        }
    }

    #[test]
    fn well_formed_digests_of_both_algorithms_are_accepted(hex in "[0-9a-f]{128}") {
        let d256 = format!("sha256:{}", &hex[..64]);
        prop_assert!(Digest::parse(&d256).is_ok());
        let d512 = format!("sha512:{hex}");
        prop_assert!(Digest::parse(&d512).is_ok());
        prop_assert!(matches!(Reference::parse(&d512), Ok(Reference::Digest(_))));
    }

    #[test]
    fn references_never_panic_and_accepted_tags_are_safe_path_components(s in "[ -~]{0,140}") {
        if let Ok(Reference::Tag(t)) = Reference::parse(&s) {
            prop_assert!(!t.as_str().contains('/'));
            prop_assert!(!t.as_str().starts_with('.'));
            prop_assert!(t.as_str().len() <= 128);
        }
    }

    #[test]
    fn accept_lists_keep_the_clients_types_in_order_and_never_panic(
        types in prop::collection::vec("[a-z]{1,8}/[a-z.+-]{1,20}", 1..6),
        junk in "[ -~]{0,80}",
    ) {
        let weighted = types.iter().map(|t| format!(" {t} ;q=0.5")).collect::<Vec<_>>().join(",");
        let parsed = parse_accept(&weighted);
        prop_assert_eq!(parsed.iter().map(|r| r.media_type.clone()).collect::<Vec<_>>(), types);
        prop_assert!(parsed.iter().all(|r| r.weight == 500));
        let _ = parse_accept(&junk);
    }
}

// ---------------------------------------------------------------- auth parsers

use regmirror::auth::challenge::{for_client, Origin};
use regmirror::auth::scope::Scope;
use regmirror::auth::token::TokenRequest;
use regmirror::upstream::token::{parse_challenge, Challenge};
use regmirror::upstream::{AuthScheme, UpstreamId};

/// A repository name component of the OCI grammar.
fn component() -> impl Strategy<Value = String> {
    "[a-z0-9]{1,6}([._-][a-z0-9]{1,4})?"
}

fn repo_name(min: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(component(), min..4).prop_map(|c| c.join("/"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn challenge_parser_never_panics(s in "[ -~]{0,200}") {
        let _ = parse_challenge(&s);
    }

    #[test]
    fn challenges_regmirror_gives_parse_back_to_what_it_meant(
        host in "[a-z0-9.-]{1,20}(:[0-9]{1,5})?",
        service in "[ -~]{1,30}",
        name in repo_name(1),
        tls in any::<bool>(),
        ns in prop::option::of("[a-z0-9.]{1,12}"),
    ) {
        let scheme = AuthScheme::Challenges(Challenge::Bearer {
            realm: "https://auth.example/token".into(),
            service: Some(service.clone()),
            scope: None,
        });
        let origin = Origin { tls, host: host.clone(), ns: ns.clone() };
        let scope = Scope::pull(&name);
        let value = for_client(&scheme, "up", &origin, Some(&scope)).expect("a challenge");
        let parsed = parse_challenge(value.to_str().unwrap()).expect("parses");
        let clean_service: String = service.chars().filter(|c| !c.is_control()).collect();
        prop_assert_eq!(parsed, Challenge::Bearer {
            realm: origin.realm(),
            service: Some(clean_service),
            scope: Some(scope.to_string()),
        });
    }

    #[test]
    fn scopes_rewrite_to_upstream_names_and_back(name in repo_name(2), actions in prop::sample::subsequence(vec!["pull", "push"], 1..=2)) {
        let t = table();
        let hub = UpstreamId::from_config_index(0);
        let client = Scope::Repository {
            class: "repository".into(),
            name: format!("dockerhub/{name}"),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        };
        let up = client.to_upstream(&t, Some("regmirror.local"), None, hub).expect("a Docker Hub scope");
        prop_assert_eq!(up.repository(), Some(name.as_str()));
        prop_assert_eq!(up.to_client(Some("dockerhub")), client.clone());
        // Transparent mode: names are upstream's already.
        let direct = Scope::pull(&name);
        prop_assert_eq!(direct.to_upstream(&t, Some("registry-1.docker.io"), None, hub), Some(direct.clone()));
        prop_assert_eq!(Scope::parse(&client.to_string()), Some(client));
    }

    #[test]
    fn token_requests_never_panic(q in "[ -~]{0,120}", form in prop::collection::vec(any::<u8>(), 0..200), post in any::<bool>(), auth in any::<bool>()) {
        let method = if post { http::Method::POST } else { http::Method::GET };
        let r = TokenRequest::parse(&method, Some(&q), auth, &form);
        for s in &r.scopes {
            let again = Scope::parse(&s.to_string());
            prop_assert_eq!(again.as_ref(), Some(s));
        }
    }
}
