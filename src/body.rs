//! The one body type responses and upstream requests use (boxed, streaming), and
//! the wrapper every forwarded body goes through.
//!
//! `Guarded` counts data bytes, applies the trailer rules (a client's trailers
//! are dropped; Confluence's are cleaned like response headers), fails a body
//! that stalls longer than its idle timeout, and runs a closure once when the
//! body ends or is dropped (a client that hangs up still gets its record).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt as _, Empty, Full};
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Boxes any body whose errors can be boxed (hyper's `Incoming`, for one).
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// Boxes a body whose errors are already `BoxError` (no mapping layer).
pub fn boxed_as_is<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes, Error = BoxError> + Send + Sync + 'static,
{
    http_body_util::combinators::BoxBody::new(body)
}

/// A change to the data of a body as it streams (rewriting URLs, say).
pub trait Transform: Send + Sync + 'static {
    /// What to pass on for `data`; may be empty while something is held back.
    fn data(&mut self, data: Bytes) -> Bytes;
    /// What was held back, at the end of the data.
    fn finish(&mut self) -> Bytes;
}

/// What happens to trailers on the way through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trailers {
    /// Never forwarded (a client's trailers must not reach Confluence).
    Drop,
    /// Cleaned by the response header rules.
    Clean,
}

/// How a body ended, for the closure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Every frame passed.
    Complete,
    /// Dropped before the end (the other side went away), or an error.
    Cut,
    /// No frame within the idle timeout.
    Stalled,
}

/// The body stalled: no frame within its idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("no data for {0:?}: the body stalled")]
pub struct Stalled(pub Duration);

type Finish = Box<dyn FnOnce(u64, End) + Send + Sync>;

/// See the module doc.
pub struct Guarded<B> {
    inner: B,
    count: Arc<AtomicU64>,
    trailers: Trailers,
    idle: Option<Duration>,
    /// Armed the first time the body has to wait (most bodies never do).
    sleep: Option<Pin<Box<Sleep>>>,
    transform: Option<Box<dyn Transform>>,
    /// Counted when the body stalls.
    stalls: Option<prometheus_client::metrics::counter::Counter>,
    /// Trailers waiting while held-back data is flushed first.
    pending: Option<Frame<Bytes>>,
    /// A frame already taken from `inner` (a look-ahead), passed on first.
    first: Option<Result<Frame<Bytes>, BoxError>>,
    /// The inner body ended; held-back data was flushed.
    drained: bool,
    finish: Option<Finish>,
    ended: bool,
}

impl<B> Guarded<B> {
    pub fn new(inner: B, trailers: Trailers) -> Self {
        Guarded {
            inner,
            count: Arc::default(),
            trailers,
            idle: None,
            sleep: None,
            transform: None,
            stalls: None,
            pending: None,
            first: None,
            drained: false,
            finish: None,
            ended: false,
        }
    }

    /// Counts data bytes into `count` (shared with whoever reads it later).
    pub fn counting(mut self, count: Arc<AtomicU64>) -> Self {
        self.count = count;
        self
    }

    /// Fails the body when no frame arrives for `idle`.
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle = Some(idle);
        self
    }

    /// Counts a stall in `counter`.
    pub fn counting_stalls(
        mut self,
        counter: &prometheus_client::metrics::counter::Counter,
    ) -> Self {
        self.stalls = Some(counter.clone());
        self
    }

    /// Starts with `first`, a frame already polled from the inner body; it is
    /// counted, transformed and checked like the ones that follow.
    pub fn starting_with(mut self, first: Result<Frame<Bytes>, BoxError>) -> Self {
        self.first = Some(first);
        self
    }

    /// Passes the data through `transform`.
    pub fn transforming(mut self, transform: impl Transform) -> Self {
        self.transform = Some(Box::new(transform));
        self
    }

    /// Calls `finish(bytes, how)` once, at the end or when dropped before it.
    pub fn on_end(mut self, finish: impl FnOnce(u64, End) + Send + Sync + 'static) -> Self {
        self.finish = Some(Box::new(finish));
        self
    }

    fn done(&mut self, how: End) {
        self.ended = true;
        if let Some(f) = self.finish.take() {
            f(self.count.load(Ordering::Relaxed), how);
        }
    }
}

impl<B> Drop for Guarded<B> {
    fn drop(&mut self) {
        self.done(End::Cut);
    }
}

