//! Phase 6 and the cleaning half of phase 7: the request as Confluence gets it
//! (headers, URI, body), and the response as the client gets it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body as _, Frame};

use http::header::{HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, Version};
use hyper::body::Incoming;

use super::rewrite::Public;
use super::{Exchange, Policy, Proxy, ProxyConn};
use crate::body::{self, Body, BoxError, Guarded, Trailers};
use crate::confluence::ResponseBody;
use crate::error::ProxyError;
use crate::headers::{self, UpstreamHeaders, X_REQUEST_ID};
use crate::route::{CanonicalPath, PathError};

/// Sends the request upstream: the client's credentials, trailers and any
/// smuggled bypass go; the admin credential and keygate's headers come.
#[allow(clippy::manual_async_fn)] // an `async fn` would keep a second copy of each argument
pub(super) fn send<'a>(
    proxy: &'a Proxy,
    request: Request<Incoming>,
    path: &'a CanonicalPath,
    policy: &'a Policy,
    conn: &'a ProxyConn,
    ex: &'a Exchange,
) -> impl Future<Output = Result<Response<ResponseBody>, ProxyError>> + Send + 'a {
    // An async block, not an `async fn`: the request is held once, not twice.
    async move {
        let (mut parts, incoming) = request.into_parts();
        headers::to_upstream(
            &mut parts.headers,
            &UpstreamHeaders {
                authorization: &policy.admin_authorization,
                host: proxy.upstream.host(),
                bypass: ex.admin_key,
                request_id: &ex.request_id,
                forwarded: &conn.forwarded,
            },
        );
        if policy.rewrite_json {
            // Compressed JSON cannot be rewritten as it streams; ask for it plain.
            parts
                .headers
                .insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        }
        parts.uri = proxy
            .upstream
            .uri(path.as_str(), parts.uri.query())
            .map_err(|_| ProxyError::BadPath(PathError::InvalidCharacter))?;
        parts.version = Version::HTTP_11;
        let body = Guarded::new(incoming, Trailers::Drop)
            .counting(std::sync::Arc::clone(&ex.bytes_in))
            .idle_timeout(policy.body_idle_timeout)
            .counting_stalls(&proxy.metrics.body_idle_timeouts);
        let upstream_request = Request::from_parts(parts, body::boxed_as_is(body));
        let sent = std::time::Instant::now();
        let response = proxy
            .upstream
            .send(upstream_request, policy.request_timeout)
            .await
            .inspect_err(|e| {
                tracing::warn!(request_id = %ex.request_id(), error = %e, "upstream request failed");
            })?;
        proxy
            .metrics
            .upstream_duration
            .observe(sent.elapsed().as_secs_f64());
        Ok(response)
    }
}

/// The response as the client gets it: no cookies, no hop-by-hop headers, the
/// site's URLs pointing at keygate, trailers cleaned, a stalled body cut.
pub(super) fn clean_response(
    proxy: &Proxy,
    response: Response<ResponseBody>,
    policy: &Policy,
    public: &Public<'_>,
    ex: &Exchange,
) -> Response<Body> {
    let (mut parts, mut incoming) = response.into_parts();
    headers::strip_response(&mut parts.headers);
    parts
        .headers
        .insert(X_REQUEST_ID.clone(), ex.request_id.clone());
    proxy.site.rewrite_headers(&mut parts.headers, public);
    let rewrite = policy.rewrite_json
        && ex.method != Method::HEAD
        && is_plain_json(&parts.headers)
        && !matches!(parts.status.as_u16(), 204 | 304);
    if !rewrite {
        return Response::from_parts(parts, body::boxed_as_is(guard(incoming, proxy, policy)));
    }
    let mut rewriter = proxy.site.json_rewriter(public.resolve());
    let body = match look_ahead(&mut incoming, &parts.headers) {
        Ahead::Whole(data) => {
            // The whole body is here: rewritten at once, it keeps a length.
            let data = rewriter.push_bytes(data, true);
            parts
                .headers
                .insert(CONTENT_LENGTH, HeaderValue::from(data.len()));
            body::full(data)
        }
        Ahead::Streaming(first) => {
            // The length changes with the rewrite: the body goes chunked.
            parts.headers.remove(CONTENT_LENGTH);
            let mut guarded = guard(incoming, proxy, policy).transforming(rewriter);
            if let Some(first) = first {
                guarded = guarded.starting_with(first);
            }
            body::boxed_as_is(guarded)
        }
    };
    Response::from_parts(parts, body)
}

fn guard(incoming: ResponseBody, proxy: &Proxy, policy: &Policy) -> Guarded<ResponseBody> {
    Guarded::new(incoming, Trailers::Clean)
        .idle_timeout(policy.body_idle_timeout)
        .counting_stalls(&proxy.metrics.body_idle_timeouts)
}

/// What one look at a response body found.
enum Ahead {
    /// All of it (as many bytes as `Content-Length` said, in one frame).
    Whole(Bytes),
    /// Not all of it: streams, starting with the frame (or error) taken, if any.
    Streaming(Option<Result<Frame<Bytes>, BoxError>>),
}

/// The largest body looked at before its head is sent.
const LOOK_AHEAD_MAX: u64 = 256 * 1024;

/// Takes the response body's first frame if it is already there (it usually
/// came in with the head): a small JSON body that is all there can be
/// rewritten at once and keep a `Content-Length`, instead of going chunked.
/// Never waits: a body still on its way streams as before.
fn look_ahead(incoming: &mut ResponseBody, headers: &http::HeaderMap) -> Ahead {
    let length = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let Some(length) = length.filter(|n| (1..=LOOK_AHEAD_MAX).contains(n)) else {
        return Ahead::Streaming(None);
    };
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(&mut *incoming).poll_frame(&mut cx) {
        Poll::Pending => Ahead::Streaming(None),
        Poll::Ready(None) => Ahead::Whole(Bytes::new()),
        Poll::Ready(Some(Err(e))) => Ahead::Streaming(Some(Err(e.into()))),
        Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
            // All the bytes, and the end (no trailers to follow).
            Ok(data) if data.len() as u64 == length && incoming.is_end_stream() => {
                Ahead::Whole(data)
            }
            Ok(data) => Ahead::Streaming(Some(Ok(Frame::data(data)))),
            Err(frame) => Ahead::Streaming(Some(Ok(frame))),
        },
    }
}

/// JSON without a content encoding (a compressed body passes unchanged).
fn is_plain_json(headers: &http::HeaderMap) -> bool {
    let json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("json"));
    let encoded = headers
        .get(CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    json && !encoded
}
