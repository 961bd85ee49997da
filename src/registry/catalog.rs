//! `/v2/_catalog`: the repositories regmirror holds tags for. Asked through
//! an upstream's hostname it lists that upstream's repositories; on the
//! proxy's own name it lists all of them under their namespace prefix.

use std::sync::Arc;

use http::{header, HeaderValue, Response};

use super::body::{full, Body};
use super::errors::RegistryError;
use super::App;
use crate::auth::Identity;
use crate::upstream::UpstreamId;

pub async fn list(
    app: &Arc<App>,
    upstream: Option<UpstreamId>,
    query: Option<&str>,
    identity: &Identity,
) -> Result<Response<Body>, RegistryError> {
    let mut repos = Vec::new();
    for u in app.upstreams.iter() {
        if upstream.is_some_and(|want| want != u.id) {
            continue;
        }
        let names = app
            .cache
            .repositories(u.name())
            .await
            .map_err(|e| RegistryError::internal(format!("listing the cache: {e}")))?;
        // Only what this client may read: private repositories stay
        // invisible without a token checked for them.
        for n in names.into_iter().filter(|n| app.auth.visible(identity, u, n)) {
            repos.push(if upstream.is_some() {
                n
            } else {
                format!("{}/{n}", u.config.namespace)
            });
        }
    }
    repos.sort();
    let mut n = None;
    let mut last = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "n" => n = v.parse::<usize>().ok(),
            "last" => last = Some(v.into_owned()),
            _ => {}
        }
    }
    if let Some(last) = last {
        repos.retain(|r| *r > last);
    }
    if let Some(n) = n {
        repos.truncate(n);
    }
    let body = serde_json::json!({ "repositories": repos }).to_string();
    let mut resp = Response::new(full(body));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}
