//! Header hygiene, as pure functions over `HeaderMap`s.
//!
//! Names are compared case-insensitively and with `_` taken as `-`, because some
//! servers treat `Atl_Confluence_With_Admin_Key` as the bypass header. Hop-by-hop
//! headers, including every header a client names in `Connection`, are removed
//! *before* keygate adds its own, so `Connection: Authorization` cannot remove what
//! keygate adds.
//!
//! Invariants: nothing a client sends can add, remove or alter the bypass header or
//! the admin credential upstream; `Set-Cookie` never reaches a client.

use std::net::SocketAddr;

use http::header::{HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, HOST, SET_COOKIE};
use http::HeaderMap;

/// The header that makes Confluence honour the admin key.
pub static BYPASS_HEADER: HeaderName = HeaderName::from_static("atl-confluence-with-admin-key");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Hop-by-hop headers (RFC 9110 §7.6.1 and the ones older software still sends).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Request headers a client may never pass through, besides hop-by-hop ones.
/// `expect` goes too: keygate answers `100-continue` itself.
const CLIENT_CREDENTIALS: &[&str] = &[
    "authorization",
    "atl-confluence-with-admin-key",
    "cookie",
    "forwarded",
    "host",
    "x-request-id",
    "expect",
];

/// A header name lower-cased with `_` taken as `-`.
fn normalise(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'_' => '-',
            b => char::from(b.to_ascii_lowercase()),
        })
        .collect()
}

/// The normalised names listed in every `Connection` header.
fn connection_named(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| normalise(n.trim()))
        .filter(|n| !n.is_empty())
        .collect()
}

fn remove_where(headers: &mut HeaderMap, drop: impl Fn(&str) -> bool) {
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| drop(&normalise(name.as_str())))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(&name);
    }
}

/// How many `Authorization` headers the client sent (more than one is refused).
pub fn authorization_count(headers: &HeaderMap) -> usize {
    headers.get_all(AUTHORIZATION).iter().count()
}

/// Removes from a client's request every header that must not reach Confluence.
pub fn strip_request(headers: &mut HeaderMap) {
    let named = connection_named(headers);
    remove_where(headers, |n| {
        HOP_BY_HOP.contains(&n)
            || CLIENT_CREDENTIALS.contains(&n)
            || n.starts_with("x-forwarded-")
            || named.iter().any(|c| c == n)
    });
}

/// Removes from Confluence's response what must not reach a client.
pub fn strip_response(headers: &mut HeaderMap) {
    let named = connection_named(headers);
    remove_where(headers, |n| {
        HOP_BY_HOP.contains(&n) || n == SET_COOKIE.as_str() || named.iter().any(|c| c == n)
    });
}

/// What keygate adds to every forwarded request.
pub struct UpstreamHeaders<'a> {
    pub authorization: &'a HeaderValue,
    pub host: &'a HeaderValue,
    pub bypass: bool,
    pub request_id: &'a HeaderValue,
    pub peer: SocketAddr,
    pub proto: &'static str,
}

/// Adds keygate's own headers; call after `strip_request`.
pub fn add_upstream(headers: &mut HeaderMap, add: &UpstreamHeaders<'_>) {
    headers.insert(AUTHORIZATION, add.authorization.clone());
    headers.insert(HOST, add.host.clone());
    if add.bypass {
        headers.insert(BYPASS_HEADER.clone(), HeaderValue::from_static("true"));
    }
    headers.insert(X_REQUEST_ID.clone(), add.request_id.clone());
    let forwarded = format!("for=\"{}\";proto={}", add.peer, add.proto);
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        headers.insert(FORWARDED.clone(), v);
    }
    if let Ok(v) = HeaderValue::from_str(&add.peer.ip().to_string()) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(add.proto),
    );
}

/// The client's `X-Request-Id` when it is safe to reuse: `[A-Za-z0-9._:-]{1,128}`.
pub fn client_request_id(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut values = headers.get_all(&X_REQUEST_ID).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let bytes = value.as_bytes();
    let ok = (1..=128).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    ok.then(|| value.clone())
}

