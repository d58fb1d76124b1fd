//! Body wrappers that count bytes as they stream, and one that runs a closure once
//! when the body ends or is dropped (a client that hangs up still gets its record).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

/// Counts the data bytes that pass through into a shared counter.
pub struct Counted<B> {
    inner: Pin<Box<B>>,
    count: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Counted {
            inner: Box::pin(inner),
            count,
        }
    }
}

impl<B: HttpBody<Data = Bytes>> HttpBody for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
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

type Finish = Box<dyn FnOnce(u64) + Send + Sync>;

/// Counts data bytes (through `Counted`) and calls `finish(bytes)` once: at the
/// end of the stream or when dropped before it.
pub struct OnEnd<B> {
    inner: Counted<B>,
    finish: Option<Finish>,
}

impl<B> OnEnd<B> {
    pub fn new(inner: B, finish: impl FnOnce(u64) + Send + Sync + 'static) -> Self {
        OnEnd {
            inner: Counted::new(inner, Arc::default()),
            finish: Some(Box::new(finish)),
        }
    }

    fn done(&mut self) {
        if let Some(f) = self.finish.take() {
            f(self.inner.count.load(Ordering::Relaxed));
        }
    }
}

impl<B> Drop for OnEnd<B> {
    fn drop(&mut self) {
        self.done();
    }
}

impl<B: HttpBody<Data = Bytes>> HttpBody for OnEnd<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.done();
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
