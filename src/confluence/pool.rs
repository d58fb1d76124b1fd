//! Keep-alive connections to the one Confluence site: a stack of idle HTTP/1.1
//! connections, or one shared HTTP/2 connection when the site offers h2 by ALPN.
//!
//! keygate talks to a single origin, so the pool needs no key: a checkout is a
//! lock, a pop and a readiness check, and a connection goes back when its
//! response body has ended (not when the head arrives), without a task per
//! request.
//!
//! Invariants: a connection is handed out only when it is ready for a request
//! (an HTTP/1.1 connection carries one exchange at a time); one whose response
//! body was dropped unread is closed, never reused; a request that a reused
//! connection could not even start (closed under it) is retried on another, and
//! one that it could not finish only when it is idempotent and has no body.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::body::Body;

/// Idle connections kept at most.
const MAX_IDLE: usize = 1024;
/// Idle connections kept for the whole idle timeout (the most recently used):
/// what a client coming back after a pause finds ready, with no new TCP and TLS
/// handshake. The others a burst opened are closed after `SPARE_IDLE`, and
/// the memory they hold (read and write buffers, the connection task: about
/// 20 KiB each) goes back: 240 of them after a burst of 256 are 5 MiB.
const WARM_IDLE: usize = 16;
/// How long connections beyond `WARM_IDLE` may stay idle.
const SPARE_IDLE: Duration = Duration::from_secs(5);
/// Attempts for a request whose reused connection closed before it was sent.
const MAX_ATTEMPTS: usize = 3;

/// Why a request got no response.
#[derive(Debug)]
pub(super) enum SendError {
    Connect(std::io::Error),
    Http(hyper::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Http(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SendError::Connect(e) => Some(e),
            SendError::Http(e) => Some(e),
        }
    }
}

/// Where and how to connect.
pub(super) struct Target {
    pub(super) scheme: Scheme,
    pub(super) authority: Authority,
    pub(super) tls: Arc<rustls::ClientConfig>,
    pub(super) connect_timeout: Duration,
    pub(super) idle_timeout: Duration,
}

#[derive(Clone)]
pub(super) struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    target: Target,
    idle: Mutex<VecDeque<Idle>>,
    h2: Mutex<Option<http2::SendRequest<Body>>>,
}

struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

enum Conn {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

impl Pool {
    pub(super) fn new(target: Target) -> Self {
        let inner = Arc::new(Inner {
            target,
            idle: Mutex::new(VecDeque::new()),
            h2: Mutex::new(None),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(reap(Arc::downgrade(&inner)));
        }
        Pool { inner }
    }

    /// Sends `request` (absolute URI) on a ready connection, connecting one
    /// when none is idle.
    pub(super) async fn send(
        &self,
        mut request: Request<Body>,
    ) -> Result<Response<ResponseBody>, SendError> {
        let absolute = request.uri().clone();
        // A reused connection the site has just closed fails a request that
        // was already written. Like other keep-alive clients, keygate sends
        // such a request again on another connection, but only when doing so
        // is safe: an idempotent method without a body.
        let replayable = matches!(
            *request.method(),
            Method::GET | Method::HEAD | Method::OPTIONS
        ) && request.body().is_end_stream();
        for _ in 1..MAX_ATTEMPTS {
            let Some(conn) = self.inner.checkout() else {
                break;
            };
            let copy = replayable.then(|| bodiless_copy(&request, &absolute));
            match self.send_on(conn, request, &absolute).await {
                Ok(response) => return Ok(response),
                Err(Retry::Again(unsent)) => request = *unsent,
                Err(Retry::No(e)) => match copy {
                    Some(copy) if closed_under_it(&e) => request = copy,
                    _ => return Err(e),
                },
            }
        }
        // Connecting (TCP, TLS, a handshake) is the rare path and its future the
        // largest: boxed, it stays out of every request's future.
        let conn = Box::pin(self.inner.connect()).await?;
        match self.send_on(conn, request, &absolute).await {
            Ok(response) => Ok(response),
            Err(Retry::Again(_)) => Err(SendError::Connect(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "connection closed before the request was sent",
            ))),
            Err(Retry::No(e)) => Err(e),
        }
    }