/// A new request id: a UUIDv7, so ids sort by time. Its random bits come from the
/// thread's CSPRNG (seeded once from the OS) rather than a syscall per request.
pub fn new_request_id() -> HeaderValue {
    use rand::Rng as _;
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let random: [u8; 10] = rand::thread_rng().gen();
    let id = uuid::Builder::from_unix_timestamp_millis(millis, &random)
        .into_uuid()
        .hyphenated()
        .to_string();
    HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<String> {
        let mut n: Vec<String> = h.keys().map(|k| k.to_string()).collect();
        n.sort();
        n
    }

    type Pairs<'a> = &'a [(&'a str, &'a str)];

    #[test]
    fn request_stripping_table() {
        let cases: &[(Pairs, &[&str])] = &[
            (
                &[("Authorization", "Basic x"), ("Accept", "*/*")],
                &["accept"],
            ),
            (&[("Atl-Confluence-With-Admin-Key", "true")], &[]),
            (&[("atl_confluence_with_admin_key", "true")], &[]),
            (&[("ATL_CONFLUENCE-WITH_ADMIN-KEY", "yes")], &[]),
            (&[("Cookie", "a=b"), ("Proxy-Authorization", "x")], &[]),
            (
                &[("Forwarded", "for=1.2.3.4"), ("X-Forwarded-For", "1.2.3.4")],
                &[],
            ),
            (
                &[("X-Forwarded-Host", "evil"), ("x_forwarded_proto", "https")],
                &[],
            ),
            (
                &[
                    ("Connection", "keep-alive, X-Custom"),
                    ("X-Custom", "1"),
                    ("X-Other", "2"),
                ],
                &["x-other"],
            ),
            (&[("Connection", "x_custom"), ("X-Custom", "1")], &[]),
            (
                &[
                    ("Keep-Alive", "5"),
                    ("TE", "trailers"),
                    ("Trailer", "x"),
                    ("Upgrade", "h2c"),
                ],
                &[],
            ),
            (
                &[("Transfer-Encoding", "chunked"), ("Content-Length", "5")],
                &["content-length"],
            ),
            (
                &[
                    ("Host", "keygate"),
                    ("X-Request-Id", "abc"),
                    ("Expect", "100-continue"),
                ],
                &[],
            ),
            (
                &[("Content-Type", "application/json"), ("User-Agent", "t")],
                &["content-type", "user-agent"],
            ),
        ];
        for (input, kept) in cases {
            let mut h = map(input);
            strip_request(&mut h);
            assert_eq!(names(&h), *kept, "{input:?}");
        }
    }

    #[test]
    fn connection_cannot_remove_what_keygate_adds() {
        let mut h = map(&[(
            "Connection",
            "Authorization, Atl-Confluence-With-Admin-Key, X-Request-Id, Host, Forwarded",
        )]);
        strip_request(&mut h);
        let auth = HeaderValue::from_static("Basic YWRtaW46dG9rZW4=");
        let host = HeaderValue::from_static("site.example");
        let rid = HeaderValue::from_static("rid-1");
        add_upstream(
            &mut h,
            &UpstreamHeaders {
                authorization: &auth,
                host: &host,
                bypass: true,
                request_id: &rid,
                peer: "[2001:db8::1]:4711".parse().unwrap(),
                proto: "https",
            },
        );
        assert_eq!(h.get_all(AUTHORIZATION).iter().count(), 1);
        assert_eq!(h[&BYPASS_HEADER], "true");
        assert_eq!(h[&X_REQUEST_ID], "rid-1");
        assert_eq!(h[HOST], "site.example");
        assert_eq!(h[&FORWARDED], "for=\"[2001:db8::1]:4711\";proto=https");
        assert_eq!(h[&X_FORWARDED_FOR], "2001:db8::1");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
    }

    #[test]
    fn response_stripping_removes_cookies_and_hop_by_hop() {
        let mut h = map(&[
            ("Set-Cookie", "a=b"),
            ("set-cookie", "c=d"),
            ("Connection", "close, X-Internal"),
            ("X-Internal", "1"),
            ("Content-Type", "application/json"),
        ]);
        strip_response(&mut h);
        assert_eq!(names(&h), ["content-type"]);
    }

    #[test]
    fn client_request_ids() {
        let cases: &[(Pairs, bool)] = &[
            (&[("X-Request-Id", "abc-123._:Z")], true),
            (&[("X-Request-Id", "has space")], false),
            (&[("X-Request-Id", "")], false),
            (&[("X-Request-Id", "a"), ("X-Request-Id", "b")], false),
            (&[("X-Request-Id", &"x".repeat(128))], true),
            (&[("X-Request-Id", &"x".repeat(129))], false),
            (&[("X-Request-Id", "\"quoted\"")], false),
            (&[], false),
        ];
        for (input, reused) in cases {
            assert_eq!(
                client_request_id(&map(input)).is_some(),
                *reused,
                "{input:?}"
            );
        }
        assert_eq!(new_request_id().len(), 36);
    }
}
