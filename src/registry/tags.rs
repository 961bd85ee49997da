//! `/v2/<name>/tags/list`: always asked of upstream (tags change), with the
//! last answer kept and served when upstream fails.

use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Method, Response};

use super::body::{full, Body};
use super::errors::{OciCode, RegistryError};
use super::outcome::RequestOutcome;
use super::App;
use crate::auth::Access;
use crate::reference::Digest;
use crate::route::RepoRequest;
use crate::upstream::UpstreamRequest;

const MAX_TAGS_BODY: usize = 16 << 20;

pub async fn list(
    app: &Arc<App>,
    r: &RepoRequest,
    head: bool,
    access: &Access<'_>,
) -> Result<Response<Body>, RegistryError> {
    let client = &app.upstream(r).client;
    let key = Digest::of(r.forward_query.as_deref().unwrap_or("").as_bytes()).hex()[..16].to_string();
    let req = UpstreamRequest {
        method: Method::GET,
        path: format!("/v2/{}/tags/list", r.repo),
        query: r.forward_query.clone(),
        headers: HeaderMap::new(),
        scope: format!("repository:{}:pull", r.repo),
        credential: access.credential(),
    };
    let failure = match client.get_ok(&req).await {
        Ok(resp) => {
            let link = resp.headers().get(header::LINK).cloned();
            let body = resp.bytes(MAX_TAGS_BODY, &format!("tags of {}", r.repo)).await?;
            let body = rename(&body, &r.client_repo);
            // Kept for stale serving only when anyone may read it.
            if access.answers_are_public() {
                access.note_public();
                app.cache.record_tag_list(app.repo_key(r), &key, &body).await;
            }
            let mut out = respond(body, head);
            if let Some(link) = link.and_then(|l| rewrite_link(&l, r)) {
                out.headers_mut().insert(header::LINK, link);
            }
            return Ok(out);
        }
        Err(e) => e,
    };
    if failure.is_transient() {
        if let Some(body) = app.cache.last_tag_list(app.repo_key(r), &key).await {
            tracing::warn!(upstream = %app.upstream(r).name(), repo = %r.repo, error = %failure, "upstream failed; serving the cached tag list");
            let mut out = respond(body, head);
            out.headers_mut().insert(
                header::WARNING,
                HeaderValue::from_static("110 regmirror \"Response is Stale\""),
            );
            RequestOutcome::Stale.mark(&mut out);
            return Ok(out);
        }
    }
    Err(RegistryError::from(failure).when_not_found(
        OciCode::NameUnknown,
        format!("repository name not known to registry: {}", r.client_repo),
    ))
}

fn respond(body: Vec<u8>, head: bool) -> Response<Body> {
    let len = body.len();
    let mut out = Response::new(if head { super::body::empty() } else { full(body) });
    out.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    out.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    out
}

/// Upstream answers with its own repository name; the client asked by its name.
fn rename(body: &[u8], client_repo: &str) -> Vec<u8> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(mut v) => {
            if let Some(obj) = v.as_object_mut() {
                obj.insert("name".into(), serde_json::Value::String(client_repo.to_string()));
            }
            serde_json::to_vec(&v).unwrap_or_else(|_| body.to_vec())
        }
        Err(_) => body.to_vec(),
    }
}

/// `Link: </v2/library/x/tags/list?last=a&n=5>; rel="next"` in client names.
fn rewrite_link(link: &HeaderValue, r: &RepoRequest) -> Option<HeaderValue> {
    let s = link.to_str().ok()?;
    let from = format!("/v2/{}/tags/list", r.repo);
    let to = format!("/v2/{}/tags/list", r.client_repo);
    HeaderValue::from_str(&s.replace(&from, &to)).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn tag_list_names_are_the_clients() {
        let out = super::rename(br#"{"name":"library/alpine","tags":["3"]}"#, "dockerhub/library/alpine");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["name"], "dockerhub/library/alpine");
        assert_eq!(v["tags"][0], "3");
    }
}
