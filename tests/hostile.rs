//! Hostile clients over raw sockets and raw HTTP/2 frames: trailers, connections
//! that send nothing or half a head, HTTP/2 frame abuse, and upstream answers
//! keygate must not relay as they are. Each test asserts on what the stand-in
//! received and that a well-behaved client is still answered.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::check::assert_never_forwarded;
use support::client::{get, get_h2c, h2raw};
use support::process::anonymous_kib;
use support::{DemoKeyExt as _, Harness, Setup};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const PAGE: &str = "/wiki/api/v2/pages/1001";
const UPLOAD: &str = "/wiki/rest/api/content/1001/child/attachment";

/// The dev routes plus uploads and the stand-in's test endpoints for everyone.
fn routes() -> String {
    format!(
        "{}  - name: uploads\n    methods: [POST]\n    path: /wiki/rest/api/content/{{id}}/child/attachment\n    roles: [\"*\"]\n",
        keygate::dev::DEV_ROUTES
    )
}

/// Reads until the peer closes (or `limit` passes); how long that took.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

/// A request body of one data frame and then trailers.
struct WithTrailers(Option<http_body::Frame<Bytes>>, Option<http::HeaderMap>);

impl http_body::Body for WithTrailers {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if let Some(data) = self.0.take() {
            return std::task::Poll::Ready(Some(Ok(data)));
        }
        std::task::Poll::Ready(self.1.take().map(|t| Ok(http_body::Frame::trailers(t))))
    }
}

fn smuggling_trailers(auth: &str) -> http::HeaderMap {
    let mut t = http::HeaderMap::new();
    t.insert("authorization", auth.parse().unwrap());
    t.insert("atl-confluence-with-admin-key", "true".parse().unwrap());
    t.insert("x-trailer", "1".parse().unwrap());
    t
}

