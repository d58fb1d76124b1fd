//! Accept loops: HTTP/1.1 and HTTP/2 on one listener (ALPN over TLS, h2c with prior
//! knowledge on plain TCP), bounded in every dimension a client controls.
//!
//! Invariants:
//! - at most `max_connections` connections are open; when all are taken, the
//!   longest-idle connection (no request in flight) is closed to make room, so
//!   clients that send nothing cannot lock others out;
//! - a connection must deliver its first request head (after the TLS handshake)
//!   within `header_read_timeout`, and is closed after `idle_timeout` with no
//!   request in flight and no bytes moving — HTTP/1.1 keep-alive and HTTP/2 alike;
//! - HTTP/2 peers are held to a stream limit, a header-list limit, and the
//!   reset-flood limits of the `h2` crate;
//! - accept errors (out of file descriptors) back off instead of spinning;
//! - shutdown stops accepting, lets in-flight requests finish for at most
//!   `drain_timeout`, then closes what is left.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::body::Body;
use crate::metrics::Metrics;

/// The connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub proto: &'static str,
}

/// Something that answers requests, with per-connection state of its own.
pub trait Handler: Send + Sync + 'static {
    /// What the handler keeps per connection.
    type Conn: Send + Sync + 'static;

    fn connect(&self, info: ConnInfo) -> Self::Conn;

    /// Answers `request`. `in_flight` marks the request as being answered and
    /// is to be dropped once the response is ready. The future is the one the
    /// server keeps per connection and moves on every request: what it holds
    /// across an `.await` is paid for per request, so it takes everything by
    /// value and nests as few futures as it can.
    fn call<G: Send + 'static>(
        self: Arc<Self>,
        request: Request<Incoming>,
        conn: Arc<Self::Conn>,
        in_flight: G,
    ) -> impl Future<Output = Result<Response<Body>, Infallible>> + Send + 'static;
}

/// Per-listener settings.
#[derive(Clone)]
pub struct ServeOptions {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    /// How long in-flight requests get after shutdown starts.
    pub drain_timeout: Duration,
    /// Counts open and closed connections, if given.
    pub metrics: Option<Arc<Metrics>>,
}

/// HTTP/2 streams one connection may have open at once.
const MAX_CONCURRENT_STREAMS: u32 = 128;
/// Header fields per HTTP/1.1 request head (hyper's limit, stated here).
pub const MAX_HEADERS: usize = 100;

/// A shutdown signal that any number of tasks can wait for.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// Triggers a `Shutdown`.
pub struct ShutdownTrigger(watch::Sender<bool>);

pub fn shutdown_pair() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    pub async fn wait(&mut self) {
        // An error means the trigger is gone, which also means shut down.
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
}

/// What the server knows about one open connection.
struct Tracker {
    accepted: Instant,
    /// Bumped when bytes move or a request ends; the watchdog compares it
    /// between its looks instead of reading the clock on every read.
    activity: AtomicU64,
    /// Milliseconds after `accepted` since which the watchdog has seen no
    /// activity (set by the watchdog only).
    quiet_since: AtomicU64,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    close: Notify,
}

impl Tracker {
    fn new(now: Instant) -> Self {
        Tracker {
            accepted: now,
            activity: AtomicU64::new(0),
            quiet_since: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            close: Notify::new(),
        }
    }

    fn touch(&self) {
        self.activity.fetch_add(1, Ordering::Relaxed);
    }

    fn quiet_since(&self) -> Instant {
        self.accepted + Duration::from_millis(self.quiet_since.load(Ordering::Relaxed))
    }

    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
    }
}

/// Counts a request in flight however its future ends.
struct InFlight(Arc<Tracker>);

