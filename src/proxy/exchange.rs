//! What happened to one request, gathered as the pipeline runs, for the access log,
//! the metrics and the audit records. Holds nothing secret: no credential, no
//! cookie, no body.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::header::USER_AGENT;
use http::Request;
use serde_json::Value;

use crate::admin_key::Lease;

pub struct Exchange {
    pub request_id: String,
    pub remote_addr: SocketAddr,
    pub method: String,
    /// The canonical path once known; the raw one for a refused target.
    pub path: String,
    pub query: Option<String>,
    pub user_agent: Option<String>,
    pub client_id: Option<String>,
    pub key_name: Option<String>,
    pub route: Option<String>,
    /// The deciding route has `admin_key: true`.
    pub bypass_route: bool,
    /// keygate added the bypass header (its start record is on disk).
    pub admin_key: bool,
    pub lease: Option<Lease>,
    pub upstream_status: Option<u16>,
    pub auth_failure: Option<&'static str>,
    pub bytes_in: Arc<AtomicU64>,
    pub started: Instant,
}

impl Exchange {
    pub fn new<B>(request: &Request<B>, remote_addr: SocketAddr, request_id: String) -> Self {
        Exchange {
            request_id,
            remote_addr,
            method: request.method().to_string(),
            path: request.uri().path().to_owned(),
            query: request.uri().query().map(str::to_owned),
            user_agent: request
                .headers()
                .get(USER_AGENT)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
            client_id: None,
            key_name: None,
            route: None,
            bypass_route: false,
            admin_key: false,
            lease: None,
            upstream_status: None,
            auth_failure: None,
            bytes_in: Arc::default(),
            started: Instant::now(),
        }
    }

    /// The fields of a `request` record; `status` is `None` for `phase: "start"`.
    pub fn request_fields(
        &self,
        phase: &'static str,
        admin_key: bool,
        status: Option<u16>,
        bytes_out: u64,
    ) -> Vec<(&'static str, Value)> {
        let lease = self.lease.as_ref().filter(|_| admin_key);
        let end = status.is_some();
        vec![
            ("phase", Value::from(phase)),
            ("request_id", Value::from(self.request_id.as_str())),
            ("client_id", Value::from(self.client_id.clone())),
            ("key_name", Value::from(self.key_name.clone())),
            ("remote_addr", Value::from(self.remote_addr.to_string())),
            ("method", Value::from(self.method.as_str())),
            ("path", Value::from(self.path.as_str())),
            ("query", Value::from(self.query.clone())),
            ("route", Value::from(self.route.clone())),
            ("admin_key", Value::from(admin_key)),
            (
                "admin_account",
                Value::from(lease.map(|l| l.account_id.clone())),
            ),
            (
                "admin_key_expires",
                Value::from(lease.map(|l| crate::rfc3339::format_seconds(l.expires))),
            ),
            ("status", Value::from(status)),
            (
                "upstream_status",
                Value::from(self.upstream_status.filter(|_| end)),
            ),
            (
                "bytes_in",
                Value::from(self.bytes_in.load(Ordering::Relaxed)),
            ),
            ("bytes_out", Value::from(bytes_out)),
            (
                "duration_ms",
                if end {
                    Value::from(self.started.elapsed().as_millis() as u64)
                } else {
                    Value::Null
                },
            ),
            ("user_agent", Value::from(self.user_agent.clone())),
        ]
    }

    pub fn auth_failure_fields(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("request_id", Value::from(self.request_id.as_str())),
            ("client_id", Value::from(self.client_id.clone())),
            ("reason", Value::from(self.auth_failure)),
            ("remote_addr", Value::from(self.remote_addr.to_string())),
            ("method", Value::from(self.method.as_str())),
            ("path", Value::from(self.path.as_str())),
            ("user_agent", Value::from(self.user_agent.clone())),
        ]
    }
}
