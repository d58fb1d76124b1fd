//! The request pipeline, top to bottom. Every request goes through these phases
//! in this order, and each refusal happens before anything reaches Confluence:
//!
//! 1. request id: the client's if well-formed, else a new UUIDv7;
//! 2. target: origin form only, canonical path (400) — the path matched is the
//!    path forwarded;
//! 3. exactly one credential (400), then authentication (401, 429 when over the
//!    verification bounds);
//! 4. the key's rate (429), then the first route admitting method, path and roles
//!    decides (403);
//! 5. Confluence's own back-off (429); bypass routes only: an active admin key
//!    behind the request, and its `phase: "start"` audit record durable;
//! 6. forward with the admin credential, streaming both ways (`proxy/forward.rs`);
//! 7. clean the response and stream it back; its audit record is written when the
//!    body ends, for every outcome.

mod exchange;
mod forward;
mod limits;
mod rewrite;

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::header::{HeaderValue, AUTHORIZATION};
use http::{Method, Request, Response, Version};
use hyper::body::Incoming;

use crate::admin_key::AdminKeys;
use crate::audit::record::{self, AuthFailureSummary};
use crate::audit::Audit;
use crate::body::Body;
use crate::client_keys::{ApiKey, AuthError, KeyStore};
use crate::confluence::Upstream;
use crate::error::ProxyError;
use crate::headers::{self, ForwardedFor};
use crate::log_sink::{AccessLine, LogSink};
use crate::metrics::{Metrics, RouteCounters};
use crate::readiness::Readiness;
use crate::route::{CanonicalPath, PathError, Route, RouteTable};
use crate::server::{ConnInfo, Handler};
pub use exchange::Exchange;
pub use limits::{AuthRecords, UpstreamBackoff};
pub use rewrite::{Replacement, Site};

/// Everything one configuration generation decides requests with; replaced whole
/// on reload.
pub struct Policy {
    /// Increases with every generation (a connection's remembered key is only
    /// good for the generation that verified it).
    pub generation: u64,
    pub routes: RouteTable,
    pub keys: KeyStore,
    pub admin_authorization: HeaderValue,
    pub request_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub per_client_rps: u32,
    pub upstream_backoff: bool,
    /// `listen.public_url`, as the replacement for the site's origin.
    pub public_origin: Option<Arc<rewrite::Replacement>>,
    pub rewrite_json: bool,
    pub counters: RouteCounters,
}

/// The parts of the proxy that live as long as the process.
pub struct Proxy {
    pub policy: Arc<ArcSwap<Policy>>,
    upstream: Upstream,
    site: Site,
    admin_keys: AdminKeys,
    audit: Option<Audit>,
    metrics: Arc<Metrics>,
    log: Option<LogSink>,
    readiness: Arc<Readiness>,
    rate_limiter: limits::RateLimiter,
    pub upstream_backoff: Arc<UpstreamBackoff>,
    pub auth_records: Arc<AuthRecords>,
    /// Confluence answered a forwarded request 401 (logged once per change).
    credential_rejected: AtomicBool,
}

/// What the proxy keeps per client connection: its address, its `Forwarded`
/// headers built once, and the last key it authenticated.
pub struct ProxyConn {
    info: ConnInfo,
    /// The peer's address as the access log writes it.
    peer: Box<str>,
    forwarded: ForwardedFor,
    memo: Mutex<Option<Memo>>,
    /// The public origin last derived from this connection's `Host`.
    origin: Mutex<Option<(HeaderValue, Arc<rewrite::Replacement>)>>,
}

/// A verified `Authorization` value, good for one generation.
struct Memo {
    header: HeaderValue,
    generation: u64,
    key: Arc<ApiKey>,
}

impl ProxyConn {
    fn recall(&self, header: &HeaderValue, generation: u64) -> Option<Arc<ApiKey>> {
        let memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
        memo.as_ref()
            .filter(|m| m.generation == generation && m.header == header)
            .map(|m| Arc::clone(&m.key))
    }

    fn remember(&self, header: &HeaderValue, generation: u64, key: &Arc<ApiKey>) {
        *self.memo.lock().unwrap_or_else(|p| p.into_inner()) = Some(Memo {
            header: detached(header),
            generation,
            key: Arc::clone(key),
        });
    }
}

/// A copy of a header value that shares no memory with the request it came
/// from: a clone would keep the connection's whole read buffer alive (and
/// make hyper allocate another) for as long as the copy is kept.
pub(crate) fn detached(value: &HeaderValue) -> HeaderValue {
    let mut copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
    copy.set_sensitive(value.is_sensitive());
    copy
}

