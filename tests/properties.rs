//! Property: for any generated request target, method, key and header set, keygate
//! either refuses the request (nothing reaches Confluence) or forwards it with the
//! bypass header exactly when the canonical path matches a bypass route and the key
//! holds its role — and the path forwarded is the canonical path.
//!
//! The expected outcome is computed by an oracle written here from SPEC §2 and §4,
//! independently of keygate's own canonicaliser and route table.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use proptest::prelude::*;
use support::{DemoKeyExt as _, Harness};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const CLEAN: &[&str] = &[
    "wiki", "api", "v2", "pages", "1001", "2001", "labels", "%70ages", "%77iki", "%41", "%7e",
    "x%20y", "children",
];
const TRICKY: &[&str] = &[
    "%2e%2e", "%2E", "..", ".", "", "%2F", "%2f", "a;b", "%zz", "%00", "%1f", "%7F", "\\", "%5C",
    "%25", "%2541",
];
const QUERIES: &[&str] = &["", "a=b", "x=%2F..%2F", "body-format=storage", "id=2001"];
const SMUGGLE: &[(&str, &str)] = &[
    ("Atl-Confluence-With-Admin-Key", "true"),
    ("atl_confluence_with_admin_key", "true"),
    ("ATL-CONFLUENCE-WITH-ADMIN-KEY", "TRUE"),
    ("Connection", "Atl-Confluence-With-Admin-Key"),
    ("X-Forwarded-For", "10.0.0.1"),
    ("Cookie", "session=abc"),
];

#[derive(Debug, Clone)]
struct Case {
    method: &'static str,
    segments: Vec<&'static str>,
    trailing_slash: bool,
    query: &'static str,
    key: Option<bool>, // Some(true) scanner, Some(false) reader
    second_authorization: bool,
    smuggle: Vec<usize>,
}

fn cases() -> impl Strategy<Value = Case> {
    let prefix = prop_oneof![
        Just(vec!["wiki", "api", "v2", "pages"]),
        Just(vec!["wiki"]),
        Just(vec![]),
    ];
    (
        prop_oneof![4 => Just("GET"), 1 => Just("HEAD"), 1 => Just("POST"), 1 => Just("DELETE")],
        prefix,
        proptest::collection::vec(
            prop_oneof![
                6 => proptest::sample::select(CLEAN),
                1 => proptest::sample::select(TRICKY),
            ],
            0..4,
        ),
        any::<bool>(),
        proptest::sample::select(QUERIES),
        prop_oneof![1 => Just(None), 3 => Just(Some(true)), 2 => Just(Some(false))],
        proptest::bool::weighted(0.05),
        proptest::collection::vec(0..SMUGGLE.len(), 0..3),
    )
        .prop_map(
            |(method, prefix, rest, trailing_slash, query, key, second_authorization, smuggle)| {
                let mut segments = prefix;
                segments.extend(rest);
                Case {
                    method,
                    segments,
                    trailing_slash,
                    query,
                    key,
                    second_authorization,
                    smuggle,
                }
            },
        )
}

impl Case {
    fn target(&self) -> String {
        let mut t = format!("/{}", self.segments.join("/"));
        if self.trailing_slash && !t.ends_with('/') {
            t.push('/');
        }
        if !self.query.is_empty() {
            t.push('?');
            t.push_str(self.query);
        }
        t
    }
}

/// The oracle's canonical path, or `None` if SPEC §4 refuses the target.
fn canonical(raw_path: &str) -> Option<String> {
    let body = raw_path.strip_prefix('/')?;
    let mut parts: Vec<&str> = body.split('/').collect();
    // One trailing slash is kept as such; anything else empty is refused.
    let trailing = parts.len() > 1 && parts.last() == Some(&"");
    if trailing {
        parts.pop();
    }
    let mut out = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() && !(i == 0 && parts.len() == 1) {
            return None;
        }
        let mut seg = String::new();
        let bytes = part.as_bytes();
        let mut j = 0;
        while j < bytes.len() {
            match bytes[j] {
                b'%' => {
                    let hex = part.get(j + 1..j + 3)?;
                    let v = u8::from_str_radix(hex, 16).ok()?;
                    if v < 0x20 || v == 0x7f || v == b'/' || v == b'\\' {
                        return None;
                    }
                    if v == b'%' {
                        // %25 followed by two hex digits is double encoding.
                        let next = part.get(j + 3..j + 5);
                        if next.is_some_and(|n| u8::from_str_radix(n, 16).is_ok()) {
                            return None;
                        }
                    }
                    let unreserved = v.is_ascii_alphanumeric() || b"-._~".contains(&v);
                    if unreserved {
                        seg.push(char::from(v));
                    } else {
                        seg.push_str(&format!("%{v:02X}"));
                    }
                    j += 3;
                }
                b';' | b'\\' | b' ' => return None,
                c if !(0x20..0x7f).contains(&c) => return None,
                c => {
                    seg.push(char::from(c));
                    j += 1;
                }
            }
        }
        if seg == "." || seg == ".." {
            return None;
        }
        out.push(seg);
    }
    let mut path = format!("/{}", out.join("/"));
    if trailing {
        path.push('/');
    }
    Some(path)
}

