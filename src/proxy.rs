//! The request pipeline, top to bottom. Every request goes through these steps in
//! this order, and each refusal happens before anything reaches Confluence:
//!
//! 1. request id: the client's if well-formed, else a new UUIDv7;
//! 2. target: origin form only, canonical path (400) — the path matched is the
//!    path forwarded;
//! 3. exactly one credential (400), then authentication (401);
//! 4. the first route admitting method, path and roles decides (403);
//! 5. bypass routes only: an active admin key behind the request, and its
//!    `phase: "start"` audit record durable on disk;
//! 6. forward with the admin credential, streaming both ways;
//! 7. clean the response and stream it back; its audit record is written when the
//!    body ends, for every outcome.

mod exchange;
mod limits;
pub mod metered;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use http::header::{HeaderValue, AUTHORIZATION};
use http::{Method, Request, Response, Version};
use hyper::body::Incoming;

use crate::admin_key::AdminKeys;
use crate::audit::Audit;
use crate::body::{self, Body};
use crate::client_keys::{KeyStore, Principal};
use crate::config::Config;
use crate::confluence::{Upstream, UpstreamAdminApi, UpstreamError};
use crate::error::ProxyError;
use crate::headers::{self, UpstreamHeaders, X_REQUEST_ID};
use crate::metrics::Metrics;
use crate::route::{CanonicalPath, PathError};
pub use exchange::Exchange;

/// Everything one configuration generation decides with; replaced whole on reload.
pub struct Gateway {
    pub config: Config,
    pub keys: KeyStore,
    pub admin_authorization: HeaderValue,
    /// The config and keys files as they were when this generation was read.
    pub loaded_files: crate::config::reload::Fingerprint,
}

/// The connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub proto: &'static str,
}

pub type SiteAdminKeys = AdminKeys<UpstreamAdminApi>;

pub struct Proxy {
    pub gateway: Arc<ArcSwap<Gateway>>,
    pub upstream: Upstream,
    pub admin_keys: Arc<SiteAdminKeys>,
    pub metrics: Arc<Metrics>,
    pub audit: Option<Audit>,
    rate_limiter: limits::RateLimiter,
    upstream_backoff: limits::UpstreamBackoff,
}

impl Proxy {
    pub fn new(
        gateway: Arc<ArcSwap<Gateway>>,
        upstream: Upstream,
        admin_keys: Arc<SiteAdminKeys>,
        metrics: Arc<Metrics>,
        audit: Option<Audit>,
    ) -> Self {
        Proxy {
            gateway,
            upstream,
            admin_keys,
            metrics,
            audit,
            rate_limiter: limits::RateLimiter::default(),
            upstream_backoff: limits::UpstreamBackoff::default(),
        }
    }

    pub async fn handle(&self, request: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        // 1. One id for the client, Confluence, the log and the audit record.
        let request_id =
            headers::client_request_id(request.headers()).unwrap_or_else(headers::new_request_id);
        let gateway = self.gateway.load_full();
        let id_text = String::from_utf8_lossy(request_id.as_bytes()).into_owned();
        let mut ex = Exchange::new(&request, conn.peer, id_text);
        let response = match self
            .process(request, conn, &gateway, &request_id, &mut ex)
            .await
        {
            Ok(response) => response,
            Err(e) => e.to_response(&request_id),
        };
        self.account(&ex, response.status().as_u16());
        self.audit_end(ex, response)
    }

    /// Metrics and the access log line.
    fn account(&self, ex: &Exchange, status: u16) {
        let class = ["1xx", "2xx", "3xx", "4xx", "5xx"]
            .get(usize::from(status / 100).saturating_sub(1))
            .copied()
            .unwrap_or("other");
        let bypass = if ex.admin_key { "true" } else { "false" };
        let route = ex.route.as_deref().unwrap_or("none");
        self.metrics.inc(
            "keygate_requests_total",
            &[("route", route), ("status", class), ("bypass", bypass)],
        );
        self.metrics.observe(
            "keygate_request_duration_seconds",
            &[("bypass", bypass)],
            ex.started.elapsed().as_secs_f64(),
        );
        if let Some(reason) = ex.auth_failure {
            self.metrics
                .inc("keygate_auth_failures_total", &[("reason", reason)]);
        }
        tracing::info!(
            target: "keygate::access",
            request_id = %ex.request_id,
            peer = %ex.remote_addr,
            method = %ex.method,
            path = %ex.path,
            status,
            upstream_status = ex.upstream_status,
            client_id = ex.client_id.as_deref(),
            route = ex.route.as_deref(),
            admin_key = ex.admin_key,
            auth_failure = ex.auth_failure,
            duration_ms = ex.started.elapsed().as_millis() as u64,
            "request"
        );
    }

    /// The `request` record with the outcome, written when the response body ends
    /// (or the client goes away): every bypass-route request, and the others when
    /// `record_passthrough` is on. A 401 has its `auth_failure` record instead.
    fn audit_end(&self, ex: Exchange, response: Response<Body>) -> Response<Body> {
        let Some(audit) = self.audit.clone() else {
            return response;
        };
        if ex.auth_failure.is_some() || !(ex.bypass_route || audit.record_passthrough) {
            return response;
        }
        let (parts, body) = response.into_parts();
        let status = parts.status.as_u16();
        let body = metered::OnEnd::new(body, move |bytes_out| {
            audit.record(
                "request",
                ex.request_fields("end", ex.admin_key, Some(status), bytes_out),
            );
        });
        Response::from_parts(parts, body::boxed(body))
    }

