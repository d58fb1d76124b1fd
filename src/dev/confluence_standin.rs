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
use sha2::{Digest, Sha256};
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

/// The stand-in's state: its admin account, admin key and request record.
pub struct StandinState {
    pub email: String,
    pub api_token: String,
    pub account_id: String,
    admin_key: Mutex<Option<SystemTime>>,
    requests: Mutex<Vec<Recorded>>,
}

impl StandinState {
    pub fn new(email: &str, api_token: &str) -> Self {
        StandinState {
            email: email.to_owned(),
            api_token: api_token.to_owned(),
            account_id: "557058:standin-admin".to_owned(),
            admin_key: Mutex::new(None),
            requests: Mutex::new(Vec::new()),
        }
    }

    /// The stand-in's own clock, which stamps `Date` and judges expiry.
    pub fn now(&self) -> SystemTime {
        SystemTime::now()
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

    /// `GET`, `POST` and `DELETE /wiki/api/v2/admin-key`.
    pub fn admin_key_call(&self, method: &Method, body: &[u8]) -> (StatusCode, String) {
        let now = self.now();
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
                let exp = now + Duration::from_secs(minutes * 60);
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
            let (status, text) = state.admin_key_call(&method, &body);
            if status == StatusCode::NO_CONTENT {
                let mut r = Response::new(crate::body::empty());
                *r.status_mut() = status;
                r
            } else {
                json(status, text)
            }
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
    let mut hash = Sha256::new();
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
    let digest: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
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