/// The parts a `Proxy` is built from.
pub struct Parts {
    pub policy: Arc<ArcSwap<Policy>>,
    pub upstream: Upstream,
    pub site: Site,
    pub admin_keys: AdminKeys,
    pub audit: Option<Audit>,
    pub metrics: Arc<Metrics>,
    pub log: Option<LogSink>,
    pub readiness: Arc<Readiness>,
}

const READINESS: &str = "admin_key";
/// How long a throttled authentication waits for its 429 (at least, at most).
const TARPIT: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(2));
const CREDENTIAL_REJECTED: &str = "Confluence rejected the admin credential (401): check confluence.email and confluence.api_token; Atlassian API tokens expire within a year";

impl Proxy {
    pub fn new(parts: Parts) -> Self {
        Proxy {
            policy: parts.policy,
            upstream: parts.upstream,
            site: parts.site,
            admin_keys: parts.admin_keys,
            audit: parts.audit,
            metrics: parts.metrics,
            log: parts.log,
            readiness: parts.readiness,
            rate_limiter: limits::RateLimiter::default(),
            upstream_backoff: Arc::default(),
            auth_records: Arc::default(),
            credential_rejected: AtomicBool::new(false),
        }
    }

    /// The whole exchange; never an error (the `Infallible` is what hyper's
    /// services answer). One future per request, kept by the server for the
    /// connection and moved on every request: it takes its inputs by value
    /// (`async fn` would keep a second copy of each argument) and `in_flight`
    /// is dropped once the response is ready.
    #[allow(clippy::manual_async_fn)] // an `async fn` would keep a second copy of each argument
    pub fn handle<G: Send + 'static>(
        self: Arc<Self>,
        request: Request<Incoming>,
        conn: Arc<ProxyConn>,
        in_flight: G,
    ) -> impl Future<Output = Result<Response<Body>, Infallible>> + Send + 'static {
        async move {
            // 1. One id for the client, Confluence, the log and the audit record.
            let request_id = headers::client_request_id(request.headers())
                .unwrap_or_else(headers::new_request_id);
            let policy = self.policy.load_full();
            let mut ex = Exchange::new(&request, conn.info.peer, request_id);
            let response = match self.process(request, &conn, &policy, &mut ex).await {
                Ok(response) => response,
                Err(e) => e.to_response(&ex.request_id),
            };
            self.account(&ex, &policy, &conn.peer, response.status().as_u16());
            let response = self.finish(ex, response);
            drop(in_flight);
            Ok(response)
        }
    }

    /// The phases; each refusal is a `ProxyError`.
    #[allow(clippy::manual_async_fn)] // an `async fn` would keep a second copy of each argument
    fn process<'a>(
        &'a self,
        request: Request<Incoming>,
        conn: &'a ProxyConn,
        policy: &'a Policy,
        ex: &'a mut Exchange,
    ) -> impl Future<Output = Result<Response<Body>, ProxyError>> + Send + 'a {
        async move {
            let path = canonical_target(&request)?;
            ex.path = Some(path.clone());
            let key = self.authenticate(&request, conn, policy, ex).await?;
            let route = self.authorize(&request, &path, &key, policy, ex)?;
            if route.admin_key {
                Box::pin(self.prepare_bypass(ex)).await?;
            }
            let public = rewrite::Public {
                configured: policy.public_origin.as_ref(),
                scheme: conn.info.proto,
                authority: rewrite::request_authority(&request),
                cache: &conn.origin,
            };
            let response = forward::send(self, request, &path, policy, conn, ex).await?;
            self.respond(response, policy, &public, ex)
        }
    }

    /// 3. Exactly one credential, and a key that accepts it.
    async fn authenticate(
        &self,
        request: &Request<Incoming>,
        conn: &ProxyConn,
        policy: &Policy,
        ex: &mut Exchange,
    ) -> Result<Arc<ApiKey>, ProxyError> {
        // Two credentials would leave it open which one a server reads.
        if headers::authorization_count(request.headers()) > 1 {
            return Err(ProxyError::DuplicateAuthorization);
        }
        let header = request.headers().get(AUTHORIZATION);
        let now = SystemTime::now();
        if let Some(h) = header {
            if let Some(key) = conn.recall(h, policy.generation) {
                if KeyStore::still_valid(&key, now).is_ok() {
                    ex.key = Some(Arc::clone(&key));
                    return Ok(key);
                }
            }
        }
        // Past the connection's memo (a cache lookup, or argon2): boxed, so that
        // its large future is not part of every request's.
        match Box::pin(policy.keys.authenticate(header, conn.info.peer.ip(), now)).await {
            Ok(key) => {
                if let Some(h) = header {
                    conn.remember(h, policy.generation, &key);
                }
                ex.key = Some(Arc::clone(&key));
                Ok(key)
            }
            Err(failure) => {
                ex.claimed = failure.client_id;
                ex.auth_failure = Some(failure.error.reason());
                self.record_auth_failure(ex);
                // A source or client trying too many secrets, or too many at
                // once, waits for its answer: a flood slows itself down at no CPU
                // cost.
                match failure.error {
                    AuthError::Throttled(_, wait) => {
                        tokio::time::sleep(wait.clamp(TARPIT.0, TARPIT.1)).await
                    }
                    AuthError::Busy => tokio::time::sleep(TARPIT.0).await,
                    _ => {}
                }
                Err(failure.error.into())
            }
        }
    }

    /// The `auth_failure` record, within the source's record rate.
    fn record_auth_failure(&self, ex: &Exchange) {
        let Some(audit) = &self.audit else { return };
        let now = tokio::time::Instant::now();
        match self.auth_records.decide(ex.remote_addr.ip(), now) {
            limits::RecordDecision::Write => audit.record(ex.auth_failure_record()),
            limits::RecordDecision::Suppress => {
                self.metrics.audit_auth_failures_suppressed.inc();
            }
        }
    }

    /// Writes one `auth_failure_summary` per source whose records were
    /// suppressed since the last call (called every few seconds).
    pub fn flush_auth_failure_summaries(&self) {
        let Some(audit) = &self.audit else { return };
        for (ip, suppressed, since) in self.auth_records.drain(tokio::time::Instant::now()) {
            let summary = AuthFailureSummary {
                remote_addr: ip.map_or_else(|| "*".to_owned(), |ip: IpAddr| ip.to_string()),
                suppressed,
                since,
            };
            audit.record(record::encode("auth_failure_summary", &summary));
        }
    }

    /// 4. The key's rate, then the allow-list: the first admitting route decides.
    fn authorize<'p>(
        &self,
        request: &Request<Incoming>,
        path: &CanonicalPath,
        key: &ApiKey,
        policy: &'p Policy,
        ex: &mut Exchange,
    ) -> Result<&'p Route, ProxyError> {
        let now = tokio::time::Instant::now();
        self.rate_limiter
            .take(&key.client_id, policy.per_client_rps, now)
            .map_err(|retry_after| ProxyError::RateLimited { retry_after })?;
        let (index, route) = policy
            .routes
            .decide_indexed(request.method(), path, &key.roles)?;
        ex.route = Some((index, Arc::clone(&route.shared_name)));
        ex.bypass_route = route.admin_key;
        if policy.upstream_backoff {
            if let Some(retry_after) = self.upstream_backoff.remaining(now) {
                return Err(ProxyError::UpstreamBackoff { retry_after });
            }
        }
        Ok(route)
    }

    /// 5. A bypass request leaves only with an active admin key behind it and its
    ///    start record durable; otherwise it is refused — never sent without the
    ///    bypass (a scanner would silently miss restricted pages) and never sent
    ///    unrecorded.
    async fn prepare_bypass(&self, ex: &mut Exchange) -> Result<(), ProxyError> {
        ex.lease = Some(self.admin_keys.ensure().await?);
        ex.admin_key = true;
        let audit = self.audit.as_ref().ok_or(ProxyError::AuditUnavailable)?;
        let (record, started) = ex.start_record();
        if let Err(e) = audit.durable(record).await {
            ex.admin_key = false;
            return Err(e.into());
        }
        ex.start_record = Some(started);
        Ok(())
    }

    /// 7. Confluence's answer, made safe for the client.
    fn respond(
        &self,
        response: Response<crate::confluence::ResponseBody>,
        policy: &Policy,
        public: &rewrite::Public<'_>,
        ex: &mut Exchange,
    ) -> Result<Response<Body>, ProxyError> {
        let status = response.status().as_u16();
        ex.upstream_status = Some(status);
        self.note_upstream_status(status, response.headers());
        match status {
            // keygate relays no protocol switch it did not ask for.
            101 => return Err(ProxyError::UpstreamProtocol),
            // The admin's credential was refused, not the client's.
            401 => return Err(ProxyError::UpstreamCredentialsRejected),
            _ => {}
        }
        Ok(forward::clean_response(self, response, policy, public, ex))
    }

    /// Upstream 401s (readiness, once per change) and back-off requests.
    fn note_upstream_status(&self, status: u16, headers: &http::HeaderMap) {
        if status == 401 {
            self.metrics.upstream_credentials_rejected.inc();
            if !self.credential_rejected.swap(true, Ordering::AcqRel) {
                tracing::error!("Confluence rejected the admin credential (401) on a forwarded request; clients get 502 upstream_credentials_rejected");
                self.readiness.set(READINESS, CREDENTIAL_REJECTED);
            }
        } else if self.credential_rejected.swap(false, Ordering::AcqRel) {
            tracing::info!("Confluence accepts the admin credential again");
            self.readiness.clear(READINESS);
        }
        if matches!(status, 429 | 503) {
            if let Some(after) = limits::retry_after(headers) {
                tracing::warn!(
                    retry_after_s = after.as_secs(),
                    "Confluence asked to back off; holding all clients"
                );
                self.upstream_backoff
                    .hold_and_share(tokio::time::Instant::now(), after);
            }
        }
    }

    /// Metrics and the access log line.
    fn account(&self, ex: &Exchange, policy: &Policy, peer: &str, status: u16) {
        policy
            .counters
            .count(ex.route.as_ref().map(|(i, _)| *i), ex.admin_key, status);
        let elapsed = ex.started.elapsed();
        self.metrics
            .request_duration(ex.admin_key)
            .observe(elapsed.as_secs_f64());
        if let Some(reason) = ex.auth_failure {
            self.metrics.auth_failure(reason).inc();
        }
        if let Some(log) = &self.log {
            if tracing::enabled!(target: "keygate::access", tracing::Level::INFO) {
                log.access(&AccessLine {
                    request_id: ex.request_id(),
                    peer,
                    method: ex.method.as_str(),
                    path: ex.path(),
                    status,
                    upstream_status: ex.upstream_status,
                    client_id: ex.client_id(),
                    route: ex.route_name(),
                    admin_key: ex.admin_key,
                    auth_failure: ex.auth_failure,
                    duration_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                });
            }
        }
    }

    /// The `request` record with the outcome, written when the response body ends
    /// (or the client goes away): every bypass-route request, and the others when
    /// `record_passthrough` is on. A 401 has its `auth_failure` record instead.
    fn finish(&self, mut ex: Exchange, response: Response<Body>) -> Response<Body> {
        let Some(audit) = self.audit.clone() else {
            return response;
        };
        if ex.auth_failure.is_some() || !(ex.bypass_route || audit.record_passthrough()) {
            return response;
        }
        let (parts, body) = response.into_parts();
        let status = parts.status.as_u16();
        let body = crate::body::Guarded::new(body, crate::body::Trailers::Clean)
            .on_end(move |bytes_out, _| audit.record(ex.end_record(status, bytes_out)));
        Response::from_parts(parts, crate::body::boxed_as_is(body))
    }
}