impl InFlight {
    fn new(tracker: &Arc<Tracker>) -> Self {
        tracker.requests.fetch_add(1, Ordering::Relaxed);
        tracker.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(tracker))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream that notes when bytes move.
struct Watched<S> {
    inner: S,
    tracker: Arc<Tracker>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.tracker.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.tracker.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.tracker.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The open connections, for eviction and for closing what is left at shutdown.
#[derive(Default)]
struct Registry {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Tracker>>>,
}

impl Registry {
    fn add(&self, tracker: &Arc<Tracker>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.open).insert(id, Arc::clone(tracker));
        id
    }

    fn remove(&self, id: u64) {
        lock(&self.open).remove(&id);
    }

    /// Closes the connection that has been idle longest; whether there was one.
    fn evict_one(&self) -> bool {
        let open = lock(&self.open);
        let victim = open
            .values()
            .filter(|t| t.idle())
            .min_by_key(|t| t.quiet_since());
        match victim {
            Some(t) => {
                t.close.notify_one();
                true
            }
            None => false,
        }
    }

    fn close_all(&self) {
        for t in lock(&self.open).values() {
            t.close.notify_one();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The server side of each protocol, configured once per listener: HTTP/1.1
/// and HTTP/2 for connections whose protocol is known from their first bytes
/// (or ALPN), `auto` for the rest.
struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    auto: auto::Builder<TokioExecutor>,
}

// The same settings on hyper's builders and on hyper-util's wrappers of them
// (different types with the same methods).
macro_rules! http1_settings {
    ($builder:expr, $options:expr) => {
        $builder
            .timer(TokioTimer::new())
            // The watchdog times heads (once per connection, not a timer per request).
            .header_read_timeout(None)
            .max_headers(MAX_HEADERS)
            .max_buf_size($options.max_header_bytes.max(8192))
    };
}

macro_rules! http2_settings {
    ($builder:expr, $options:expr) => {
        $builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_pending_accept_reset_streams(32)
            .max_local_error_reset_streams(256)
            .max_send_buf_size(256 * 1024)
            .keep_alive_interval($options.idle_timeout / 2)
            .keep_alive_timeout(Duration::from_secs(20))
            .max_header_list_size(u32::try_from($options.max_header_bytes).unwrap_or(u32::MAX))
    };
}

impl Builders {
    fn new(options: &ServeOptions) -> Self {
        let mut h1 = http1::Builder::new();
        http1_settings!(h1, options);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        http2_settings!(h2, options);
        let mut auto = auto::Builder::new(TokioExecutor::new());
        http1_settings!(auto.http1(), options);
        http2_settings!(auto.http2(), options);
        Builders { h1, h2, auto }
    }
}

/// What the client speaks on a plain connection, from the bytes it sent first
/// (looked at, not read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Speaks {
    Http1,
    /// The whole HTTP/2 connection preface: h2c with prior knowledge.
    Http2,
    /// A beginning of the preface, not all of it yet.
    Unsure,
}

/// The HTTP/2 connection preface (RFC 9113, 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn speaks(first: &[u8]) -> Speaks {
    if !PREFACE.starts_with(first) {
        Speaks::Http1
    } else if first.len() == PREFACE.len() {
        Speaks::Http2
    } else {
        Speaks::Unsure
    }
}

/// Serves `listener` until `shutdown`, then drains open connections.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Arc<H>,
    options: ServeOptions,
    mut shutdown: Shutdown,
) {
    let builders = Arc::new(Builders::new(&options));
    let limit = Arc::new(Semaphore::new(options.max_connections));
    let registry = Arc::new(Registry::default());
    let proto = if tls.is_some() { "https" } else { "http" };
    let mut backoff = Duration::ZERO;

    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.wait() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => { backoff = Duration::ZERO; a }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            },
        };
        let permit = match Arc::clone(&limit).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Full: make room by closing the longest-idle connection, then wait
                // for a slot (an accepted connection waits; the rest stay queued in
                // the kernel).
                if registry.evict_one() {
                    count_closed(&options, "evicted");
                }
                let acquire = Arc::clone(&limit).acquire_owned();
                tokio::select! {
                    _ = shutdown.wait() => break,
                    permit = acquire => match permit {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let tracker = Arc::new(Tracker::new(Instant::now()));
        let id = registry.add(&tracker);
        let task = Connection {
            stream,
            info: ConnInfo { peer, proto },
            tls: tls.clone(),
            handler: Arc::clone(&handler),
            builders: Arc::clone(&builders),
            options: options.clone(),
            tracker,
            shutdown: shutdown.clone(),
        };
        let registry = Arc::clone(&registry);
        tokio::spawn(async move {
            let open = Open::new(task.options.metrics.clone());
            task.run().await;
            registry.remove(id);
            drop((permit, open));
        });
    }
    drop(listener);
    let all = u32::try_from(options.max_connections).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(options.drain_timeout, limit.acquire_many(all)).await;
    if drained.is_err() {
        tracing::warn!("connections still open after the drain timeout; closing them");
        registry.close_all();
        let _ = tokio::time::timeout(Duration::from_secs(1), limit.acquire_many(all)).await;
    }
}