impl<B> HttpBody for Guarded<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(frame) = this.pending.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if this.ended || this.drained {
            if !this.ended {
                this.done(End::Complete);
            }
            return Poll::Ready(None);
        }
        loop {
            let polled = match this.first.take() {
                Some(first) => Poll::Ready(Some(first)),
                None => Pin::new(&mut this.inner).poll_frame(cx).map_err(Into::into),
            };
            match polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let (Some(idle), Some(sleep)) = (this.idle, &mut this.sleep) {
                        sleep.as_mut().reset(Instant::now() + idle);
                    }
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            this.count.fetch_add(data.len() as u64, Ordering::Relaxed);
                            let data = match &mut this.transform {
                                Some(t) => t.data(data),
                                None => data,
                            };
                            if data.is_empty() {
                                continue;
                            }
                            Frame::data(data)
                        }
                        Err(frame) => match frame.into_trailers() {
                            Ok(mut trailers) => match this.trailers {
                                Trailers::Drop => continue,
                                Trailers::Clean => {
                                    crate::headers::strip_response(&mut trailers);
                                    let held = this.transform.as_mut().map(|t| t.finish());
                                    match held.filter(|h| !h.is_empty()) {
                                        Some(held) => {
                                            this.pending = Some(Frame::trailers(trailers));
                                            Frame::data(held)
                                        }
                                        None => Frame::trailers(trailers),
                                    }
                                }
                            },
                            // A frame kind neither data nor trailers: not passed on.
                            Err(_) => continue,
                        },
                    };
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done(End::Cut);
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    let held = this.transform.as_mut().map(|t| t.finish());
                    if let Some(held) = held.filter(|h| !h.is_empty()) {
                        this.drained = true;
                        return Poll::Ready(Some(Ok(Frame::data(held))));
                    }
                    this.done(End::Complete);
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    if let Some(idle) = this.idle {
                        let sleep = this
                            .sleep
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                        if sleep.as_mut().poll(cx).is_ready() {
                            if let Some(c) = &this.stalls {
                                c.inc();
                            }
                            this.done(End::Stalled);
                            return Poll::Ready(Some(Err(Box::new(Stalled(idle)))));
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none()
            && self.first.is_none()
            && (self.ended || (self.transform.is_none() && self.inner.is_end_stream()))
    }

    fn size_hint(&self) -> SizeHint {
        if self.transform.is_some() || self.first.is_some() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

use std::future::Future as _;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Yields its frames, then ends — or stays pending forever with `stall`.
    struct Frames {
        frames: VecDeque<Frame<Bytes>>,
        stall: bool,
    }

    impl HttpBody for Frames {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            match self.frames.pop_front() {
                Some(f) => Poll::Ready(Some(Ok(f))),
                None if self.stall => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    fn trailers(pairs: &[(&'static str, &'static str)]) -> Frame<Bytes> {
        let mut map = http::HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, http::HeaderValue::from_static(v));
        }
        Frame::trailers(map)
    }

    #[tokio::test]
    async fn a_frame_taken_ahead_comes_first_and_is_counted_like_the_rest() {
        let rest = || Frames {
            frames: VecDeque::from([Frame::data(Bytes::from_static(b"cd"))]),
            stall: false,
        };
        let count = Arc::new(AtomicU64::new(0));
        let body = Guarded::new(rest(), Trailers::Clean)
            .counting(Arc::clone(&count))
            .starting_with(Ok(Frame::data(Bytes::from_static(b"ab"))));
        assert!(!body.is_end_stream());
        assert_eq!(body.size_hint().exact(), None);
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"abcd");
        assert_eq!(count.load(Ordering::Relaxed), 4);

        // An error taken ahead is the body's first answer, and ends it.
        let ended = Arc::new(std::sync::Mutex::new(None));
        let seen = Arc::clone(&ended);
        let body = Guarded::new(rest(), Trailers::Clean)
            .starting_with(Err("reset".into()))
            .on_end(move |bytes, how| *seen.lock().unwrap() = Some((bytes, how)));
        let error = body.collect().await.err().unwrap();
        assert_eq!(error.to_string(), "reset");
        assert_eq!(*ended.lock().unwrap(), Some((0, End::Cut)));
    }

    #[tokio::test]
    async fn client_trailers_are_dropped_and_response_trailers_cleaned() {
        let list = || Frames {
            frames: VecDeque::from([
                Frame::data(Bytes::from_static(b"abc")),
                trailers(&[
                    ("authorization", "Basic eA=="),
                    ("atl-confluence-with-admin-key", "true"),
                    ("set-cookie", "s=1"),
                    ("x-checksum", "1"),
                ]),
            ]),
            stall: false,
        };
        let count = Arc::new(AtomicU64::new(0));
        let dropped = Guarded::new(list(), Trailers::Drop)
            .counting(Arc::clone(&count))
            .collect()
            .await
            .unwrap();
        assert!(dropped.trailers().is_none());
        assert_eq!(count.load(Ordering::Relaxed), 3);
        let cleaned = Guarded::new(list(), Trailers::Clean)
            .collect()
            .await
            .unwrap();
        let t = cleaned.trailers().unwrap();
        assert!(t.get("set-cookie").is_none());
        assert_eq!(t["x-checksum"], "1");
        assert_eq!(t["authorization"], "Basic eA==", "response rules only");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_and_says_so_once() {
        let ends = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&ends);
        let body = Guarded::new(
            Frames {
                frames: VecDeque::from([Frame::data(Bytes::from_static(b"xy"))]),
                stall: true,
            },
            Trailers::Clean,
        )
        .idle_timeout(Duration::from_secs(5))
        .on_end(move |n, how| seen.lock().unwrap().push((n, how)));
        let err = body.collect().await.unwrap_err();
        assert!(err.to_string().contains("stalled"), "{err}");
        assert_eq!(*ends.lock().unwrap(), [(2, End::Stalled)]);
    }
}
