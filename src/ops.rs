//! The ops listener: liveness, readiness. Readiness is a latch of named reasons:
//! any component may set or clear its own; the process is ready when none is set.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

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
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub admin_keys: Arc<crate::proxy::SiteAdminKeys>,
}

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

impl Handler for OpsService {
    async fn call(&self, request: Request<Incoming>, _conn: ConnInfo) -> Response<Body> {
        let get = matches!(*request.method(), Method::GET | Method::HEAD);
        match request.uri().path() {
            "/healthz" if get => json(StatusCode::OK, &serde_json::json!({"ok": true})),
            "/readyz" if get => {
                let reasons = self.readiness.reasons();
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
                if let Some(left) = self.admin_keys.seconds_left() {
                    gauges.push(("keygate_admin_key_seconds_left", left));
                }
                let mut response = Response::new(full(self.metrics.render(&gauges)));
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
