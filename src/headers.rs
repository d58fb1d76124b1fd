//! Header hygiene, as pure functions over `HeaderMap`s.
//!
//! Names are compared case-insensitively and with `_` taken as `-`, because some
//! servers treat `Atl_Confluence_With_Admin_Key` as the bypass header. Hop-by-hop
//! headers, including every header a client names in `Connection`, are removed
//! *before* keygate adds its own, so `Connection: Authorization` cannot remove what
//! keygate adds. Trailers follow the same rules: client trailers are never
//! forwarded, response trailers are cleaned like response headers.
//!
//! Invariants: nothing a client sends can add, remove or alter the bypass header or
//! the admin credential upstream; `Set-Cookie` never reaches a client. No name is
//! copied or lower-cased into a new string: names are compared byte by byte.

use std::net::SocketAddr;

use http::header::{HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, HOST};
use http::HeaderMap;

/// The header that makes Confluence honour the admin key.
pub static BYPASS_HEADER: HeaderName = HeaderName::from_static("atl-confluence-with-admin-key");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Hop-by-hop headers (RFC 9110 §7.6.1 and the ones older software still sends).
const HOP_BY_HOP: &[&[u8]] = &[
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"proxy-authenticate",
    b"proxy-authorization",
];

/// Request headers a client may never pass through, besides hop-by-hop ones.
/// `expect` goes too: keygate answers `100-continue` itself.
const CLIENT_CREDENTIALS: &[&[u8]] = &[
    b"authorization",
    b"atl-confluence-with-admin-key",
    b"cookie",
    b"forwarded",
    b"host",
    b"x-request-id",
    b"expect",
];

/// Response headers a client never gets: the admin's session.
const RESPONSE_SECRETS: &[&[u8]] = &[b"set-cookie", b"set-cookie2"];

/// `a` equals the lower-case `b` with `_` taken as `-`, ignoring ASCII case.
fn same_name(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            let x = if *x == b'_' {
                b'-'
            } else {
                x.to_ascii_lowercase()
            };
            x == *y
        })
}

fn starts_with_name(a: &[u8], prefix: &[u8]) -> bool {
    a.len() > prefix.len() && same_name(&a[..prefix.len()], prefix)
}

/// Whether `name` is listed in one of the `Connection` headers.
fn connection_names(headers: &HeaderMap, name: &[u8]) -> bool {
    headers.get_all(CONNECTION).iter().any(|value| {
        value
            .as_bytes()
            .split(|b| *b == b',')
            .map(|t| t.trim_ascii())
            .any(|token| {
                token.len() == name.len()
                    && token.iter().zip(name).all(|(t, n)| {
                        let t = if *t == b'_' {
                            b'-'
                        } else {
                            t.to_ascii_lowercase()
                        };
                        let n = if *n == b'_' {
                            b'-'
                        } else {
                            n.to_ascii_lowercase()
                        };
                        t == n
                    })
            })
    })
}

/// Whether a `Connection` header names anything besides `close` and the
/// hop-by-hop headers removed anyway (almost never: then no per-header check).
fn names_more_than_hop_by_hop(headers: &HeaderMap) -> bool {
    headers.get_all(CONNECTION).iter().any(|value| {
        value
            .as_bytes()
            .split(|b| *b == b',')
            .map(|t| t.trim_ascii())
            .any(|t| !t.is_empty() && !same_name(t, b"close") && !is_hop_by_hop(t))
    })
}

/// Removes every header for which `drop(name, headers)` holds.
fn remove_where(headers: &mut HeaderMap, drop: impl Fn(&[u8], &HeaderMap) -> bool) {
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        if drop(name.as_str().as_bytes(), headers) {
            doomed.push(name.clone());
        }
    }
    for name in doomed {
        headers.remove(name);
    }
}

fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP.iter().any(|h| same_name(name, h))
}

/// How many `Authorization` headers the client sent (more than one is refused).
pub fn authorization_count(headers: &HeaderMap) -> usize {
    headers.get_all(AUTHORIZATION).iter().count()
}

