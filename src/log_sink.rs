//! Standard error, written by one log thread: request handlers append finished
//! lines to a shared buffer (formatted in a reused thread-local buffer, without
//! a general-purpose JSON layer) and never write themselves. The thread wakes
//! every `FLUSH_EVERY` (or when the buffer passes a high-water mark), swaps the
//! buffer out and writes it in one go: requests never wake it, and a burst of
//! them costs one write.
//!
//! Invariants: a request never blocks on the log — when the buffer is full, its
//! line is dropped and counted; lines are never interleaved (tracing's own events
//! go through the same buffer); `flush` waits until everything appended so far
//! is written.

use std::cell::RefCell;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

/// Bytes buffered for the log thread at most; beyond, lines are dropped.
const CAPACITY: usize = 4 << 20;
/// Past this much, an appender wakes the log thread early.
const HIGH_WATER: usize = 1 << 20;
/// How often the log thread writes what was appended.
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

struct Buffer {
    bytes: Vec<u8>,
    /// Lines handed over so far, and lines written so far (for `flush`).
    appended: u64,
    written: u64,
}

struct Inner {
    buffer: Mutex<Buffer>,
    /// Wakes the log thread (pending lines) and `flush` callers (written).
    wake: Condvar,
    done: Condvar,
    dropped: AtomicU64,
}

/// The process's standard-error log.
#[derive(Clone)]
pub struct LogSink {
    inner: Arc<Inner>,
    json: bool,
}

static GLOBAL: OnceLock<LogSink> = OnceLock::new();

impl LogSink {
    /// Starts the log thread (once per process) and returns the sink.
    pub fn global(json: bool) -> LogSink {
        GLOBAL
            .get_or_init(|| {
                let inner = Arc::new(Inner {
                    buffer: Mutex::new(Buffer {
                        bytes: Vec::with_capacity(INITIAL),
                        appended: 0,
                        written: 0,
                    }),
                    wake: Condvar::new(),
                    done: Condvar::new(),
                    dropped: AtomicU64::new(0),
                });
                let thread_inner = Arc::clone(&inner);
                let _ = std::thread::Builder::new()
                    .name("keygate-log".into())
                    .spawn(move || run(&thread_inner));
                LogSink { inner, json }
            })
            .clone()
    }

    /// The sink if one was started.
    pub fn get() -> Option<LogSink> {
        GLOBAL.get().cloned()
    }