fn count_closed(options: &ServeOptions, reason: &str) {
    if let Some(m) = &options.metrics {
        m.connection_closed(reason).inc();
    }
}

/// Keeps the open-connection gauge right however a connection task ends.
struct Open(Option<Arc<Metrics>>);

impl Open {
    fn new(metrics: Option<Arc<Metrics>>) -> Self {
        if let Some(m) = &metrics {
            m.open_connections.inc();
        }
        Open(metrics)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(m) = &self.0 {
            m.open_connections.dec();
        }
    }
}

/// One accepted connection until it ends.
struct Connection<H: Handler> {
    stream: TcpStream,
    info: ConnInfo,
    tls: Option<TlsAcceptor>,
    handler: Arc<H>,
    builders: Arc<Builders>,
    options: ServeOptions,
    tracker: Arc<Tracker>,
    shutdown: Shutdown,
}

impl<H: Handler> Connection<H> {
    async fn run(self) {
        let Connection {
            stream,
            info,
            tls,
            handler,
            builders,
            options,
            tracker,
            mut shutdown,
        } = self;
        // Drives a connection (each protocol's type) under the watchdog.
        macro_rules! supervised {
            ($connection:expr) => {
                watch_connection(
                    $connection,
                    |c| c.graceful_shutdown(),
                    &tracker,
                    &options,
                    shutdown,
                )
                .await
            };
        }
        let watched = Watched {
            inner: stream,
            tracker: Arc::clone(&tracker),
        };
        let conn = Arc::new(handler.connect(info));
        let in_service = Arc::clone(&tracker);
        let service = hyper::service::service_fn(move |request| {
            let flight = InFlight::new(&in_service);
            Arc::clone(&handler).call(request, Arc::clone(&conn), flight)
        });
        match tls {
            None => {
                // Which protocol, from the first bytes while they are still in the
                // socket: hyper then reads the whole first request in one go, with
                // no rewinding layer under every later read.
                let mut first = [0u8; PREFACE.len()];
                let peeked = tokio::select! {
                    peeked = tokio::time::timeout(options.header_read_timeout, watched.inner.peek(&mut first)) => peeked,
                    _ = tracker.close.notified() => return,
                    _ = shutdown.wait() => return,
                };
                let n = match peeked {
                    Ok(Ok(0) | Err(_)) => return,
                    Ok(Ok(n)) => n,
                    Err(_) => {
                        count_closed(&options, "header_timeout");
                        return;
                    }
                };
                let io = TokioIo::new(watched);
                match speaks(&first[..n]) {
                    Speaks::Http1 => supervised!(builders.h1.serve_connection(io, service)),
                    Speaks::Http2 => supervised!(builders.h2.serve_connection(io, service)),
                    Speaks::Unsure => {
                        supervised!(builders.auto.serve_connection(io, service).into_owned())
                    }
                }
            }
            Some(acceptor) => {
                let handshake =
                    tokio::time::timeout(options.header_read_timeout, acceptor.accept(watched));
                let stream = match handshake.await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %info.peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        count_closed(&options, "header_timeout");
                        return;
                    }
                };
                let connection = builders
                    .auto
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                supervised!(connection);
            }
        }
    }
}

