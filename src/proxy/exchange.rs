//! What happened to one request, gathered as the pipeline runs, for the access log,
//! the metrics and the audit records. It holds cheap clones of what the request
//! already carries (header values, the URI, the key) rather than copies, and
//! nothing secret: no credential, no cookie, no body.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderValue, USER_AGENT};
use http::{Method, Request, Uri};

use crate::admin_key::Lease;
use crate::audit::record::{self, Clip, Truncated};
use crate::audit::Encoded;
use crate::client_keys::ApiKey;
use crate::route::CanonicalPath;

pub struct Exchange {
    pub request_id: HeaderValue,
    pub remote_addr: SocketAddr,
    pub method: Method,
    /// The target as received (for a refused path, what is logged).
    pub uri: Uri,
    /// The canonical path once known.
    pub path: Option<CanonicalPath>,
    pub user_agent: Option<HeaderValue>,
    pub key: Option<Arc<ApiKey>>,
    /// The client_id a refused credential claimed.
    pub claimed: Option<String>,
    /// The deciding route's position and name.
    pub route: Option<(usize, Arc<str>)>,
    /// The deciding route has `admin_key: true`.
    pub bypass_route: bool,
    /// keygate added the bypass header (its start record is durable).
    pub admin_key: bool,
    pub lease: Option<Lease>,
    pub upstream_status: Option<u16>,
    pub auth_failure: Option<&'static str>,
    pub bytes_in: Arc<AtomicU64>,
    pub started: Instant,
    /// The durable start record's bytes, to make the end record from.
    pub start_record: Option<record::Started>,
}

impl Exchange {
    pub fn new<B>(request: &Request<B>, remote_addr: SocketAddr, request_id: HeaderValue) -> Self {
        Exchange {
            request_id,
            remote_addr,
            method: request.method().clone(),
            uri: request.uri().clone(),
            path: None,
            user_agent: request.headers().get(USER_AGENT).cloned(),
            key: None,
            claimed: None,
            route: None,
            bypass_route: false,
            admin_key: false,
            lease: None,
            upstream_status: None,
            auth_failure: None,
            bytes_in: Arc::default(),
            started: Instant::now(),
            start_record: None,
        }
    }

    pub fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or("")
    }

    /// The canonical path, or the raw one for a refused target.
    pub fn path(&self) -> &str {
        match &self.path {
            Some(p) => p.as_str(),
            None => self.uri.path(),
        }
    }

    pub fn client_id(&self) -> Option<&str> {
        self.key
            .as_ref()
            .map(|k| k.client_id.as_str())
            .or(self.claimed.as_deref())
    }

    pub fn route_name(&self) -> Option<&str> {
        self.route.as_ref().map(|(_, n)| &**n)
    }

    fn user_agent(&self) -> Option<&str> {
        self.user_agent.as_ref().and_then(|v| v.to_str().ok())
    }

    /// The `phase: "start"` record of a bypass request, and its bytes to keep
    /// in `start_record` once it is durable.
    pub fn start_record(&self) -> (Encoded, record::Started) {
        self.request(None, 0).start()
    }

    /// The `phase: "end"` record, from the start record's bytes when there is one.
    pub fn end_record(&mut self, status: u16, bytes_out: u64) -> Encoded {
        let Some(started) = self.start_record.take() else {
            return self.request(Some(status), bytes_out).encode();
        };
        started.end(&record::Outcome {
            status: Some(status),
            upstream_status: self.upstream_status,
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out,
            duration_ms: Some(self.elapsed_ms()),
        })
    }

    /// The `request` record: `phase: "start"` (no status yet) or `"end"`.
    fn request(&self, status: Option<u16>, bytes_out: u64) -> record::Request<'_> {
        let end = status.is_some();
        let lease = self.lease.as_ref().filter(|_| self.admin_key);
        let mut truncated = Truncated::default();
        record::Request {
            phase: if end { "end" } else { "start" },
            request_id: self.request_id(),
            client_id: truncated.note(
                "client_id",
                self.client_id()
                    .map(|c| Clip::new(c, record::MAX_CLIENT_ID)),
            ),
            key_name: self.key.as_ref().map(|k| k.name.as_str()),
            remote_addr: self.remote_addr,
            method: Clip::new(self.method.as_str(), record::MAX_METHOD),
            path: truncated
                .note("path", Some(Clip::new(self.path(), record::MAX_PATH)))
                .unwrap_or_else(|| Clip::new("", 0)),
            query: truncated.note(
                "query",
                self.uri.query().map(|q| Clip::new(q, record::MAX_QUERY)),
            ),
            route: self.route_name(),
            admin_key: self.admin_key,
            admin_account: lease.map(|l| l.account_id.as_str()),
            admin_key_expires: lease.map(|l| l.expires),
            status,
            upstream_status: self.upstream_status.filter(|_| end),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out,
            duration_ms: end.then(|| self.elapsed_ms()),
            user_agent: truncated.note(
                "user_agent",
                self.user_agent()
                    .map(|u| Clip::new(u, record::MAX_USER_AGENT)),
            ),
            truncated,
        }
    }

    /// The `auth_failure` record.
    pub fn auth_failure_record(&self) -> Encoded {
        let mut truncated = Truncated::default();
        let record = record::AuthFailure {
            request_id: self.request_id(),
            client_id: truncated.note(
                "client_id",
                self.client_id()
                    .map(|c| Clip::new(c, record::MAX_CLIENT_ID)),
            ),
            reason: self.auth_failure.unwrap_or("unknown"),
            remote_addr: self.remote_addr,
            method: Clip::new(self.method.as_str(), record::MAX_METHOD),
            path: truncated
                .note("path", Some(Clip::new(self.path(), record::MAX_PATH)))
                .unwrap_or_else(|| Clip::new("", 0)),
            user_agent: truncated.note(
                "user_agent",
                self.user_agent()
                    .map(|u| Clip::new(u, record::MAX_USER_AGENT)),
            ),
            truncated,
        };
        record::encode("auth_failure", &record)
    }

    pub fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}