    /// Lines dropped because the thread fell behind, since start.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    pub fn json(&self) -> bool {
        self.json
    }

    /// Hands a finished line (with its newline) to the log thread, or drops it.
    pub fn append(&self, line: &[u8]) {
        let mut buffer = self.inner.buffer.lock().unwrap_or_else(|p| p.into_inner());
        if buffer.bytes.len() + line.len() > CAPACITY {
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let below = buffer.bytes.len() < HIGH_WATER;
        buffer.bytes.extend_from_slice(line);
        buffer.appended += 1;
        let past = below && buffer.bytes.len() >= HIGH_WATER;
        drop(buffer);
        if past {
            self.inner.wake.notify_one();
        }
    }

    /// Waits (at most `limit`) until every line appended so far is written.
    pub fn flush(&self, limit: Duration) {
        let mut buffer = self.inner.buffer.lock().unwrap_or_else(|p| p.into_inner());
        let target = buffer.appended;
        self.inner.wake.notify_one();
        let deadline = std::time::Instant::now() + limit;
        while buffer.written < target {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            buffer = match self.inner.done.wait_timeout(buffer, left) {
                Ok((b, _)) => b,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

/// Either buffer's size to start with and to return to once quiet: a busy
/// proxy's buffers grow to what 50 ms of lines take (about a megabyte at 50,000
/// requests a second) and stay that large while it stays busy.
const INITIAL: usize = 64 * 1024;

/// Gives a buffer grown past `INITIAL` back, keeping an empty one.
fn shrink(buffer: &mut Vec<u8>) {
    if buffer.is_empty() && buffer.capacity() > INITIAL {
        *buffer = Vec::with_capacity(INITIAL);
    }
}

fn run(inner: &Inner) {
    let mut out: Vec<u8> = Vec::with_capacity(INITIAL);
    loop {
        let lines = {
            let mut buffer = inner.buffer.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                buffer = match inner.wake.wait_timeout(buffer, FLUSH_EVERY) {
                    Ok((b, _)) => b,
                    Err(p) => p.into_inner().0,
                };
                if !buffer.bytes.is_empty() {
                    break;
                }
                // Quiet: what a burst grew both buffers to goes back.
                shrink(&mut buffer.bytes);
                shrink(&mut out);
            }
            std::mem::swap(&mut buffer.bytes, &mut out);
            buffer.appended
        };
        let _ = std::io::stderr().lock().write_all(&out);
        out.clear();
        let mut buffer = inner.buffer.lock().unwrap_or_else(|p| p.into_inner());
        buffer.written = lines;
        inner.done.notify_all();
    }
}

/// `tracing`'s writer: whole events into the same buffer.
pub struct EventWriter {
    sink: LogSink,
    line: Vec<u8>,
}

impl std::io::Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.sink.append(&self.line);
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> Self::Writer {
        EventWriter {
            sink: self.clone(),
            line: Vec::new(),
        }
    }
}

/// One access log line: what happened to one request.
pub struct AccessLine<'a> {
    pub request_id: &'a str,
    /// The peer's address as text (formatted once per connection).
    pub peer: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub upstream_status: Option<u16>,
    pub client_id: Option<&'a str>,
    pub route: Option<&'a str>,
    pub admin_key: bool,
    pub auth_failure: Option<&'a str>,
    pub duration_ms: u64,
}

thread_local! {
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
    /// The timestamp up to the second (`2026-11-29T10:17:26.`), and its second.
    static SECOND: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
}

/// Appends a number in decimal without the formatting machinery.
fn number(out: &mut Vec<u8>, n: u64) {
    crate::rfc3339::push_decimal(out, n);
}

impl LogSink {
    /// Formats and hands over an access log line (target `keygate::access`), in
    /// the same shape as tracing's JSON or text output.
    pub fn access(&self, line: &AccessLine<'_>) {
        LINE.with(|buf| {
            let Ok(mut buf) = buf.try_borrow_mut() else {
                return;
            };
            buf.clear();
            if self.json {
                format_json(&mut buf, line);
            } else {
                format_text(&mut buf, line);
            }
            self.append(&buf);
        });
    }
}

/// `2026-11-29T10:17:26.484028Z`: the part up to the second is formatted once a
/// second per thread.
fn timestamp(out: &mut Vec<u8>) {
    let since = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.0 != secs {
            let mut prefix = Vec::with_capacity(32);
            crate::rfc3339::write_micros(
                &mut prefix,
                std::time::UNIX_EPOCH + Duration::from_secs(secs),
            );
            prefix.truncate(prefix.len().saturating_sub(7)); // "000000Z"
            *cell = (secs, prefix);
        }
        out.extend_from_slice(&cell.1);
    });
    let micros = since.subsec_micros();
    let mut digits = [b'0'; 6];
    let mut m = micros;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (m % 10) as u8;
        m /= 10;
    }
    out.extend_from_slice(&digits);
    out.push(b'Z');
}

fn format_json(out: &mut Vec<u8>, l: &AccessLine<'_>) {
    out.extend_from_slice(b"{\"timestamp\":\"");
    timestamp(out);
    out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\",\"request_id\":");
    json_str(out, l.request_id);
    out.extend_from_slice(b",\"peer\":");
    json_str(out, l.peer);
    out.extend_from_slice(b",\"method\":");
    json_str(out, l.method);
    out.extend_from_slice(b",\"path\":");
    json_str(out, l.path);
    out.extend_from_slice(b",\"status\":");
    number(out, u64::from(l.status));
    if let Some(s) = l.upstream_status {
        out.extend_from_slice(b",\"upstream_status\":");
        number(out, u64::from(s));
    }
    if let Some(c) = l.client_id {
        out.extend_from_slice(b",\"client_id\":");
        json_str(out, c);
    }
    if let Some(r) = l.route {
        out.extend_from_slice(b",\"route\":");
        json_str(out, r);
    }
    out.extend_from_slice(if l.admin_key {
        b",\"admin_key\":true"
    } else {
        b",\"admin_key\":false"
    });
    if let Some(a) = l.auth_failure {
        out.extend_from_slice(b",\"auth_failure\":");
        json_str(out, a);
    }
    out.extend_from_slice(b",\"duration_ms\":");
    number(out, l.duration_ms);
    out.extend_from_slice(b",\"target\":\"keygate::access\"}\n");
}

