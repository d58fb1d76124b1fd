//! A Confluence Cloud stand-in for `keygate dev` and the tests: Basic auth of one
//! admin account, the v2 admin-key API (60-minute cap, 10-minute default), a few
//! spaces and pages of which some are restricted, a session cookie on every
//! response, streaming upload and download, and a record of every request received.
//!
//! A restricted page answers 404 unless the request carries
//! `Atl-Confluence-With-Admin-Key: true` while the admin key is active — as the real
//! site hides restricted content from everyone else.

mod bodies;
mod cloud;
mod routes;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use http::header::{HeaderValue, CONTENT_TYPE, DATE, SET_COOKIE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::body::{full, Body};
pub use bodies::pattern_byte;
use routes::{not_found, Page};

/// One request as the stand-in received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    /// Path and query exactly as received.
    pub target: String,
    pub headers: HeaderMap,
    /// When it arrived (tokio's clock).
    pub received: tokio::time::Instant,
}

impl Recorded {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// Every value of a header, by exact (case-insensitive) name.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }
}

/// An injected failure of the admin-key endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub status: StatusCode,
    pub retry_after: Option<u64>,
    pub delay: Duration,
    /// Only calls with this method; any method when `None`.
    pub method: Option<Method>,
    /// Only slow: after the delay the call has its normal effect and answer.
    pub slow_only: bool,
}

impl Fault {
    pub fn status(status: u16) -> Self {
        Fault {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            retry_after: None,
            delay: Duration::ZERO,
            method: None,
            slow_only: false,
        }
    }

    /// A call that takes `delay` and then does what it normally does.
    pub fn slow(delay: Duration) -> Self {
        Fault {
            delay,
            slow_only: true,
            ..Fault::status(200)
        }
    }
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
    pub fn only(mut self, method: Method) -> Self {
        self.method = Some(method);
        self
    }
}

/// One call of the admin-key API, as the stand-in saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCall {
    pub method: Method,
    /// On the stand-in's clock (skew included).
    pub at: SystemTime,
    /// Time the key had left when the call arrived; `None` if none was active.
    pub remaining_before: Option<Duration>,
    pub status: StatusCode,
}

/// The stand-in's state: its admin account, admin key, clock, faults and records.
pub struct StandinState {
    pub email: String,
    pub api_token: String,
    pub account_id: String,
    admin_key: Mutex<Option<SystemTime>>,
    requests: Mutex<Vec<Recorded>>,
    key_calls: Mutex<Vec<KeyCall>>,
    faults: Mutex<std::collections::VecDeque<(Fault, u32)>>,
    /// Expiry for every new key, overriding the requested minutes (short keys for tests).
    key_lifetime: Mutex<Option<Duration>>,
    /// Seconds added to the stand-in's clock (negative: behind).
    skew_secs: std::sync::atomic::AtomicI64,
    /// Wall time at start, and tokio's instant then: the clock follows tokio's
    /// (pausable) time, so tests can run hours in milliseconds.
    base_wall: SystemTime,
    base_instant: tokio::time::Instant,
    /// `scheme://host:port` the stand-in serves on: the site's origin in the
    /// absolute URLs it hands out, as Confluence Cloud does.
    origin: Mutex<String>,
    /// Trailers of every request body the stand-in read.
    trailers: Mutex<Vec<HeaderMap>>,
    /// Connections accepted so far.
    connections: std::sync::atomic::AtomicU64,
}