/// The canonical path of an origin-form target. HTTP/2 always carries scheme and
/// authority as pseudo-headers, so only HTTP/1 requests can be in absolute form.
fn canonical_target<B>(request: &Request<B>) -> Result<CanonicalPath, PathError> {
    let uri = request.uri();
    let absolute = request.version() < Version::HTTP_2
        && (uri.scheme().is_some() || uri.authority().is_some());
    if absolute || request.method() == Method::CONNECT {
        return Err(PathError::NotOriginForm);
    }
    CanonicalPath::parse(uri.path())
}

static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// A fresh generation number.
pub fn next_generation() -> u64 {
    GENERATIONS.fetch_add(1, Ordering::Relaxed)
}

/// The proxy is the server's handler.
impl Handler for Proxy {
    type Conn = ProxyConn;

    fn connect(&self, info: ConnInfo) -> ProxyConn {
        ProxyConn {
            info,
            peer: info.peer.to_string().into_boxed_str(),
            forwarded: ForwardedFor::new(info.peer, info.proto),
            memo: Mutex::new(None),
            origin: Mutex::new(None),
        }
    }

    fn call<G: Send + 'static>(
        self: Arc<Self>,
        request: Request<Incoming>,
        conn: Arc<ProxyConn>,
        in_flight: G,
    ) -> impl Future<Output = Result<Response<Body>, Infallible>> + Send + 'static {
        self.handle(request, conn, in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_detached_header_value_is_equal_and_shares_no_memory() {
        let buffer =
            bytes::Bytes::from_static(b"Host: keygate.example\r\nAuthorization: Basic eA==\r\n");
        let shared = HeaderValue::from_maybe_shared(buffer.slice(6..21)).unwrap();
        let mut secret = HeaderValue::from_maybe_shared(buffer.slice(38..48)).unwrap();
        secret.set_sensitive(true);
        for value in [&shared, &secret] {
            let copy = detached(value);
            assert_eq!(&copy, value);
            assert_eq!(copy.is_sensitive(), value.is_sensitive());
            let range = buffer.as_ptr_range();
            assert!(
                !range.contains(&copy.as_bytes().as_ptr()),
                "a slice of the buffer"
            );
        }
        assert_eq!(detached(&shared), "keygate.example");
        assert_eq!(detached(&secret), "Basic eA==");
    }
}