    async fn send_on(
        &self,
        conn: Conn,
        mut request: Request<Body>,
        absolute: &Uri,
    ) -> Result<Response<ResponseBody>, Retry> {
        match conn {
            Conn::H1(mut sender) => {
                // An HTTP/1.1 request line carries the path only.
                *request.uri_mut() = origin_form(absolute);
                match sender.try_send_request(request).await {
                    Ok(response) => Ok(response.map(|body| ResponseBody {
                        inner: body,
                        release: Some(Release {
                            sender,
                            pool: Arc::downgrade(&self.inner),
                        }),
                    })),
                    Err(mut e) => match e.take_message() {
                        Some(mut unsent) => {
                            *unsent.uri_mut() = absolute.clone();
                            Err(Retry::Again(Box::new(unsent)))
                        }
                        None => Err(Retry::No(SendError::Http(e.into_error()))),
                    },
                }
            }
            Conn::H2(mut sender) => match sender.try_send_request(request).await {
                Ok(response) => Ok(response.map(|body| ResponseBody {
                    inner: body,
                    release: None,
                })),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => {
                        self.inner.forget_h2();
                        Err(Retry::Again(Box::new(unsent)))
                    }
                    None => Err(Retry::No(SendError::Http(e.into_error()))),
                },
            },
        }
    }
}

enum Retry {
    Again(Box<Request<Body>>),
    No(SendError),
}

/// The same request without a body, to send again.
fn bodiless_copy(request: &Request<Body>, absolute: &Uri) -> Request<Body> {
    let mut copy = Request::new(crate::body::empty());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = absolute.clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// Whether the connection closed or was reset before the response head arrived.
fn closed_under_it(e: &SendError) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    let SendError::Http(e) = e else {
        return false;
    };
    if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof
            );
        }
        source = err.source();
    }
    false
}

fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    }
}

impl Inner {
    /// A ready connection, if one is idle.
    fn checkout(self: &Arc<Self>) -> Option<Conn> {
        if let Some(h2) = lock(&self.h2).as_ref() {
            if !h2.is_closed() {
                return Some(Conn::H2(h2.clone()));
            }
        }
        let mut idle = lock(&self.idle);
        while let Some(entry) = idle.pop_back() {
            if entry.sender.is_ready() {
                return Some(Conn::H1(entry.sender));
            }
            if !entry.sender.is_closed() {
                // Still finishing its last exchange: back once it is done.
                spawn_return(entry.sender, self);
            }
        }
        None
    }

    /// Drops the shared HTTP/2 connection after it refused a request: the next
    /// request connects anew (streams still open on the old one finish there).
    fn forget_h2(&self) {
        *lock(&self.h2) = None;
    }

    fn put(&self, sender: http1::SendRequest<Body>) {
        let mut idle = lock(&self.idle);
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<Conn, SendError> {
        let t = &self.target;
        let host = t
            .authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let tls = t.scheme == Scheme::HTTPS;
        let port = t.authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let tcp = tokio::time::timeout(t.connect_timeout, TcpStream::connect((host, port)))
            .await
            .map_err(|_| timed_out("connect"))?
            .map_err(SendError::Connect)?;
        tcp.set_nodelay(true).map_err(SendError::Connect)?;
        if !tls {
            return self.handshake_h1(tcp).await;
        }
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| SendError::Connect(std::io::Error::other(e)))?;
        let stream = tokio::time::timeout(
            t.connect_timeout,
            tokio_rustls::TlsConnector::from(Arc::clone(&t.tls)).connect(name, tcp),
        )
        .await
        .map_err(|_| timed_out("TLS handshake"))?
        .map_err(SendError::Connect)?;
        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(TokioIo::new(stream))
                .await
                .map_err(SendError::Http)?;
            drive(conn, "upstream HTTP/2 connection ended");
            *lock(&self.h2) = Some(sender.clone());
            return Ok(Conn::H2(sender));
        }
        self.handshake_h1(stream).await
    }

    async fn handshake_h1<S>(&self, stream: S) -> Result<Conn, SendError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Http)?;
        drive(conn, "upstream connection ended");
        Ok(Conn::H1(sender))
    }
}

/// Runs a connection's I/O in its own task until it ends.
fn drive<C>(conn: C, ended: &'static str)
where
    C: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "{ended}");
        }
    });
}

