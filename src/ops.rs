//! The ops listener: liveness, readiness. Readiness is a latch of named reasons:
//! any component may set or clear its own; the process is ready when none is set.

use std::collections::BTreeMap;
use std::sync::Mutex;

use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::{full, Body};
use crate::error::ProxyError;
use crate::headers;
use crate::proxy::ConnInfo;
use crate::server::Handler;

/// Why the process is not ready, by component.
#[derive(Debug, Default)]
pub struct Readiness {
    reasons: Mutex<BTreeMap<&'static str, String>>,
}

impl Readiness {
    /// Sets `component`'s reason; returns whether it changed (to log once, not per request).
    pub fn set(&self, component: &'static str, reason: impl Into<String>) -> bool {
        let reason = reason.into();
        let mut map = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(component, reason.clone()).as_deref() != Some(reason.as_str())
    }

    /// Clears `component`'s reason; returns whether one was set.
    pub fn clear(&self, component: &'static str) -> bool {
        let mut map = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(component).is_some()
    }

    pub fn reasons(&self) -> Vec<String> {
        let map = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(k, v)| format!("{k}: {v}")).collect()
    }
}

pub struct OpsService {
    pub control: crate::Control,
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

impl OpsService {
    async fn key_api(
        &self,
        request: Request<Incoming>,
        conn: ConnInfo,
    ) -> Result<Response<Body>, ProxyError> {
        use http_body_util::BodyExt as _;
        let gateway = self.control.gateway();
        let Some(token) = gateway
            .config
            .ops
            .as_ref()
            .and_then(|o| o.admin_token.clone())
        else {
            return Err(ProxyError::NotFound);
        };
        let rest = request.uri().path()[KEY_API.len()..].to_owned();
        if !(rest.is_empty() || rest.starts_with('/')) || rest.matches('/').count() > 1 {
            return Err(ProxyError::NotFound);
        }
        let presented = request.headers().get(http::header::AUTHORIZATION);
        if !crate::client_keys::api::admin_token_matches(presented, token.expose()) {
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
        let keys_file = gateway.config.clients.keys_file.clone();
        let answer = tokio::task::spawn_blocking(move || {
            crate::client_keys::api::handle(&keys_file, &method, &rest, &body)
        })
        .await
        .map_err(|_| ProxyError::KeysFileError)??;
        for change in &answer.changes {
            tracing::info!(action = change.action, client_id = %change.client_id, key_id = %change.key_id, peer = %conn.peer, "key API changed the keys file");
        }
        if !answer.changes.is_empty() {
            // Apply at once rather than at the next poll; a refused reload keeps the
            // old keys and is logged.
            let _ = self.control.reload(&format!(
                "key API (ops admin token) from {}",
                conn.peer.ip()
            ));
        }
        Ok(json(answer.status, &answer.body))
    }
}

impl Handler for OpsService {
    async fn call(&self, request: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        let get = matches!(*request.method(), Method::GET | Method::HEAD);
        let path = request.uri().path();
        if path == KEY_API || path.starts_with("/api/api_accesses/") {
            let request_id = headers::new_request_id();
            return match self.key_api(request, conn).await {
                Ok(response) => response,
                Err(e) => e.to_response(&request_id),
            };
        }
        match path {
            "/healthz" if get => json(StatusCode::OK, &serde_json::json!({"ok": true})),
            "/readyz" if get => {
                let reasons = self.control.readiness.reasons();
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
                let mut gauges = Vec::new();
                if let Some(left) = self.control.admin_keys().seconds_left() {
                    gauges.push(("keygate_admin_key_seconds_left", left));
                }
                let mut response = Response::new(full(self.control.metrics().render(&gauges)));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            _ => ProxyError::NotFound.to_response(&headers::new_request_id()),
        }
    }
}