#[tokio::test]
async fn client_trailers_never_reach_confluence_over_http1_or_http2_upstream() {
    let pki = support::pki::make_pki();
    let standin = support::pki::tls_standin(&pki).await;
    let state = Arc::clone(&standin.state);
    let port = standin.addr.port();
    let h = Harness::start_in_front_of(
        standin,
        Setup {
            base_url: Some(format!("https://localhost:{port}")),
            confluence_extra: format!("  ca_file: {}\n", pki.ca_pem.display()),
            routes: routes(),
            ..Default::default()
        },
    )
    .await;
    let auth = h.reader.basic();

    // HTTP/2 from the client (h2c), HTTP/2 upstream (the stand-in offers h2).
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = http::Request::post(h.url(UPLOAD))
        .header("authorization", &auth)
        .body(WithTrailers(
            Some(http_body::Frame::data(Bytes::from_static(b"payload"))),
            Some(smuggling_trailers(&auth)),
        ))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("\"size\":7"));

    // HTTP/1.1 chunked with a trailer section, over a raw socket.
    let mut tcp = TcpStream::connect(h.addr).await.unwrap();
    let raw = format!(
        "POST {UPLOAD} HTTP/1.1\r\nHost: keygate\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\nTrailer: Authorization, Atl-Confluence-With-Admin-Key\r\nConnection: close\r\n\r\n7\r\npayload\r\n0\r\nAuthorization: {auth}\r\nAtl-Confluence-With-Admin-Key: true\r\n\r\n"
    );
    tcp.write_all(raw.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    tcp.read_to_end(&mut reply).await.unwrap();
    assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 200"));

    let uploads = h.forwarded().iter().filter(|r| r.path() == UPLOAD).count();
    assert_eq!(uploads, 2, "both uploads reached Confluence");
    let trailers = state.trailers();
    assert!(
        trailers.iter().all(|t| t.is_empty()),
        "client trailers reached Confluence: {trailers:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn response_trailers_are_cleaned_like_headers() {
    let pki = support::pki::make_pki();
    let standin = support::pki::tls_standin(&pki).await;
    let port = standin.addr.port();
    let h = Harness::start_in_front_of(
        standin,
        Setup {
            base_url: Some(format!("https://localhost:{port}")),
            confluence_extra: format!("  ca_file: {}\n", pki.ca_pem.display()),
            ..Default::default()
        },
    )
    .await;
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get(h.url("/wiki/trailers"))
        .header("authorization", h.reader.basic())
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers arrive over h2");
    assert_eq!(trailers["x-checksum"], "sha256=abc", "other trailers pass");
    assert!(
        trailers.get("set-cookie").is_none(),
        "Set-Cookie in trailers reached the client"
    );
    h.stop().await;
}

fn tight_limits() -> Setup {
    Setup {
        extra: "limits:\n  per_client_rps: 0\n  max_connections: 16\n  header_read_timeout: 2s\n  idle_timeout: 3s\n  body_idle_timeout: 2s\n".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_nothing_cannot_lock_out_a_client() {
    let h = Harness::start_with(tight_limits()).await;
    let auth = h.reader.basic();
    // Every slot taken by a connection that sends nothing, or half a head.
    let mut silent = Vec::new();
    for i in 0..16 {
        let mut s = TcpStream::connect(h.addr).await.unwrap();
        if i % 2 == 1 {
            s.write_all(b"GET /wiki HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        silent.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let reply = get(&h.url(PAGE), &[("Authorization", &auth)]).await;
    let took = started.elapsed();
    assert_eq!(reply.status, 200);
    assert!(
        took < Duration::from_secs(1),
        "a well-behaved client waited {took:?} (the header timeout is 2s): no idle connection was evicted"
    );
    // The rest are closed at the header timeout.
    for s in &mut silent {
        let closed = closed_within(s, Duration::from_secs(5)).await;
        assert!(closed.is_some(), "a silent connection stayed open");
    }
    h.stop().await;
}

#[tokio::test]
async fn half_heads_idle_keepalives_and_silent_http2_are_closed() {
    let h = Harness::start_with(tight_limits()).await;
    // Half a request head: closed at the header timeout.
    let mut half = TcpStream::connect(h.addr).await.unwrap();
    half.write_all(b"GET /wiki HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    // An HTTP/2 preface and settings, then nothing.
    let mut h2 = TcpStream::connect(h.addr).await.unwrap();
    h2.write_all(&h2raw::opening()).await.unwrap();
    // A finished keep-alive request, then silence.
    let mut idle = TcpStream::connect(h.addr).await.unwrap();
    let head = format!(
        "GET {PAGE} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
        h.reader.basic()
    );
    idle.write_all(head.as_bytes()).await.unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");

    for (what, stream, within) in [
        ("half a head", &mut half, 5),
        ("a silent HTTP/2 connection", &mut h2, 5),
        ("an idle keep-alive connection", &mut idle, 8),
    ] {
        let closed = closed_within(stream, Duration::from_secs(within)).await;
        assert!(closed.is_some(), "{what} was never closed");
    }
    let metrics = get(&h.ops_url("/metrics"), &[]).await.text();
    assert!(
        metrics.contains("keygate_connections_closed_total{reason=\"header_timeout\"}"),
        "{metrics}"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_stalled_response_body_is_cut_and_counted() {
    let h = Harness::start_with(tight_limits()).await;
    let mut tcp = TcpStream::connect(h.addr).await.unwrap();
    let head = format!(
        "GET /wiki/stall?bytes=5 HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
        h.reader.basic()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let closed = closed_within(&mut tcp, Duration::from_secs(8)).await;
    assert!(closed.is_some(), "a stalled body held the connection");
    let metrics = get(&h.ops_url("/metrics"), &[]).await.text();
    assert!(
        metrics.contains("keygate_body_idle_timeouts_total 1"),
        "{metrics}"
    );
    h.stop().await;
}

#[tokio::test]
async fn an_unsolicited_protocol_switch_from_upstream_becomes_502() {
    let h = Harness::start().await;
    let reply = get(
        &h.url("/wiki/switch"),
        &[("Authorization", &h.reader.basic())],
    )
    .await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(reply.json()["error"], "upstream_protocol");
    assert!(reply.headers.get("upgrade").is_none());
    h.stop().await;
}

/// One HTTP/2 attack on its own connection: the bytes to send.
fn attacks(auth: &str) -> Vec<(&'static str, Vec<u8>)> {
    let base = |extra: &[(&[u8], &[u8])], path: &[u8]| {
        let mut fields: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"keygate"),
            (b":path", path),
            (b"authorization", auth.as_bytes()),
        ];
        fields.extend_from_slice(extra);
        h2raw::block(&fields)
    };
    let one = |block: Vec<u8>| {
        let mut out = h2raw::opening();
        out.extend(h2raw::frame(
            h2raw::HEADERS,
            h2raw::END_HEADERS | h2raw::END_STREAM,
            1,
            &block,
        ));
        out
    };
    let page = PAGE.as_bytes();
    let mut list = vec![
        (
            "an upper-case bypass header",
            one(base(&[(b"Atl-Confluence-With-Admin-Key", b"true")], page)),
        ),
        (
            "a connection-specific header",
            one(base(
                &[(b"connection", b"atl-confluence-with-admin-key")],
                page,
            )),
        ),
        (
            "te other than trailers",
            one(base(&[(b"te", b"gzip")], page)),
        ),
        (
            "CR LF in a value",
            one(base(
                &[(b"x-a", b"1\r\natl-confluence-with-admin-key: true")],
                page,
            )),
        ),
        ("NUL in a value", one(base(&[(b"x-a", b"a\0b")], page))),
        (
            "an absolute :path",
            one(base(&[], b"http://evil.example/wiki/api/v2/pages/1001")),
        ),
        (
            "a second :path",
            one(base(&[(b":path", b"/wiki/api/v2/pages/2001")], page)),
        ),
        (
            "a dot segment",
            one(base(&[], b"/wiki/api/v2/pages/../2001")),
        ),
    ];
    // Rapid reset: open and cancel many streams.
    let mut rapid = h2raw::opening();
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        rapid.extend(h2raw::frame(
            h2raw::HEADERS,
            h2raw::END_HEADERS | h2raw::END_STREAM,
            id,
            &base(&[], page),
        ));
        rapid.extend(h2raw::frame(h2raw::RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    list.push(("rapid reset", rapid));
    // A CONTINUATION flood: a header block that never ends.
    let mut flood = h2raw::opening();
    flood.extend(h2raw::frame(h2raw::HEADERS, 0, 1, &base(&[], page)));
    let filler = h2raw::block(&[(b"x-filler", &[b'a'; 100])]);
    for _ in 0..20_000 {
        flood.extend(h2raw::frame(h2raw::CONTINUATION, 0, 1, &filler));
    }
    list.push(("a CONTINUATION flood", flood));
    // One huge header block, split as frames must be.
    let huge = base(&[(b"x-huge", &vec![b'h'; 1 << 20])], page);
    let mut big = h2raw::opening();
    let mut chunks = huge.chunks(16_384).peekable();
    let mut first = true;
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let flags =
            if last { h2raw::END_HEADERS } else { 0 } | if first { h2raw::END_STREAM } else { 0 };
        let kind = if first {
            h2raw::HEADERS
        } else {
            h2raw::CONTINUATION
        };
        big.extend(h2raw::frame(kind, flags, 1, chunk));
        first = false;
    }
    list.push(("a 1 MiB header block", big));
    list
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_frame_abuse_forwards_nothing_and_keygate_stays_responsive_and_bounded() {
    let tmp = support::temp_dir("h2abuse");
    let state = Arc::new(keygate::dev::confluence_standin::StandinState::new(
        support::ADMIN_EMAIL,
        support::ADMIN_TOKEN,
    ));
    let standin = keygate::dev::confluence_standin::Standin::start_with(Arc::clone(&state))
        .await
        .unwrap();
    let (config, scanner, reader) = Setup::default().write(tmp.path(), &standin.base_url());
    let process = tokio::task::spawn_blocking(move || {
        support::process::Process::spawn(&config, std::process::Stdio::null(), &[])
    })
    .await
    .unwrap();
    let auth = reader.basic();
    let url = process.url(PAGE);
    let legit = || {
        let (url, auth) = (url.clone(), auth.clone());
        async move { get(&url, &[("Authorization", &auth)]).await }
    };
    assert_eq!(legit().await.status, 200);
    let rss_before = process.rss_kib();
    let mut rss_peak = rss_before;
    for (what, bytes) in attacks(&auth) {
        let mut tcp = TcpStream::connect(process.addr).await.unwrap();
        // The server may close mid-write: that is a refusal, not a failure.
        let _ = tcp.write_all(&bytes).await;
        // A stream error leaves the connection open; a connection error closes
        // it. Either way, a moment later keygate must answer others.
        let closed = closed_within(&mut tcp, Duration::from_millis(500)).await;
        rss_peak = rss_peak.max(process.rss_kib());
        let reply = legit().await;
        assert_eq!(reply.status, 200, "after {what}: {}", reply.text());
        eprintln!("{what}: connection closed: {}", closed.is_some());
    }
    // The bypass header never reached Confluence, and neither did the refused
    // paths or a restricted page for the reader.
    assert_never_forwarded(&state, "a smuggled bypass header", |r| {
        r.headers
            .keys()
            .any(|k| k.as_str().replace('_', "-") == "atl-confluence-with-admin-key")
    });
    assert_never_forwarded(&state, "a request for page 2001", |r| {
        r.path().ends_with("/2001")
    });
    assert_never_forwarded(&state, "a huge header", |r| {
        r.headers.contains_key("x-huge")
    });
    let _ = scanner;
    let rss_after = process.rss_kib();
    eprintln!("RSS: before {rss_before} KiB, peak {rss_peak} KiB, after {rss_after} KiB");
    assert!(
        rss_peak < rss_before + 64 * 1024,
        "memory grew by {} KiB",
        rss_peak - rss_before
    );
}

/// Polls `anonymous_kib` until it falls by more than `by` KiB below `from`
/// (at most 15 s); the reading that did, or fails saying `what` stayed.
async fn anonymous_falls(pid: u32, from: u64, by: u64, what: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let kib = anonymous_kib(pid);
        if kib + by < from {
            return kib;
        }
        assert!(
            Instant::now() < deadline,
            "{what} stays resident: {from} KiB, {kib} KiB 15 s later"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_burst_or_a_verification_used_goes_back_to_the_system_once_quiet() {
    // On one core keygate runs its single-threaded scheduler, whose memory all
    // goes back; with several worker threads, part of it stays with the workers'
    // heaps (README, Performance).
    let tmp = support::temp_dir("trim");
    let standin = keygate::dev::confluence_standin::Standin::start(
        support::ADMIN_EMAIL,
        support::ADMIN_TOKEN,
    )
    .await
    .unwrap();
    let (config, _scanner, reader) = Setup::default().write(tmp.path(), &standin.base_url());
    let process = tokio::task::spawn_blocking(move || {
        support::process::Process::spawn_on(Some(0), &config, std::process::Stdio::null(), &[])
    })
    .await
    .unwrap();
    // The child of `taskset`, which execs keygate: the same process.
    let pid = process.child.id();
    let auth = reader.basic();
    let url = process.url(PAGE);
    // A verification: its argon2 buffer (19 MiB) is released 2 s later.
    assert_eq!(get(&url, &[("Authorization", &auth)]).await.status, 200);
    let verified = anonymous_kib(pid);
    let quiet = anonymous_falls(pid, verified, 15 * 1024, "the argon2 buffer").await;
    // A burst: 256 keep-alive connections at once, 20 requests each.
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..256 {
        let (url, auth) = (url.clone(), auth.clone());
        burst.spawn(async move {
            let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .build_http::<http_body_util::Full<Bytes>>();
            for _ in 0..20 {
                let request = http::Request::get(url.as_str())
                    .header("Authorization", auth.as_str())
                    .body(http_body_util::Full::new(Bytes::new()))
                    .unwrap();
                let response = client.request(request).await.unwrap();
                assert_eq!(response.status(), 200);
                response.into_body().collect().await.unwrap();
            }
        });
    }
    while let Some(done) = burst.join_next().await {
        done.unwrap();
    }
    let after_burst = anonymous_kib(pid);
    assert!(
        after_burst > quiet + 4 * 1024,
        "the burst should have needed memory: {quiet} KiB before, {after_burst} KiB after"
    );
    // All its connections are closed; what they emptied goes back (part of
    // their memory stays with the allocator's per-thread pages, which only
    // that thread's own allocations collect).
    let settled = anonymous_falls(pid, after_burst, 2 * 1024, "what the burst emptied").await;
    eprintln!("anonymous KiB: verified {verified}, quiet {quiet}, after the burst {after_burst}, settled {settled}");
}

#[tokio::test]
async fn h2c_well_behaved_requests_still_work() {
    let h = Harness::start().await;
    let reply = get_h2c(&h.url(PAGE), &[("Authorization", &h.reader.basic())]).await;
    assert_eq!(reply.status, 200);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_trickled_byte_by_byte_on_a_keepalive_connection_is_cut() {
    let h = Harness::start_with(tight_limits()).await;
    let mut tcp = TcpStream::connect(h.addr).await.unwrap();
    let head = format!(
        "GET {PAGE} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
        h.reader.basic()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut first = [0u8; 12];
    tcp.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    // The next head, one byte every 200ms: never complete, never silent.
    let started = Instant::now();
    let trickle =
        b"GET /wiki HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed = false;
    for byte in trickle {
        if tcp.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if started.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    if !closed {
        closed = closed_within(&mut tcp, Duration::from_secs(3))
            .await
            .is_some();
    }
    assert!(
        closed,
        "a trickled head kept its connection for {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    h.stop().await;
}

#[tokio::test]
async fn requests_whose_first_bytes_come_in_pieces_are_served_in_either_protocol() {
    let h = Harness::start().await;
    let auth = h.reader.basic();
    // HTTP/1.1 whose first byte could begin the HTTP/2 preface, sent in pieces.
    let mut h1 = TcpStream::connect(h.addr).await.unwrap();
    let head = format!("POST {PAGE} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let (first, rest) = head.as_bytes().split_at(1);
    h1.write_all(first).await.unwrap();
    h1.flush().await.unwrap();
    tokio::task::yield_now().await;
    h1.write_all(rest).await.unwrap();
    let mut reply = Vec::new();
    h1.read_to_end(&mut reply).await.unwrap();
    let reply = String::from_utf8_lossy(&reply);
    // The dev routes allow GET only: a 403 from keygate, not a protocol error.
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");

    // An HTTP/2 preface in two pieces, then a GET on stream 1.
    let mut h2 = TcpStream::connect(h.addr).await.unwrap();
    let opening = h2raw::opening();
    h2.write_all(&opening[..10]).await.unwrap();
    h2.flush().await.unwrap();
    tokio::task::yield_now().await;
    h2.write_all(&opening[10..]).await.unwrap();
    let fields = h2raw::block(&[
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", PAGE.as_bytes()),
        (b":authority", b"x"),
        (b"authorization", auth.as_bytes()),
    ]);
    h2.write_all(&h2raw::frame(
        h2raw::HEADERS,
        h2raw::END_STREAM | h2raw::END_HEADERS,
        1,
        &fields,
    ))
    .await
    .unwrap();
    // Frames until the response HEADERS on stream 1 (its status is the first
    // field, `:status: 200` indexed as 0x88).
    let mut status = None;
    while status.is_none() {
        let mut head = [0u8; 9];
        h2.read_exact(&mut head).await.unwrap();
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        h2.read_exact(&mut payload).await.unwrap();
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if head[3] == h2raw::HEADERS && stream == 1 {
            status = payload.first().copied();
        }
    }
    assert_eq!(status, Some(0x88), "the response is a 200");
    drop(h2);
    h.stop().await;
}

#[tokio::test]
async fn a_beginning_of_the_http2_preface_then_silence_is_closed_at_the_header_timeout() {
    let h = Harness::start_with(tight_limits()).await;
    // Undecided between the protocols: it waits in the auto-detection, watched.
    let mut partial = TcpStream::connect(h.addr).await.unwrap();
    partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // Many at once, each a few bytes: none holds keygate's attention.
    let mut many = Vec::new();
    for i in 0..32 {
        let mut s = TcpStream::connect(h.addr).await.unwrap();
        s.write_all(if i % 2 == 0 { b"P" } else { b"G" })
            .await
            .unwrap();
        many.push(s);
    }
    assert!(
        closed_within(&mut partial, Duration::from_secs(5))
            .await
            .is_some(),
        "half a preface stayed open"
    );
    for s in &mut many {
        assert!(closed_within(s, Duration::from_secs(5)).await.is_some());
    }
    // And the listener still serves.
    let reply = get(&h.url(PAGE), &[("Authorization", &h.reader.basic())]).await;
    assert_eq!(reply.status, 200);
    h.stop().await;
}
