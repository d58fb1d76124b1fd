//! Bodies the stand-in streams or consumes.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;

use super::{json, StandinState};
use crate::body::{Body, BoxError};

/// Consumes an upload frame by frame and reports its size and SHA-256.
pub(super) async fn upload(state: &StandinState, mut body: Incoming) -> Response<Body> {
    let mut size: u64 = 0;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    size += data.len() as u64;
                    hash.update(data);
                }
                if let Ok(trailers) = frame.into_trailers() {
                    state.record_trailers(trailers);
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
pub(super) struct PatternBody {
    pub(super) remaining: u64,
    pub(super) offset: u64,
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

/// `ok` followed by trailers, one of which must never reach a client.
pub(super) fn with_trailers() -> Response<Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert(
        http::header::SET_COOKIE,
        http::HeaderValue::from_static("cloud.session.token=standin-trailer-session"),
    );
    trailers.insert("x-checksum", http::HeaderValue::from_static("sha256=abc"));
    let frames = vec![
        Frame::data(Bytes::from_static(b"ok")),
        Frame::trailers(trailers),
    ];
    let mut r = Response::new(crate::body::boxed(Frames(frames.into_iter())));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    r.headers_mut().insert(
        http::header::TRAILER,
        http::HeaderValue::from_static("set-cookie, x-checksum"),
    );
    r
}

struct Frames(std::vec::IntoIter<Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.next().map(Ok))
    }
}

/// `bytes` bytes, then nothing, forever: an upstream that hangs mid-body.
pub(super) fn stalling(bytes: u64) -> Response<Body> {
    let mut r = Response::new(crate::body::boxed(Stalling {
        first: Some(Bytes::from(vec![
            b'x';
            usize::try_from(bytes).unwrap_or(16)
        ])),
    }));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/octet-stream"),
    );
    r
}

struct Stalling {
    first: Option<Bytes>,
}

impl http_body::Body for Stalling {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.first.take() {
            Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
            None => Poll::Pending,
        }
    }
}

/// A gzip member holding `data` in stored (uncompressed) deflate blocks: a valid
/// `Content-Encoding: gzip` body without a compression library.
pub(super) fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    let mut chunks = data.chunks(65_535).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        let last = u8::from(chunks.peek().is_none());
        let len = u16::try_from(chunk.len()).unwrap_or(u16::MAX);
        out.push(last);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(u32::try_from(data.len() % (1 << 32)).unwrap_or(0)).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc32_of_a_known_string() {
        assert_eq!(super::crc32(b"123456789"), 0xcbf4_3926);
    }
}