/// Drives a connection, closing it when it is idle or timed out, when evicted,
/// or gracefully at shutdown.
async fn watch_connection<C: Future<Output = O> + Send, O: Send>(
    connection: C,
    graceful: impl Fn(Pin<&mut C>) + Send,
    tracker: &Tracker,
    options: &ServeOptions,
    mut shutdown: Shutdown,
) {
    let mut connection = std::pin::pin!(connection);
    let mut draining = false;
    // The watchdog looks every half idle timeout (or header timeout): a silent
    // connection is closed between one and one and a half idle timeouts after
    // its last sign of life, and one that sends bytes without ever completing a
    // head (slowloris) about one header timeout after it started.
    let every = (options.idle_timeout / 2)
        .min(options.header_read_timeout / 2)
        .max(Duration::from_millis(250));
    let mut seen = tracker.activity.load(Ordering::Relaxed);
    let mut seen_requests = 0;
    let mut quiet_since = tracker.accepted;
    let mut partial_since: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let wake = if tracker.requests.load(Ordering::Relaxed) == 0 {
            (tracker.accepted + options.header_read_timeout).min(now + every)
        } else {
            now + every
        };
        tokio::select! {
            _ = connection.as_mut() => return,
            _ = tracker.close.notified() => return,
            _ = tokio::time::sleep_until(wake), if !draining => {
                let now = Instant::now();
                let activity = tracker.activity.load(Ordering::Relaxed);
                let requests = tracker.requests.load(Ordering::Relaxed);
                let moved = activity != seen;
                let new_request = requests != seen_requests;
                seen = activity;
                seen_requests = requests;
                if moved || !tracker.idle() {
                    quiet_since = now;
                    let ms = now.saturating_duration_since(tracker.accepted).as_millis();
                    tracker
                        .quiet_since
                        .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
                }
                if !tracker.idle() {
                    partial_since = None;
                    continue;
                }
                // Bytes keep coming, no request comes of them: half a head.
                partial_since = match (moved && !new_request, partial_since) {
                    (true, None) => Some(now),
                    (true, since) => since,
                    (false, _) => None,
                };
                let slow_head = partial_since
                    .is_some_and(|since| now >= since + options.header_read_timeout);
                if requests == 0 || slow_head {
                    if now >= tracker.accepted + options.header_read_timeout || slow_head {
                        count_closed(options, "header_timeout");
                        return;
                    }
                } else if now >= quiet_since + options.idle_timeout {
                    count_closed(options, "idle");
                    return;
                }
            }
            _ = shutdown.wait(), if !draining => {
                draining = true;
                graceful(connection.as_mut());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_bytes_tell_http1_from_a_preface_and_a_beginning_of_one() {
        let cases: &[(&[u8], Speaks)] = &[
            (b"GET / HTTP/1.1\r\n", Speaks::Http1),
            (b"G", Speaks::Http1),
            (b"POST /wiki HTTP/1.1\r\n", Speaks::Http1),
            (b"PRI * HTTP/1.1\r\n", Speaks::Http1),
            (b"PUT", Speaks::Http1),
            (b"P", Speaks::Unsure),
            (b"PRI * HTTP/2.0\r\n", Speaks::Unsure),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r", Speaks::Unsure),
            (PREFACE, Speaks::Http2),
        ];
        for (first, expected) in cases {
            assert_eq!(
                speaks(first),
                *expected,
                "{:?}",
                String::from_utf8_lossy(first)
            );
        }
    }
}