    async fn process(
        &self,
        request: Request<Incoming>,
        conn: ConnInfo,
        gateway: &Gateway,
        request_id: &HeaderValue,
        ex: &mut Exchange,
    ) -> Result<Response<Body>, ProxyError> {
        // 2. One spelling of the path, or no forwarding at all.
        let path = canonical_target(&request).map_err(ProxyError::BadPath)?;
        ex.path = path.as_str().to_owned();

        // 3. Two credentials would leave it open which one a server reads.
        if headers::authorization_count(request.headers()) > 1 {
            return Err(ProxyError::DuplicateAuthorization);
        }
        let authenticated = gateway
            .keys
            .authenticate(request.headers().get(AUTHORIZATION), SystemTime::now())
            .await;
        let principal: Principal = match authenticated {
            Ok(p) => p,
            Err(failure) => {
                ex.client_id = failure.client_id;
                ex.auth_failure = Some(failure.error.reason());
                if let Some(audit) = &self.audit {
                    audit.record("auth_failure", ex.auth_failure_fields());
                }
                return Err(ProxyError::Unauthorized);
            }
        };
        ex.client_id = Some(principal.client_id.clone());
        ex.key_name = Some(principal.key_name.clone());
        let limits = &gateway.config.limits;
        let now = tokio::time::Instant::now();
        self.rate_limiter
            .take(&principal.client_id, limits.per_client_rps, now)
            .map_err(|retry_after| ProxyError::RateLimited { retry_after })?;

        // 4. The allow-list: first admitting route, else denied.
        let route = gateway
            .config
            .routes
            .decide(request.method(), &path, &principal.roles)
            .ok_or(ProxyError::Forbidden)?;
        ex.route = Some(route.name.clone());
        ex.bypass_route = route.admin_key;
        if limits.upstream_backoff {
            if let Some(retry_after) = self.upstream_backoff.remaining(now) {
                return Err(ProxyError::UpstreamBackoff { retry_after });
            }
        }

        // 5. A bypass request leaves only with an active admin key behind it and its
        //    start record on disk; otherwise it is refused — never sent without the
        //    bypass (a scanner would silently miss restricted pages) and never sent
        //    unrecorded.
        if route.admin_key {
            let lease = self.admin_keys.ensure().await.map_err(|u| {
                tracing::debug!(reason = %u.reason, "bypass refused: no admin key");
                ProxyError::AdminKeyUnavailable {
                    retry_after: u.retry_after,
                }
            })?;
            ex.lease = Some(lease);
            let audit = self.audit.as_ref().ok_or(ProxyError::AuditUnavailable)?;
            audit
                .durable("request", ex.request_fields("start", true, None, 0))
                .await
                .map_err(|e| {
                    tracing::debug!(error = %e, "bypass refused: audit trail unavailable");
                    ProxyError::AuditUnavailable
                })?;
            ex.admin_key = true;
        }

        // 6. Forward: the client's credentials and any smuggled bypass go; ours come.
        let (mut parts, incoming) = request.into_parts();
        headers::strip_request(&mut parts.headers);
        headers::add_upstream(
            &mut parts.headers,
            &UpstreamHeaders {
                authorization: &gateway.admin_authorization,
                host: self.upstream.host(),
                bypass: ex.admin_key,
                request_id,
                peer: conn.peer,
                proto: conn.proto,
            },
        );
        parts.uri = self
            .upstream
            .uri(path.as_str(), parts.uri.query())
            .map_err(|_| ProxyError::BadPath(PathError::InvalidCharacter))?;
        parts.version = Version::HTTP_11;
        let counted = metered::Counted::new(incoming, Arc::clone(&ex.bytes_in));
        let upstream_request = Request::from_parts(parts, body::boxed(counted));
        let timeout = gateway.config.confluence.request_timeout;
        let sent = Instant::now();
        let response = self
            .upstream
            .send(upstream_request, timeout)
            .await
            .map_err(|e| {
                tracing::warn!(request_id = %ex.request_id, error = %e, "upstream request failed");
                match e {
                    UpstreamError::Timeout => ProxyError::UpstreamTimeout,
                    UpstreamError::Unreachable(_) => ProxyError::UpstreamUnreachable,
                }
            })?;
        self.metrics.observe(
            "keygate_upstream_duration_seconds",
            &[],
            sent.elapsed().as_secs_f64(),
        );
        ex.upstream_status = Some(response.status().as_u16());
        if matches!(response.status().as_u16(), 429 | 503) {
            let after = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| crate::confluence::parse_retry_after(v, None));
            if let Some(after) = after {
                tracing::warn!(
                    retry_after_s = after.as_secs(),
                    "Confluence asked to back off; holding all clients"
                );
                self.upstream_backoff
                    .hold(tokio::time::Instant::now(), after);
            }
        }

        // 7. The admin's session cookies never reach a client.
        let (mut parts, incoming) = response.into_parts();
        headers::strip_response(&mut parts.headers);
        parts
            .headers
            .insert(X_REQUEST_ID.clone(), request_id.clone());
        Ok(Response::from_parts(parts, body::boxed(incoming)))
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
