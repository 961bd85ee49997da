//! The HTTP half of regmirror's `/token` endpoint: answers a client's token
//! request from what `auth::token` decides, relaying to upstream's realm
//! when the client has credentials, else with regmirror's own anonymous
//! token.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};

use super::body::{full, Body};
use super::errors::RegistryError;
use super::outcome::AnsweredFor;
use super::App;
use crate::auth::token::{anonymous_token_body, echo_in_client_names, relay_plan, upstream_for, TokenRequest};
use crate::metrics::{UpstreamLabel, METRICS};
use crate::upstream::token::Challenge;
use crate::upstream::AuthScheme;

/// Answers one `/token` request.
pub async fn serve(
    app: &App,
    host: Option<&str>,
    method: &Method,
    query: Option<&str>,
    headers: &HeaderMap,
    form: Bytes,
) -> Result<Response<Body>, RegistryError> {
    let authorization = headers.get(header::AUTHORIZATION).cloned();
    let req = TokenRequest::parse(method, query, authorization.is_some(), &form);
    let id = upstream_for(&app.routes, host, &req);
    let upstream = app.upstreams.get(id);
    if !req.has_credentials {
        return Ok(anonymous_token(upstream.name()));
    }
    let service = match upstream.client.discover_auth().await {
        AuthScheme::Challenges(Challenge::Bearer { service, .. }) => service,
        // Nothing to exchange credentials for: the upstream is open or
        // takes Basic credentials on every request.
        AuthScheme::Open | AuthScheme::Challenges(Challenge::Basic) => return Ok(anonymous_token(upstream.name())),
        AuthScheme::Unknown => {
            return Err(RegistryError::unavailable(format!(
                "upstream {} cannot be reached to check credentials",
                upstream.name()
            )))
        }
    };
    let plan = relay_plan(&app.routes, host, id, &req, method, service.as_deref(), authorization);
    let answer = upstream.client.relay_token(plan.relay).await?;
    let body = echo_in_client_names(answer.body, &plan.renamed);
    let mut resp = Response::new(full(body.clone()));
    *resp.status_mut() = answer.status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        answer
            .content_type
            .unwrap_or_else(|| HeaderValue::from_static("application/json")),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    METRICS
        .tokens_relayed
        .get_or_create(&UpstreamLabel::of(upstream.name()))
        .inc();
    resp.extensions_mut().insert(AnsweredFor(upstream.name().to_string()));
    tracing::info!(upstream = %upstream.name(), status = answer.status.as_u16(), scopes = plan.scopes, "token request relayed");
    Ok(resp)
}

/// regmirror's own token for a client without credentials.
fn anonymous_token(upstream: &str) -> Response<Body> {
    METRICS.tokens_issued.get_or_create(&UpstreamLabel::of(upstream)).inc();
    let body = anonymous_token_body();
    let mut resp = Response::new(full(body.clone()));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    resp.extensions_mut().insert(AnsweredFor(upstream.to_string()));
    resp
}