/// What keygate must do with a case.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Status(u16),
    Forwarded { bypass: bool, path: String },
}

fn expected(case: &Case) -> Outcome {
    let raw = case.target();
    let raw_path = raw.split('?').next().unwrap();
    let Some(path) = canonical(raw_path) else {
        return Outcome::Status(400);
    };
    // The extra Authorization is the reader's: two headers are refused; alone it
    // is the reader's key.
    let key = match (case.key, case.second_authorization) {
        (Some(_), true) => return Outcome::Status(400),
        (None, true) => Some(false),
        (key, false) => key,
    };
    let Some(scanner) = key else {
        return Outcome::Status(401);
    };
    let segs: Vec<&str> = path
        .trim_start_matches('/')
        .trim_end_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let pages = segs.len() >= 5 && segs[..4] == ["wiki", "api", "v2", "pages"];
    let get = case.method == "GET";
    if scanner && get && pages {
        return Outcome::Forwarded { bypass: true, path };
    }
    let wiki = segs.first() == Some(&"wiki");
    if wiki && (get || case.method == "HEAD") {
        return Outcome::Forwarded {
            bypass: false,
            path,
        };
    }
    Outcome::Status(403)
}

async fn send(addr: std::net::SocketAddr, head: String) -> u16 {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    let _ = tcp.read_to_end(&mut reply).await;
    String::from_utf8_lossy(&reply)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn requests_are_refused_or_forwarded_with_the_bypass_exactly_when_allowed() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let h = runtime.block_on(Harness::start());
    let (scanner, reader) = (h.scanner.basic(), h.reader.basic());
    let counter = std::sync::atomic::AtomicU64::new(0);
    let kinds = std::sync::Mutex::new(std::collections::BTreeMap::<String, u32>::new());
    let config = ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(case in cases())| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("prop-{n}");
        let mut head = format!("{} {} HTTP/1.1\r\nHost: keygate\r\nX-Request-Id: {id}\r\n", case.method, case.target());
        match case.key {
            Some(true) => head.push_str(&format!("Authorization: {scanner}\r\n")),
            Some(false) => head.push_str(&format!("Authorization: {reader}\r\n")),
            None => {}
        }
        if case.second_authorization {
            head.push_str(&format!("Authorization: {reader}\r\n"));
        }
        for i in &case.smuggle {
            let (k, v) = SMUGGLE[*i];
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("Connection: close\r\n\r\n");
        let status = runtime.block_on(send(h.addr, head));
        let seen: Vec<_> = h
            .forwarded()
            .into_iter()
            .filter(|r| r.header_values("x-request-id") == [id.clone()])
            .collect();
        let outcome = match (seen.len(), status) {
            (0, s) => Outcome::Status(s),
            (1, _) => {
                let r = &seen[0];
                let bypass: Vec<_> = r
                    .headers
                    .keys()
                    .filter(|k| k.as_str().replace('_', "-") == "atl-confluence-with-admin-key")
                    .collect();
                prop_assert!(bypass.len() <= 1, "{case:?}: {bypass:?}");
                prop_assert!(r.header_values("cookie").is_empty());
                prop_assert_eq!(r.header_values("x-forwarded-for"), vec!["127.0.0.1".to_owned()]);
                prop_assert_eq!(r.header_values("authorization"), vec![support::admin_basic()]);
                if !case.query.is_empty() {
                    prop_assert_eq!(r.target.split_once('?').map(|(_, q)| q), Some(case.query));
                }
                Outcome::Forwarded {
                    bypass: bypass.len() == 1,
                    path: r.path().to_owned(),
                }
            }
            (n, _) => panic!("{case:?} forwarded {n} times"),
        };
        let kind = match &outcome {
            Outcome::Status(s) => s.to_string(),
            Outcome::Forwarded { bypass, .. } => format!("forwarded bypass={bypass}"),
        };
        *kinds.lock().unwrap().entry(kind).or_default() += 1;
        prop_assert_eq!(outcome, expected(&case), "{:?} {}", case, case.target());
    });
    // Not vacuous: every kind of outcome happened.
    let kinds = kinds.into_inner().unwrap();
    eprintln!("outcomes: {kinds:?}");
    for kind in [
        "400",
        "401",
        "403",
        "forwarded bypass=true",
        "forwarded bypass=false",
    ] {
        assert!(
            kinds.get(kind).is_some_and(|n| *n > 3),
            "too few `{kind}`: {kinds:?}"
        );
    }
    runtime.block_on(h.stop());
}
