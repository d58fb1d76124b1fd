//! The upstream side: one pooled keep-alive client over rustls (HTTP/2 when the
//! site offers it by ALPN), used both for forwarding and for admin-key calls.
//!
//! Invariant: every request to Confluence leaves through `Upstream::send`, which
//! bounds the wait for the response head by the request timeout and maps failures
//! to "unreachable" or "timed out" without exposing their text to clients.

use std::future::Future;
use std::time::Duration;

use base64::Engine as _;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};

mod pool;

pub use pool::ResponseBody;

use crate::body::Body;
use crate::config::Confluence;
use crate::tls::TlsError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("Confluence unreachable: {0}")]
    Unreachable(String),
    #[error("Confluence timed out")]
    Timeout,
}

/// The site and the pooled client that reaches it.
#[derive(Clone)]
pub struct Upstream {
    pool: pool::Pool,
    scheme: Scheme,
    authority: Authority,
    host: HeaderValue,
}

impl Upstream {
    pub fn new(site: &Confluence) -> Result<Self, TlsError> {
        let mut tls = crate::tls::client_config(site.ca_file.as_deref())?;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let pool = pool::Pool::new(pool::Target {
            scheme: site.scheme.clone(),
            authority: site.authority.clone(),
            tls: std::sync::Arc::new(tls),
            connect_timeout: site.connect_timeout,
            idle_timeout: Duration::from_secs(60),
        });
        let host = HeaderValue::from_str(site.authority.as_str())
            .map_err(|e| TlsError::Config(format!("invalid host: {e}")))?;
        Ok(Upstream {
            pool,
            scheme: site.scheme.clone(),
            authority: site.authority.clone(),
            host,
        })
    }

    /// The value of `Host` for upstream requests.
    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// The absolute URI for a canonical path and the client's raw query.
    pub fn uri(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let pq = match query {
            Some(q) => PathAndQuery::try_from(format!("{path}?{q}"))?,
            None => PathAndQuery::try_from(path)?,
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }

    /// Sends a request; `timeout` bounds the wait for the response head.
    pub fn send(
        &self,
        request: Request<Body>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Response<ResponseBody>, UpstreamError>> + Send + '_ {
        // Boxed: the pool's future (request, replay copy, connection) stays out
        // of every caller's future, which the server keeps per connection and
        // moves on every request.
        let send = Box::pin(self.pool.send(request));
        async move {
            match tokio::time::timeout(timeout, send).await {
                Err(_) => Err(UpstreamError::Timeout),
                Ok(Ok(response)) => Ok(response),
                Ok(Err(e)) if is_timeout(&e) => Err(UpstreamError::Timeout),
                Ok(Err(e)) => Err(UpstreamError::Unreachable(error_chain(&e))),
            }
        }
    }
}

/// `Authorization: Basic base64(email:api_token)`, marked sensitive so that no
/// header dump shows it.
pub fn admin_authorization(email: &str, api_token: &str) -> HeaderValue {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{email}:{api_token}"));
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Basic"));
    value.set_sensitive(true);
    value
}

fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        source = err.source();
    }
    false
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
}

/// The admin's credential and the wait bound, replaced on reload.
#[derive(Debug, Clone)]
pub struct AdminCredential {
    pub authorization: HeaderValue,
    pub request_timeout: Duration,
}

/// The admin-key endpoints over the pooled client, with the current admin
/// credential and timeout.
pub struct UpstreamAdminApi {
    pub upstream: Upstream,
    pub credential: std::sync::Arc<arc_swap::ArcSwap<AdminCredential>>,
}

/// The largest admin-key answer keygate reads.
const MAX_ADMIN_KEY_BODY: usize = 64 * 1024;

impl crate::admin_key::AdminKeyApi for UpstreamAdminApi {
    async fn call(
        &self,
        method: http::Method,
        duration_minutes: u32,
    ) -> Result<crate::admin_key::ApiReply, String> {
        use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, DATE, HOST, RETRY_AFTER};
        use http_body_util::BodyExt as _;
        let credential = self.credential.load_full();
        let timeout = credential.request_timeout;
        let uri = self
            .upstream
            .uri("/wiki/api/v2/admin-key", None)
            .map_err(|e| e.to_string())?;
        let body = if method == http::Method::POST {
            crate::body::full(format!("{{\"durationInMinutes\":{duration_minutes}}}"))
        } else {
            crate::body::empty()
        };
        let mut request = Request::new(body);
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        headers.insert(AUTHORIZATION, credential.authorization.clone());
        headers.insert(HOST, self.upstream.host().clone());
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        if method == http::Method::POST {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        let response = self
            .upstream
            .send(request, timeout)
            .await
            .map_err(|e| format!("{method} {e}"))?;
        let status = response.status().as_u16();
        let date = response
            .headers()
            .get(DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok());
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, date));
        let limited = http_body_util::Limited::new(response.into_body(), MAX_ADMIN_KEY_BODY);
        let body = tokio::time::timeout(timeout, limited.collect())
            .await
            .map_err(|_| format!("{method} timed out reading the answer"))?
            .map_err(|e| format!("{method} answer unreadable: {e}"))?
            .to_bytes();
        Ok(crate::admin_key::ApiReply {
            status,
            date,
            retry_after,
            body,
        })
    }
}

/// `Retry-After` as seconds or as an HTTP date (relative to the response's `Date`).
pub fn parse_retry_after(value: &str, date: Option<std::time::SystemTime>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let now = date.unwrap_or_else(std::time::SystemTime::now);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}