impl StandinState {
    pub fn new(email: &str, api_token: &str) -> Self {
        StandinState {
            email: email.to_owned(),
            api_token: api_token.to_owned(),
            account_id: "557058:standin-admin".to_owned(),
            admin_key: Mutex::new(None),
            requests: Mutex::new(Vec::new()),
            key_calls: Mutex::new(Vec::new()),
            faults: Mutex::new(std::collections::VecDeque::new()),
            key_lifetime: Mutex::new(None),
            skew_secs: std::sync::atomic::AtomicI64::new(0),
            base_wall: SystemTime::now(),
            base_instant: tokio::time::Instant::now(),
            origin: Mutex::new(String::new()),
            trailers: Mutex::new(Vec::new()),
            connections: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The site's origin, as absolute URLs in answers carry it.
    pub fn origin(&self) -> String {
        self.origin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Trailers of the request bodies read so far.
    pub fn trailers(&self) -> Vec<HeaderMap> {
        self.trailers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn record_trailers(&self, trailers: HeaderMap) {
        self.trailers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(trailers);
    }

    /// The stand-in's own clock, which stamps `Date` and judges expiry.
    pub fn now(&self) -> SystemTime {
        let t = self.base_wall + self.base_instant.elapsed();
        let skew = self.skew_secs.load(std::sync::atomic::Ordering::Relaxed);
        if skew >= 0 {
            t + Duration::from_secs(skew.unsigned_abs())
        } else {
            t - Duration::from_secs(skew.unsigned_abs())
        }
    }

    /// Moves the stand-in's clock by `secs` against keygate's.
    pub fn set_skew(&self, secs: i64) {
        self.skew_secs
            .store(secs, std::sync::atomic::Ordering::Relaxed);
    }

    /// The next `times` admin-key calls (matching the fault's method) fail this way.
    /// Connections accepted so far (keep-alive reuse shows as few).
    pub fn connections(&self) -> u64 {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn inject(&self, fault: Fault, times: u32) {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((fault, times));
    }

    /// Every new key lives this long, whatever was asked.
    pub fn set_key_lifetime(&self, lifetime: Option<Duration>) {
        *self.key_lifetime.lock().unwrap_or_else(|p| p.into_inner()) = lifetime;
    }

    /// Disables the key as someone else would (the UI, another tool).
    pub fn disable_externally(&self) {
        *self.admin_key.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Every admin-key call so far.
    pub fn key_calls(&self) -> Vec<KeyCall> {
        self.key_calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many admin-key calls used `method`.
    pub fn key_call_count(&self, method: &Method) -> usize {
        self.key_calls()
            .iter()
            .filter(|c| c.method == *method)
            .count()
    }

    fn take_fault(&self, method: &Method) -> Option<Fault> {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        let index = faults
            .iter()
            .position(|(f, _)| f.method.as_ref().is_none_or(|m| m == method))?;
        let (fault, left) = &mut faults[index];
        let fault = fault.clone();
        *left -= 1;
        if *left == 0 {
            faults.remove(index);
        }
        Some(fault)
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn clear_requests(&self) {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Whether an admin key is active now.
    pub fn admin_key_active(&self) -> bool {
        let key = self.admin_key.lock().unwrap_or_else(|p| p.into_inner());
        key.is_some_and(|exp| exp > self.now())
    }

    fn record(&self, request: &Request<Incoming>) {
        let target = request
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str().to_owned())
            .unwrap_or_default();
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Recorded {
                method: request.method().clone(),
                target,
                headers: request.headers().clone(),
                received: tokio::time::Instant::now(),
            });
    }

    fn authorised(&self, headers: &HeaderMap) -> bool {
        let expected = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", self.email, self.api_token));
        let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
        let first = values.next();
        values.next().is_none()
            && first.is_some_and(|v| v.as_bytes() == format!("Basic {expected}").as_bytes())
    }

    /// `GET`, `POST` and `DELETE /wiki/api/v2/admin-key`: status, `Retry-After`, body.
    pub async fn admin_key_call(
        &self,
        method: &Method,
        body: &[u8],
    ) -> (StatusCode, Option<u64>, String) {
        let fault = self.take_fault(method);
        if let Some(f) = &fault {
            if !f.delay.is_zero() {
                tokio::time::sleep(f.delay).await;
            }
        }
        let now = self.now();
        let remaining_before = {
            let key = self.admin_key.lock().unwrap_or_else(|p| p.into_inner());
            key.and_then(|exp| exp.duration_since(now).ok())
        };
        let (status, retry_after, text) = match fault.filter(|f| !f.slow_only) {
            Some(f) => (
                f.status,
                f.retry_after,
                format!(r#"{{"message":"injected {}"}}"#, f.status.as_u16()),
            ),
            None => {
                let (status, text) = self.admin_key_effect(method, body, now);
                (status, None, text)
            }
        };
        self.key_calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(KeyCall {
                method: method.clone(),
                at: now,
                remaining_before,
                status,
            });
        (status, retry_after, text)
    }

    fn admin_key_effect(
        &self,
        method: &Method,
        body: &[u8],
        now: SystemTime,
    ) -> (StatusCode, String) {
        let mut key = self.admin_key.lock().unwrap_or_else(|p| p.into_inner());
        if key.is_some_and(|exp| exp <= now) {
            *key = None;
        }
        match *method {
            Method::GET => match *key {
                Some(exp) => (StatusCode::OK, self.key_json(exp)),
                None => (StatusCode::NOT_FOUND, not_found()),
            },
            Method::POST => {
                let minutes = serde_json::from_slice::<serde_json::Value>(body)
                    .ok()
                    .and_then(|v| v.get("durationInMinutes").and_then(|d| d.as_u64()))
                    .unwrap_or(0);
                let minutes = match minutes {
                    0 => 10,
                    m => m.min(60),
                };
                let lifetime = *self.key_lifetime.lock().unwrap_or_else(|p| p.into_inner());
                let exp = now + lifetime.unwrap_or(Duration::from_secs(minutes * 60));
                *key = Some(exp);
                (StatusCode::OK, self.key_json(exp))
            }
            Method::DELETE => {
                *key = None;
                (StatusCode::NO_CONTENT, String::new())
            }
            _ => (StatusCode::METHOD_NOT_ALLOWED, not_found()),
        }
    }

    fn key_json(&self, expires: SystemTime) -> String {
        serde_json::json!({
            "accountId": self.account_id,
            "expirationTime": crate::rfc3339::format_millis(expires),
        })
        .to_string()
    }

    fn bypass(&self, headers: &HeaderMap) -> bool {
        let asked = headers
            .get(crate::headers::BYPASS_HEADER.as_str())
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        asked && self.admin_key_active()
    }

    fn visible(&self, page: &Page, headers: &HeaderMap) -> bool {
        !page.restricted || self.bypass(headers)
    }
}

/// A running stand-in.
pub struct Standin {
    pub addr: SocketAddr,
    pub state: Arc<StandinState>,
    scheme: &'static str,
}

impl Standin {
    /// Starts on `127.0.0.1:0`; serves until the runtime stops.
    pub async fn start(email: &str, api_token: &str) -> std::io::Result<Standin> {
        Self::start_with(Arc::new(StandinState::new(email, api_token))).await
    }

    pub async fn start_with(state: Arc<StandinState>) -> std::io::Result<Standin> {
        Self::serve(state, None).await
    }

    /// Serves over TLS (h2 and http/1.1 by ALPN) with the given acceptor.
    pub async fn start_tls(
        state: Arc<StandinState>,
        tls: tokio_rustls::TlsAcceptor,
    ) -> std::io::Result<Standin> {
        Self::serve(state, Some(tls)).await
    }

    async fn serve(
        state: Arc<StandinState>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<Standin> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let served = Arc::clone(&state);
        let scheme = if tls.is_some() { "https" } else { "http" };
        *state.origin.lock().unwrap_or_else(|p| p.into_inner()) = format!("{scheme}://{addr}");
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                served
                    .connections
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let state = Arc::clone(&served);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(handle(&state, request).await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                    }
                });
            }
        });
        Ok(Standin {
            addr,
            state,
            scheme,
        })
    }

    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }
}

async fn handle(state: &StandinState, request: Request<Incoming>) -> Response<Body> {
    state.record(&request);
    let mut response = if state.authorised(request.headers()) {
        routes::route(state, request).await
    } else {
        json(
            StatusCode::UNAUTHORIZED,
            r#"{"code":401,"message":"Unauthorized"}"#.into(),
        )
    };
    let headers = response.headers_mut();
    if let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(state.now())) {
        headers.insert(DATE, date);
    }
    headers.append(
        SET_COOKIE,
        HeaderValue::from_static(
            "cloud.session.token=standin-admin-session; Path=/; HttpOnly; Secure",
        ),
    );
    headers.append(
        SET_COOKIE,
        HeaderValue::from_static("atlassian.xsrf.token=standin; Path=/"),
    );
    response
}

pub(crate) fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
