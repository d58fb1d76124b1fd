//! Accept loops: HTTP/1.1 and HTTP/2 on one listener (ALPN over TLS, h2c with prior
//! knowledge on plain TCP), a connection limit, a header read timeout, and graceful
//! shutdown that lets in-flight requests finish.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::body::Body;
use crate::proxy::ConnInfo;

/// Something that answers requests.
pub trait Handler: Send + Sync + 'static {
    fn call(
        &self,
        request: Request<Incoming>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send;
}

/// Per-listener settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    /// How long in-flight requests get after shutdown starts.
    pub drain_timeout: Duration,
    /// Counts open connections, if given.
    pub connections: Option<Arc<std::sync::atomic::AtomicI64>>,
}

/// Keeps the open-connection count right however a connection task ends.
struct Open(Option<Arc<std::sync::atomic::AtomicI64>>);

impl Open {
    fn new(counter: Option<Arc<std::sync::atomic::AtomicI64>>) -> Self {
        if let Some(c) = &counter {
            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Open(counter)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

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
}

/// Serves `listener` until `shutdown`, then drains open connections.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Arc<H>,
    options: ServeOptions,
    mut shutdown: Shutdown,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(options.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(options.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(options.max_connections));
    let proto = if tls.is_some() { "https" } else { "http" };

    loop {
        let permit = tokio::select! {
            _ = shutdown.wait() => break,
            permit = Arc::clone(&limit).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.wait() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let open = Open::new(options.connections.clone());
        let conn = ConnInfo { peer, proto };
        let handler = Arc::clone(&handler);
        let service = hyper::service::service_fn(move |request| {
            let handler = Arc::clone(&handler);
            async move { Ok::<_, Infallible>(handler.call(request, conn).await) }
        });
        let builder = Arc::clone(&builder);
        match &tls {
            None => {
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                let watched = graceful.watch(connection.into_owned());
                tokio::spawn(async move {
                    let _ = watched.await;
                    drop((permit, open));
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let handshake_timeout = options.header_read_timeout;
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
                    let stream = match handshake.await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    let _ = watcher.watch(connection.into_owned()).await;
                    drop((permit, open));
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(options.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain timeout; closing them");
    }
}
