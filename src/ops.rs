//! The ops listener: `/healthz`, `/readyz`, `/metrics` and the key API. It answers
//! from what its host (the running keygate) tells it, through `OpsHost`.

pub mod key_api;

use std::convert::Infallible;
use std::sync::Arc;

use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::{full, Body};
use crate::client_keys::store::{BoxFuture, KeyBackend};
use crate::config::Secret;
use crate::error::ProxyError;
use crate::headers;
use crate::server::{ConnInfo, Handler};
pub use key_api::Change;

/// Held while a key change is made and applied: no reload interleaves, so the
/// change is recorded under the caller that made it.
pub struct KeyChangeGuard(pub tokio::sync::OwnedMutexGuard<()>);

/// What the ops listener needs from the running keygate.
pub trait OpsHost: Send + Sync + 'static {
    /// Why the process is not ready (empty: ready).
    fn not_ready(&self) -> Vec<String>;

    /// The metrics exposition text and its content type.
    fn metrics(&self) -> (String, &'static str);

    /// The admin token and the key store, when the key API is on.
    fn key_api(&self) -> Option<(Secret, Arc<dyn KeyBackend>)>;

    /// Waits for the right to change keys.
    fn changing_keys(&self) -> BoxFuture<'_, KeyChangeGuard>;

    /// Records `changes` as made by `principal` and applies them (a reload)
    /// before the guard is released.
    fn keys_changed(
        &self,
        guard: KeyChangeGuard,
        principal: String,
        changes: Vec<Change>,
    ) -> BoxFuture<'_, ()>;
}

pub struct OpsHandler<H: OpsHost> {
    pub host: Arc<H>,
}

/// The largest key API request body.
const MAX_API_BODY: usize = 64 * 1024;
const KEY_API: &str = "/api/api_accesses";

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

impl<H: OpsHost> OpsHandler<H> {
    async fn key_api(
        &self,
        request: Request<Incoming>,
        conn: ConnInfo,
    ) -> Result<Response<Body>, ProxyError> {
        use http_body_util::BodyExt as _;
        let Some((token, keys)) = self.host.key_api() else {
            return Err(ProxyError::NotFound);
        };
        let rest = request.uri().path()[KEY_API.len()..].to_owned();
        if !(rest.is_empty() || rest.starts_with('/')) || rest.matches('/').count() > 1 {
            return Err(ProxyError::NotFound);
        }
        let presented = request.headers().get(http::header::AUTHORIZATION);
        if !key_api::admin_token_matches(presented, token.expose()) {
            tracing::warn!(peer = %conn.peer, "key API call without the admin token");
            return Err(ProxyError::AdminUnauthorized);
        }
        let method = request.method().clone();
        let body = http_body_util::Limited::new(request.into_body(), MAX_API_BODY)
            .collect()
            .await
            .map_err(|_| {
                ProxyError::InvalidRequest(format!(
                    "expected a JSON body of at most {MAX_API_BODY} bytes"
                ))
            })?
            .to_bytes();
        if method == Method::GET || method == Method::HEAD {
            let answer = key_api::handle(keys.as_ref(), &method, &rest, &body).await?;
            return Ok(json(answer.status, &answer.body));
        }
        // A change: made and applied before the answer, under the change lock.
        let guard = self.host.changing_keys().await;
        let answer = key_api::handle(keys.as_ref(), &method, &rest, &body).await?;
        let principal = format!("key API (ops admin token) from {}", conn.peer.ip());
        for change in &answer.changes {
            tracing::info!(action = change.action, client_id = %change.client_id, key_id = %change.key_id, peer = %conn.peer, "key API changed a key");
        }
        self.host
            .keys_changed(guard, principal, answer.changes.clone())
            .await;
        Ok(json(answer.status, &answer.body))
    }
}

impl<H: OpsHost> Handler for OpsHandler<H> {
    type Conn = ConnInfo;

    fn connect(&self, info: ConnInfo) -> ConnInfo {
        info
    }

    async fn call<G: Send + 'static>(
        self: Arc<Self>,
        request: Request<Incoming>,
        conn: Arc<ConnInfo>,
        in_flight: G,
    ) -> Result<Response<Body>, Infallible> {
        let response = self.answer(request, conn).await;
        drop(in_flight);
        Ok(response)
    }
}

impl<H: OpsHost> OpsHandler<H> {
    async fn answer(&self, request: Request<Incoming>, conn: Arc<ConnInfo>) -> Response<Body> {
        let get = matches!(*request.method(), Method::GET | Method::HEAD);
        let path = request.uri().path();
        if path == KEY_API || path.starts_with("/api/api_accesses/") {
            let request_id = headers::new_request_id();
            return match self.key_api(request, *conn).await {
                Ok(response) => response,
                Err(e) => e.to_response(&request_id),
            };
        }
        match path {
            "/healthz" if get => json(StatusCode::OK, &serde_json::json!({"ok": true})),
            "/readyz" if get => {
                let reasons = self.host.not_ready();
                let ready = reasons.is_empty();
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json(
                    status,
                    &serde_json::json!({"ready": ready, "reasons": reasons}),
                )
            }
            "/metrics" if get => {
                let (text, content_type) = self.host.metrics();
                let mut response = Response::new(full(text));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
                response
            }
            _ => ProxyError::NotFound.to_response(&headers::new_request_id()),
        }
    }
}