/// Removes from a client's request every header that must not reach Confluence.
pub fn strip_request(headers: &mut HeaderMap) {
    strip_request_but(headers, &[]);
}

/// `strip_request`, leaving alone headers named exactly as in `kept` (to be
/// replaced right after: removing them first would be wasted work).
fn strip_request_but(headers: &mut HeaderMap, kept: &[&HeaderName]) {
    let named = names_more_than_hop_by_hop(headers);
    remove_where(headers, |n, all| {
        !kept.iter().any(|k| k.as_str().as_bytes() == n)
            && (is_hop_by_hop(n)
                || CLIENT_CREDENTIALS.iter().any(|c| same_name(n, c))
                || starts_with_name(n, b"x-forwarded-")
                || (named && connection_names(all, n)))
    });
}

/// The client's request headers as Confluence must get them: `strip_request`
/// then `add_upstream`, without removing what is replaced anyway.
pub fn to_upstream(headers: &mut HeaderMap, add: &UpstreamHeaders<'_>) {
    strip_request_but(
        headers,
        &[
            &AUTHORIZATION,
            &HOST,
            &X_REQUEST_ID,
            &FORWARDED,
            &X_FORWARDED_FOR,
            &X_FORWARDED_PROTO,
        ],
    );
    add_upstream(headers, add);
}

/// Removes from Confluence's response (headers or trailers) what must not reach a
/// client.
pub fn strip_response(headers: &mut HeaderMap) {
    let named = names_more_than_hop_by_hop(headers);
    remove_where(headers, |n, all| {
        is_hop_by_hop(n)
            || RESPONSE_SECRETS.iter().any(|c| same_name(n, c))
            || (named && connection_names(all, n))
    });
}

/// The `Forwarded`, `X-Forwarded-For` and `X-Forwarded-Proto` values of one
/// connection, built once when it is accepted.
#[derive(Debug, Clone)]
pub struct ForwardedFor {
    forwarded: HeaderValue,
    x_forwarded_for: HeaderValue,
    proto: HeaderValue,
}

impl ForwardedFor {
    pub fn new(peer: SocketAddr, proto: &'static str) -> Self {
        let forwarded = HeaderValue::from_str(&format!("for=\"{peer}\";proto={proto}"))
            .unwrap_or_else(|_| HeaderValue::from_static("for=unknown"));
        let x_forwarded_for = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ForwardedFor {
            forwarded,
            x_forwarded_for,
            proto: HeaderValue::from_static(proto),
        }
    }
}

/// What keygate adds to every forwarded request.
pub struct UpstreamHeaders<'a> {
    pub authorization: &'a HeaderValue,
    pub host: &'a HeaderValue,
    pub bypass: bool,
    pub request_id: &'a HeaderValue,
    pub forwarded: &'a ForwardedFor,
}

/// Adds keygate's own headers; call after `strip_request`.
pub fn add_upstream(headers: &mut HeaderMap, add: &UpstreamHeaders<'_>) {
    headers.insert(AUTHORIZATION, add.authorization.clone());
    headers.insert(HOST, add.host.clone());
    if add.bypass {
        headers.insert(BYPASS_HEADER.clone(), HeaderValue::from_static("true"));
    }
    headers.insert(X_REQUEST_ID.clone(), add.request_id.clone());
    headers.insert(FORWARDED.clone(), add.forwarded.forwarded.clone());
    headers.insert(
        X_FORWARDED_FOR.clone(),
        add.forwarded.x_forwarded_for.clone(),
    );
    headers.insert(X_FORWARDED_PROTO.clone(), add.forwarded.proto.clone());
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
    let mut buf = uuid::Uuid::encode_buffer();
    let id = uuid::Builder::from_unix_timestamp_millis(millis, &random)
        .into_uuid()
        .hyphenated()
        .encode_lower(&mut buf);
    HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests;
