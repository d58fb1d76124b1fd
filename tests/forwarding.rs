//! End to end: keygate on 127.0.0.1:0 in front of the Confluence stand-in, real
//! HTTP, assertions on what the stand-in received and what the client got.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use bytes::Bytes;
use support::client::{get, get_h2c, raw, send};
use support::{admin_basic, DemoKeyExt as _, Harness};

const PAGE: &str = "/wiki/api/v2/pages/1001";

#[tokio::test]
async fn bypass_route_request_reaches_confluence_with_exactly_one_bypass_header() {
    let h = Harness::start().await;
    let auth = h.scanner.basic();
    let reply = get(
        &h.url(PAGE),
        &[
            ("Authorization", &auth),
            ("Atl-Confluence-With-Admin-Key", "false"),
            ("atl_confluence_with_admin_key", "nope"),
        ],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = h.forwarded();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header_values("atl-confluence-with-admin-key"),
        ["true"]
    );
    assert_eq!(
        seen[0]
            .headers
            .keys()
            .filter(|k| k.as_str().replace('_', "-") == "atl-confluence-with-admin-key")
            .count(),
        1
    );
    h.stop().await;
}

#[tokio::test]
async fn bypass_header_from_client_never_reaches_upstream_on_passthrough_routes() {
    let h = Harness::start().await;
    let auth = h.reader.basic();
    let spellings: &[&[(&str, &str)]] = &[
        &[("Atl-Confluence-With-Admin-Key", "true")],
        &[("atl-confluence-with-admin-key", "TRUE")],
        &[("ATL-CONFLUENCE-WITH-ADMIN-KEY", "1")],
        &[("Atl_Confluence_With_Admin_Key", "true")],
        &[("atl_confluence-with_admin-key", "true")],
        &[
            ("Atl-Confluence-With-Admin-Key", "true"),
            ("Atl-Confluence-With-Admin-Key", "true"),
        ],
        &[("Atl-Confluence-With-Admin-Key", "true, true")],
        &[
            ("Connection", "Atl-Confluence-With-Admin-Key"),
            ("Atl-Confluence-With-Admin-Key", "true"),
        ],
    ];
    for headers in spellings {
        let mut all: Vec<(&str, &str)> = vec![("Authorization", &auth)];
        all.extend_from_slice(headers);
        let reply = get(&h.url(PAGE), &all).await;
        assert_eq!(reply.status, 200, "{headers:?}: {}", reply.text());
    }
    let seen = h.forwarded();
    assert_eq!(seen.len(), spellings.len());
    for r in seen {
        let smuggled: Vec<_> = r
            .headers
            .keys()
            .filter(|k| k.as_str().replace('_', "-").contains("admin-key"))
            .collect();
        assert!(
            smuggled.is_empty(),
            "bypass header reached upstream: {smuggled:?}"
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn connection_header_cannot_remove_what_keygate_adds() {
    let h = Harness::start().await;
    let scanner = h.scanner.basic();
    let reply = get(
        &h.url(PAGE),
        &[
            ("Authorization", &scanner),
            ("Connection", "Authorization, Atl-Confluence-With-Admin-Key, X-Request-Id, Forwarded, X-Forwarded-For, Host"),
        ],
    )
    .await;
    assert_eq!(reply.status, 200);
    let r = &h.forwarded()[0];
    assert_eq!(r.header_values("authorization"), [admin_basic()]);
    assert_eq!(r.header_values("atl-confluence-with-admin-key"), ["true"]);
    assert_eq!(r.header_values("x-request-id").len(), 1);
    assert_eq!(r.header_values("forwarded").len(), 1);
    assert_eq!(r.header_values("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(r.header_values("host"), [h.standin.addr.to_string()]);
    h.stop().await;
}

#[tokio::test]
async fn client_credentials_and_cookies_never_reach_confluence_and_admin_credential_always_does() {
    let h = Harness::start().await;
    let reader = h.reader.basic();
    let bearer = h.reader.bearer();
    for auth in [&reader, &bearer] {
        let reply = get(
            &h.url(PAGE),
            &[
                ("Authorization", auth),
                ("Cookie", "JSESSIONID=client-session"),
                ("Proxy-Authorization", "Basic cHJveHk6cHJveHk="),
                ("X-Forwarded-For", "10.9.9.9"),
                ("X-Forwarded-Host", "evil.example"),
                ("Forwarded", "for=10.9.9.9"),
            ],
        )
        .await;
        assert_eq!(reply.status, 200);
    }
    for r in h.forwarded() {
        assert_eq!(r.header_values("authorization"), [admin_basic()]);
        assert!(r.header_values("cookie").is_empty());
        assert!(r.header_values("proxy-authorization").is_empty());
        assert!(r.header_values("x-forwarded-host").is_empty());
        assert_eq!(r.header_values("x-forwarded-for"), ["127.0.0.1"]);
        let forwarded = r.header_values("forwarded");
        assert_eq!(forwarded.len(), 1);
        assert!(
            forwarded[0].starts_with("for=\"127.0.0.1:"),
            "{forwarded:?}"
        );
        assert_eq!(r.header_values("x-forwarded-proto"), ["http"]);
        let dump = format!("{:?}", r.headers);
        assert!(
            !dump.contains(&h.reader.secret),
            "client secret leaked upstream"
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn set_cookie_never_reaches_the_client() {
    let h = Harness::start().await;
    let auth = h.reader.basic();
    let reply = get(&h.url(PAGE), &[("Authorization", &auth)]).await;
    assert_eq!(reply.status, 200);
    assert!(reply.headers.get_all("set-cookie").iter().next().is_none());
    // The stand-in did set cookies: the check above is not vacuous.
    let direct = get(
        &format!("{}{PAGE}", h.standin.base_url()),
        &[("Authorization", &admin_basic())],
    )
    .await;
    assert!(direct.headers.get("set-cookie").is_some());
    h.stop().await;
}

#[tokio::test]
async fn unmatched_route_gets_403_and_never_reaches_confluence() {
    let h = Harness::start().await;
    let scanner = h.scanner.basic();
    let reader = h.reader.basic();
    let cases: &[(&str, &str, &str)] = &[
        ("DELETE", PAGE, &scanner),
        ("POST", "/wiki/api/v2/pages", &reader),
        ("GET", "/rest/api/user", &reader),
        ("GET", "/", &reader),
        ("PUT", "/wiki/api/v2/pages/1001", &scanner),
    ];
    for (method, path, auth) in cases {
        let reply = send(
            method,
            &h.url(path),
            &[("Authorization", auth)],
            Bytes::new(),
        )
        .await;
        assert_eq!(reply.status, 403, "{method} {path}");
        let body = reply.json();
        assert_eq!(body["error"], "forbidden");
        assert_eq!(
            body["request_id"],
            reply.headers["x-request-id"].to_str().unwrap()
        );
    }
    assert!(
        h.requests().is_empty(),
        "a denied request reached the stand-in"
    );
    h.stop().await;
}

#[tokio::test]
async fn refused_paths_get_400_and_never_reach_confluence() {
    let h = Harness::start().await;
    let auth = h.reader.basic();
    let targets = [
        "/wiki/api/v2/pages/../../admin",
        "/wiki/api/v2/pages/%2e%2e/x",
        "/wiki/api/v2/pages/%2E%2e/x",
        "/wiki/api/v2/pages/..;/x",
        "/wiki/api/v2/pages/42;jsessionid=x",
        "/wiki/api/v2/pages/a%2Fb",
        "/wiki/api/v2/pages/a%5cb",
        "/wiki/api/v2/pages/a\\b",
        "/wiki//api/v2/pages/1",
        "/wiki/api/v2/pages/%00",
        "/wiki/api/v2/pages/%252e%252e",
        "/wiki/api/v2/pages/%zz",
        "http://evil.example/wiki/api/v2/pages/1",
        "*",
    ];
    for target in targets {
        let (status, text) = raw(
            h.addr,
            &format!("GET {target} HTTP/1.1\r\nHost: keygate\r\nAuthorization: {auth}"),
        )
        .await;
        assert_eq!(status, 400, "{target}: {text}");
        if text.contains("application/json") {
            assert!(text.contains("\"invalid_path\""), "{target}: {text}");
        }
    }
    assert!(
        h.requests().is_empty(),
        "a refused path reached the stand-in"
    );
    h.stop().await;
}

#[tokio::test]
async fn checks_run_in_order_400_then_401_then_403() {
    let h = Harness::start().await;
    let (status, _) = raw(h.addr, "GET /wiki/../x HTTP/1.1\r\nHost: k").await;
    assert_eq!(status, 400, "a bad path is refused before authentication");
    let (status, text) = raw(h.addr, "DELETE /nowhere HTTP/1.1\r\nHost: k").await;
    assert_eq!(status, 401, "authentication comes before the allow-list");
    assert!(
        text.to_ascii_lowercase()
            .contains("www-authenticate: basic realm=\"keygate\""),
        "{text}"
    );
    let wrong = support::basic(&h.reader.client_id, "Wrong-Secret-123");
    let reply = get(&h.url(PAGE), &[("Authorization", &wrong)]).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.json()["error"], "unauthorized");
    assert!(h.requests().is_empty());
    h.stop().await;
}

#[tokio::test]
async fn two_authorization_headers_are_refused() {
    let h = Harness::start().await;
    let auth = h.reader.basic();
    let (status, text) = raw(
        h.addr,
        &format!(
            "GET {PAGE} HTTP/1.1\r\nHost: k\r\nAuthorization: {auth}\r\nAuthorization: {}",
            admin_basic()
        ),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("duplicate_authorization"));
    assert!(h.requests().is_empty());
    h.stop().await;
}

#[tokio::test]
async fn the_path_matched_is_the_path_forwarded_and_the_query_is_untouched() {
    let h = Harness::start().await;
    let auth = h.reader.basic();
    let reply = get(
        &h.url("/wiki/api/v2/%70ages/%31001?body-format=storage&q=%2e%2e%2F"),
        &[("Authorization", &auth)],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = &h.forwarded()[0];
    assert_eq!(
        seen.target,
        "/wiki/api/v2/pages/1001?body-format=storage&q=%2e%2e%2F"
    );
    h.stop().await;
}

#[tokio::test]
async fn request_ids_are_kept_when_well_formed_and_replaced_otherwise() {
    let h = Harness::start().await;
    let auth = h.reader.basic();
    let reply = get(
        &h.url(PAGE),
        &[("Authorization", &auth), ("X-Request-Id", "trace-42.a:b_c")],
    )
    .await;
    assert_eq!(reply.headers["x-request-id"], "trace-42.a:b_c");
    let reply2 = get(
        &h.url(PAGE),
        &[("Authorization", &auth), ("X-Request-Id", "bad id!")],
    )
    .await;
    let new_id = reply2.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(new_id.len(), 36);
    assert_eq!(&new_id[14..15], "7", "UUIDv7");
    let seen = h.forwarded();
    assert_eq!(seen[0].header_values("x-request-id"), ["trace-42.a:b_c"]);
    assert_eq!(seen[1].header_values("x-request-id"), [new_id]);
    h.stop().await;
}

#[tokio::test]
async fn five_mib_upload_and_download_stream_through() {
    let h = Harness::start_with(support::Setup {
        routes: "routes:\n  - name: attachments\n    methods: [GET, POST]\n    path: /wiki/**\n    roles: [\"*\"]\n".into(),
        ..Default::default()
    })
    .await;
    let auth = h.reader.basic();
    let size = 5 * 1024 * 1024;
    let upload: Vec<u8> = (0..size).map(|i| (i * 7 % 256) as u8).collect();
    let digest = keygate::audit::chain::sha256_hex(&upload);
    let reply = send(
        "POST",
        &h.url("/wiki/rest/api/content/1001/child/attachment"),
        &[("Authorization", &auth), ("X-Atlassian-Token", "no-check")],
        Bytes::from(upload),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["size"], size);
    assert_eq!(reply.json()["sha256"], digest);

    let reply = get(
        &h.url(&format!(
            "/wiki/download/attachments/1001/big.bin?size={size}"
        )),
        &[("Authorization", &auth)],
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), size as usize);
    assert!(reply
        .body
        .iter()
        .enumerate()
        .all(|(i, b)| *b == keygate::dev::confluence_standin::pattern_byte(i as u64)));
    h.stop().await;
}

#[tokio::test]
async fn h2c_with_prior_knowledge_is_served() {
    let h = Harness::start().await;
    let auth = h.reader.basic();
    let reply = get_h2c(
        &h.url(PAGE),
        &[
            ("Authorization", &auth),
            ("Atl-Confluence-With-Admin-Key", "true"),
        ],
    )
    .await;
    assert_eq!(reply.status, 200);
    let seen = &h.forwarded()[0];
    assert!(seen
        .header_values("atl-confluence-with-admin-key")
        .is_empty());
    assert_eq!(seen.header_values("authorization"), [admin_basic()]);
    h.stop().await;
}

#[tokio::test]
async fn redirects_are_passed_back_not_followed() {
    let h = Harness::start().await;
    let auth = h.reader.basic();
    let reply = get(&h.url("/wiki/redirect"), &[("Authorization", &auth)]).await;
    assert_eq!(reply.status, 302);
    assert_eq!(reply.headers["location"], "/wiki/api/v2/spaces");
    assert_eq!(h.forwarded().len(), 1);
    h.stop().await;
}

#[tokio::test]
async fn unreachable_confluence_gives_502_and_slow_confluence_gives_504() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let h = Harness::start_with(support::Setup {
        base_url: Some(format!("http://127.0.0.1:{port}")),
        ..Default::default()
    })
    .await;
    let auth = h.reader.basic();
    let reply = get(&h.url(PAGE), &[("Authorization", &auth)]).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.json()["error"], "upstream_unreachable");
    assert!(
        !reply.text().contains("refused"),
        "internal error text leaked: {}",
        reply.text()
    );
    h.stop().await;

    let h = Harness::start_with(support::Setup {
        confluence_extra: "  request_timeout: 200ms\n".into(),
        ..Default::default()
    })
    .await;
    let auth = h.reader.basic();
    let reply = get(&h.url("/wiki/slow?ms=5000"), &[("Authorization", &auth)]).await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.json()["error"], "upstream_timeout");
    h.stop().await;
}

#[tokio::test]
async fn upstream_connections_are_reused_and_an_abandoned_body_takes_its_connection_along() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let h = Harness::start_with(support::Setup {
        routes: "routes:\n  - name: all\n    methods: [GET, HEAD]\n    path: /wiki/**\n    roles: [\"*\"]\n".into(),
        ..Default::default()
    })
    .await;
    let auth = h.reader.basic();
    let page = || async {
        let reply = get(&h.url(PAGE), &[("Authorization", &auth)]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["id"], "1001");
    };
    // One exchange at a time: every request, with a body or without (HEAD),
    // goes over the one keep-alive connection.
    for _ in 0..10 {
        page().await;
        let head = send(
            "HEAD",
            &h.url(PAGE),
            &[("Authorization", &auth)],
            Bytes::new(),
        )
        .await;
        assert_eq!(head.status, 200);
    }
    assert_eq!(h.standin.state.connections(), 1);

    // A client that hangs up in the middle of a large download: its upstream
    // connection still has the rest of the body on it and must not be reused.
    let mut tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let head = format!(
        "GET /wiki/download/attachments/1001/big.bin?size=8388608 HTTP/1.1\r\nHost: keygate\r\nAuthorization: {auth}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut read = 0;
    while read < 64 * 1024 {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "the download ended early");
        read += n;
    }
    drop(tcp);
    for _ in 0..10 {
        page().await;
    }
    assert_eq!(
        h.standin.state.connections(),
        2,
        "one new connection after the abandoned download, then reuse"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_silently_closes_kept_alive_connections_loses_and_repeats_nothing() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt as _;
    // An upstream that answers as if keeping the connection alive, then closes
    // it: every pooled connection is dead by its next use, the race every
    // keep-alive client meets.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&served);
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let counter = std::sync::Arc::clone(&counter);
            tokio::spawn(async move {
                if read_head(&mut tcp).await.is_none() {
                    return;
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let body = r#"{"id":"1001"}"#;
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(reply.as_bytes()).await;
            });
        }
    });
    let h = Harness::start_with(support::Setup {
        base_url: Some(format!("http://127.0.0.1:{port}")),
        ..Default::default()
    })
    .await;
    let auth = h.reader.basic();
    let url = h.url(PAGE);
    let statuses = support::load::concurrently(8, |_| {
        let (url, auth) = (url.clone(), auth.clone());
        async move {
            let mut statuses = Vec::new();
            for _ in 0..25 {
                let reply = get(&url, &[("Authorization", &auth)]).await;
                statuses.push((reply.status, reply.text()));
            }
            statuses
        }
    })
    .await;
    for (status, text) in statuses.into_iter().flatten() {
        assert_eq!(status, 200, "{text}");
        assert_eq!(text, r#"{"id":"1001"}"#);
    }
    // A request is sent again only when it never reached the upstream.
    assert_eq!(served.load(Ordering::SeqCst), 200);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_body_here_with_its_head_keeps_a_length_and_one_still_coming_streams() {
    use http_body_util::BodyExt as _;
    use tokio::io::AsyncWriteExt as _;
    // An upstream whose JSON names its own origin. `/now` answers head and body
    // in one write; `/later` sends the head and holds the body until told.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let origin = format!("http://127.0.0.1:{port}");
    let body = format!(
        r#"{{"_links":{{"base":"{origin}/wiki"}},"pad":"{}"}}"#,
        "x".repeat(100)
    );
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let release = std::sync::Arc::new(tokio::sync::Mutex::new(Some(release_rx)));
    let upstream_body = body.clone();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let (body, release) = (upstream_body.clone(), std::sync::Arc::clone(&release));
            tokio::spawn(async move {
                while let Some(head) = read_head(&mut tcp).await {
                    let reply_head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    );
                    if head.starts_with(b"GET /wiki/later") {
                        tcp.write_all(reply_head.as_bytes()).await.unwrap();
                        let wait = release.lock().await.take().unwrap();
                        wait.await.unwrap();
                        tcp.write_all(body.as_bytes()).await.unwrap();
                    } else {
                        tcp.write_all(format!("{reply_head}{body}").as_bytes())
                            .await
                            .unwrap();
                    }
                }
            });
        }
    });
    let h = Harness::start_with(support::Setup {
        base_url: Some(origin.clone()),
        routes:
            "routes:\n  - name: all\n    methods: [GET]\n    path: /wiki/**\n    roles: [reader]\n"
                .into(),
        listen_extra: "  public_url: https://keygate.example.com\n".into(),
        ..Default::default()
    })
    .await;
    let auth = h.reader.basic();
    let rewritten = body.replace(&origin, "https://keygate.example.com");
    assert_ne!(
        rewritten.len(),
        body.len(),
        "the rewrite changes the length"
    );

    // All there with its head: rewritten at once, with the new length.
    let reply = get(&h.url("/wiki/now"), &[("Authorization", &auth)]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), rewritten);
    assert_eq!(reply.headers["content-length"], rewritten.len().to_string());
    assert!(reply.headers.get("transfer-encoding").is_none());

    // Still coming: the head is not held for it; the body streams, rewritten.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<Bytes>>();
    let request = http::Request::get(h.url("/wiki/later"))
        .header("Authorization", &auth)
        .body(http_body_util::Empty::new())
        .unwrap();
    let response =
        tokio::time::timeout(std::time::Duration::from_secs(10), client.request(request))
            .await
            .expect("the head waited for the body")
            .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("content-length").is_none());
    assert_eq!(response.headers()["transfer-encoding"], "chunked");
    release_tx.send(()).unwrap();
    let text = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&text), rewritten);
    h.stop().await;
}

/// Reads one request head off a raw upstream connection (None: it closed).
async fn read_head(tcp: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt as _;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}