fn timed_out(what: &str) -> SendError {
    SendError::Connect(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} timed out"),
    ))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Puts a connection back once it can take a request (it may still be writing
/// the last request's body, or reading the end of the last response).
async fn return_when_ready(mut sender: http1::SendRequest<Body>, pool: Weak<Inner>) {
    if sender.ready().await.is_ok() {
        if let Some(pool) = pool.upgrade() {
            pool.put(sender);
        }
    }
}

/// Closes connections idle longer than the idle timeout, and those beyond the
/// `WARM_IDLE` most recent idle longer than `SPARE_IDLE`; ends with the pool.
async fn reap(pool: Weak<Inner>) {
    let every = match pool.upgrade() {
        Some(pool) => (pool.target.idle_timeout.min(SPARE_IDLE) / 2).max(Duration::from_secs(1)),
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let timeout = pool.target.idle_timeout;
        let now = Instant::now();
        let expired: Vec<Idle> = {
            let mut idle = lock(&pool.idle);
            let n = expired_count(
                idle.iter()
                    .map(|e| (now.saturating_duration_since(e.since), e.sender.is_closed())),
                timeout,
            );
            idle.drain(..n).collect()
        };
        drop(expired);
    }
}

/// How many of the idle connections, oldest first (`(idle for, closed)`), are
/// to be closed: the oldest up to the first one still wanted. One is wanted if
/// it is open and idle for less than the idle timeout, or, unless it is among
/// the `WARM_IDLE` most recent, less than `SPARE_IDLE`. Ages fall and limits
/// rise towards the newest, so the ones to close are a prefix.
fn expired_count(
    oldest_first: impl ExactSizeIterator<Item = (Duration, bool)>,
    timeout: Duration,
) -> usize {
    let spare = oldest_first.len().saturating_sub(WARM_IDLE);
    let mut n = 0;
    for (i, (age, closed)) in oldest_first.enumerate() {
        let limit = if i < spare {
            SPARE_IDLE.min(timeout)
        } else {
            timeout
        };
        if age < limit && !closed {
            break;
        }
        n += 1;
    }
    n
}

/// An upstream response body that returns its HTTP/1.1 connection to the pool
/// when it ends; dropped before its end, it takes the connection with it.
pub struct ResponseBody {
    inner: Incoming,
    release: Option<Release>,
}

struct Release {
    sender: http1::SendRequest<Body>,
    pool: Weak<Inner>,
}

impl ResponseBody {
    fn release(&mut self) {
        let Some(Release { sender, pool }) = self.release.take() else {
            return;
        };
        let Some(pool) = pool.upgrade() else {
            return;
        };
        if sender.is_ready() {
            pool.put(sender);
        } else if !sender.is_closed() {
            spawn_return(sender, &pool);
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A body with nothing to read (HEAD, 204, an empty one) may never be
        // polled: its connection is still good.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

fn spawn_return(sender: http1::SendRequest<Body>, pool: &Arc<Inner>) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(return_when_ready(sender, Arc::downgrade(pool)));
    }
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.release = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spare_idle_connections_close_sooner_than_the_warm_ones() {
        let s = Duration::from_secs;
        let minute = s(60);
        // (ages oldest first, with closed flags) -> connections to close
        let open = |ages: &[u64]| ages.iter().map(|a| (s(*a), false)).collect::<Vec<_>>();
        type Ages = Vec<(Duration, bool)>;
        let cases: Vec<(Ages, Duration, usize)> = vec![
            (vec![], minute, 0),
            // Few enough to be all warm: only the idle timeout counts.
            (open(&[59, 30, 10, 1]), minute, 0),
            (open(&[61, 60, 10, 1]), minute, 2),
            // 20 idle: the oldest 4 are spare and go after 5 s.
            (open(&[9; 20]), minute, 4),
            (open(&[4; 20]), minute, 0),
            (
                open(&[9, 9, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]),
                minute,
                2,
            ),
            // A closed one goes whatever its age, up to the first wanted one.
            (vec![(s(0), true), (s(0), false), (s(0), true)], minute, 1),
            // An idle timeout shorter than the spare time rules both.
            (open(&[3; 20]), s(2), 20),
        ];
        for (ages, timeout, expected) in cases {
            assert_eq!(
                expired_count(ages.clone().into_iter(), timeout),
                expected,
                "{ages:?} timeout {timeout:?}"
            );
        }
    }
}
