//! A Confluence Cloud stand-in for `keygate dev` and the tests: Basic auth of one
//! admin account, the v2 admin-key API (60-minute cap, 10-minute default), a few
//! spaces and pages of which some are restricted, a session cookie on every
//! response, streaming upload and download, and a record of every request received.
//!
//! A restricted page answers 404 unless the request carries
//! `Atl-Confluence-With-Admin-Key: true` while the admin key is active — as the real
//! site hides restricted content from everyone else.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, DATE, SET_COOKIE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::body::{full, Body, BoxError};

/// One request as the stand-in received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    /// Path and query exactly as received.
    pub target: String,
    pub headers: HeaderMap,
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

struct Page {
    id: u64,
    space: &'static str,
    title: &'static str,
    restricted: bool,
}

const PAGES: &[Page] = &[
    Page {
        id: 1001,
        space: "ENG",
        title: "Welcome to Engineering",
        restricted: false,
    },
    Page {
        id: 1002,
        space: "ENG",
        title: "Architecture overview",
        restricted: false,
    },
    Page {
        id: 1003,
        space: "ENG",
        title: "Incident review (restricted)",
        restricted: true,
    },
    Page {
        id: 2001,
        space: "HR",
        title: "Salary bands 2026 (restricted)",
        restricted: true,
    },
];

/// An injected failure of the admin-key endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub status: StatusCode,
    pub retry_after: Option<u64>,
    pub delay: Duration,
    /// Only calls with this method; any method when `None`.
    pub method: Option<Method>,
}

impl Fault {
    pub fn status(status: u16) -> Self {
        Fault {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            retry_after: None,
            delay: Duration::ZERO,
            method: None,
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
        }
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
        let (status, retry_after, text) = match fault {
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

fn not_found() -> String {
    serde_json::json!({"errors": [{"status": 404, "code": "NOT_FOUND", "title": "Not Found"}]})
        .to_string()
}

fn page_json(page: &Page) -> serde_json::Value {
    serde_json::json!({
        "id": page.id.to_string(),
        "status": "current",
        "title": page.title,
        "spaceId": page.space,
        "body": {"storage": {"value": format!("<p>{}</p>", page.title), "representation": "storage"}},
    })
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
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
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
        route(state, request).await
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

fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

async fn route(state: &StandinState, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = request.method().clone();
    match (method.clone(), segments.as_slice()) {
        (_, ["wiki", "api", "v2", "admin-key"]) => {
            let body = request
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let (status, retry_after, text) = state.admin_key_call(&method, &body).await;
            let mut r = if status == StatusCode::NO_CONTENT {
                let mut r = Response::new(crate::body::empty());
                *r.status_mut() = status;
                r
            } else {
                json(status, text)
            };
            if let Some(secs) = retry_after {
                r.headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
            }
            r
        }
        (Method::GET, ["wiki", "api", "v2", "spaces"]) => json(
            StatusCode::OK,
            serde_json::json!({"results": [
                {"id": "ENG", "key": "ENG", "name": "Engineering"},
                {"id": "HR", "key": "HR", "name": "People (restricted pages)"},
            ]})
            .to_string(),
        ),
        (Method::GET, ["wiki", "api", "v2", "pages"]) => {
            let results: Vec<_> = PAGES
                .iter()
                .filter(|p| state.visible(p, request.headers()))
                .map(page_json)
                .collect();
            json(
                StatusCode::OK,
                serde_json::json!({"results": results}).to_string(),
            )
        }
        (Method::GET | Method::HEAD, ["wiki", "api", "v2", "pages", id, rest @ ..]) => {
            match PAGES.iter().find(|p| p.id.to_string() == *id) {
                Some(page) if state.visible(page, request.headers()) => match rest {
                    [] => json(StatusCode::OK, page_json(page).to_string()),
                    ["labels"] => {
                        json(StatusCode::OK, r#"{"results":[{"name":"standin"}]}"#.into())
                    }
                    _ => json(StatusCode::NOT_FOUND, not_found()),
                },
                _ => json(StatusCode::NOT_FOUND, not_found()),
            }
        }
        (
            Method::POST | Method::PUT,
            ["wiki", "rest", "api", "content", _, "child", "attachment"],
        ) => upload(request.into_body()).await,
        (Method::GET, ["wiki", "download", "attachments", _, _]) => {
            let size = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("size="))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(1024);
            let mut r = Response::new(crate::body::boxed(PatternBody {
                remaining: size,
                offset: 0,
            }));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        (Method::GET, ["wiki", "slow"]) => {
            let ms = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("ms="))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            json(StatusCode::OK, r#"{"slow":true}"#.into())
        }
        (_, ["wiki", "version"]) => json(
            StatusCode::OK,
            serde_json::json!({"version": format!("{:?}", request.version())}).to_string(),
        ),
        (Method::GET, ["wiki", "rate-limited"]) => {
            let after = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("after="))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(30);
            let mut r = json(
                StatusCode::TOO_MANY_REQUESTS,
                r#"{"message":"Rate limit exceeded"}"#.into(),
            );
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(after));
            r
        }
        (Method::GET, ["wiki", "redirect"]) => {
            let mut r = json(StatusCode::FOUND, "{}".into());
            r.headers_mut().insert(
                http::header::LOCATION,
                HeaderValue::from_static("/wiki/api/v2/spaces"),
            );
            r
        }
        _ => json(StatusCode::NOT_FOUND, not_found()),
    }
}

/// Consumes an upload frame by frame and reports its size and SHA-256.
async fn upload(mut body: Incoming) -> Response<Body> {
    let mut size: u64 = 0;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    size += data.len() as u64;
                    hash.update(data);
                }
            }
            Err(_) => {
                return json(
                    StatusCode::BAD_REQUEST,
                    r#"{"message":"body error"}"#.into(),
                )
            }
        }
    }
    let digest = crate::audit::chain::hex(hash.finish().as_ref());
    json(
        StatusCode::OK,
        serde_json::json!({"size": size, "sha256": digest}).to_string(),
    )
}

/// The download pattern: byte `i` of the file is `i % 251`.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// A body that streams a pattern in 64 KiB chunks without holding it whole.
struct PatternBody {
    remaining: u64,
    offset: u64,
}

impl http_body::Body for PatternBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(64 * 1024);
        let start = self.offset;
        let chunk: Vec<u8> = (start..start + n).map(pattern_byte).collect();
        self.remaining -= n;
        self.offset += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}