fn format_text(out: &mut Vec<u8>, l: &AccessLine<'_>) {
    timestamp(out);
    out.extend_from_slice(b"  INFO keygate::access: request request_id=");
    out.extend_from_slice(l.request_id.as_bytes());
    out.extend_from_slice(b" peer=");
    out.extend_from_slice(l.peer.as_bytes());
    out.extend_from_slice(b" method=");
    text_value(out, l.method);
    out.extend_from_slice(b" path=");
    text_value(out, l.path);
    let _ = write!(out, " status={}", l.status);
    if let Some(s) = l.upstream_status {
        let _ = write!(out, " upstream_status={s}");
    }
    if let Some(c) = l.client_id {
        out.extend_from_slice(b" client_id=\"");
        text_value(out, c);
        out.push(b'"');
    }
    if let Some(r) = l.route {
        out.extend_from_slice(b" route=\"");
        text_value(out, r);
        out.push(b'"');
    }
    let _ = write!(out, " admin_key={}", l.admin_key);
    if let Some(a) = l.auth_failure {
        let _ = write!(out, " auth_failure=\"{a}\"");
    }
    let _ = writeln!(out, " duration_ms={}", l.duration_ms);
}

/// A JSON string literal.
fn json_str(out: &mut Vec<u8>, s: &str) {
    // As tracing's JSON layer (serde_json) escapes.
    crate::json::push_str(out, s);
}

/// A value in a text line: control characters escaped so a client cannot forge
/// a line.
fn text_value(out: &mut Vec<u8>, s: &str) {
    if !s.bytes().any(|b| b < 0x20 || b == 0x7f) {
        out.extend_from_slice(s.as_bytes());
        return;
    }
    for &b in s.as_bytes() {
        match b {
            0x00..=0x1F | 0x7F => {
                let _ = write!(out, "\\x{b:02x}");
            }
            _ => out.push(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_empty_buffer_grown_past_its_start_is_given_back() {
        for (len, capacity, kept) in [
            (0, 1 << 20, false),
            (1, 1 << 20, true),
            (0, INITIAL, true),
            (0, 0, true),
        ] {
            let mut buffer = Vec::with_capacity(capacity);
            buffer.resize(len, b'x');
            let before = buffer.capacity();
            shrink(&mut buffer);
            assert_eq!(buffer.len(), len);
            if kept {
                assert_eq!(buffer.capacity(), before, "{len}/{capacity}");
            } else {
                assert!(buffer.capacity() >= INITIAL && buffer.capacity() < before);
            }
        }
    }

    #[test]
    fn json_lines_have_tracing_shape_and_escape_client_strings() {
        let mut out = Vec::new();
        format_json(
            &mut out,
            &AccessLine {
                request_id: "r1",
                peer: "127.0.0.1:5",
                method: "GET",
                path: "/wiki/\"x\"\n",
                status: 200,
                upstream_status: Some(200),
                client_id: Some("scanner_x"),
                route: None,
                admin_key: true,
                auth_failure: None,
                duration_ms: 3,
            },
        );
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.ends_with("}\n") && text.matches('\n').count() == 1,
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["message"], "request");
        assert_eq!(v["target"], "keygate::access");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["path"], "/wiki/\"x\"\n");
        assert_eq!(v["upstream_status"], 200);
        assert!(v.get("route").is_none());
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn text_lines_cannot_be_split_by_a_client() {
        let mut out = Vec::new();
        format_text(
            &mut out,
            &AccessLine {
                request_id: "r1",
                peer: "127.0.0.1:5",
                method: "GET",
                path: "/a\nfake line",
                status: 401,
                upstream_status: None,
                client_id: None,
                route: None,
                admin_key: false,
                auth_failure: Some("missing"),
                duration_ms: 0,
            },
        );
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        assert!(text.contains("path=/a\\x0afake line"), "{text}");
    }
}
