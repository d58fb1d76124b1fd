//! Rewriting the site's origin to keygate's public origin, so that a client that
//! follows the URLs Confluence hands out stays on keygate (its routes, its audit
//! trail) instead of going to the site directly — and never presents its keygate
//! credential there.
//!
//! Only URLs on `confluence.base_url`'s origin are rewritten (`Location`,
//! `Content-Location`, `Link`, and JSON bodies when enabled); other origins, such
//! as Atlassian's media host for attachment downloads, pass unchanged.
//!
//! keygate's public origin is `listen.public_url`, else the scheme of the
//! connection and the authority the request arrived with (`Host` or `:authority`)
//! — and only if that is a syntactically valid authority. Without one, header
//! URLs become origin-relative (`/wiki/...`), which every client resolves against
//! the URL it asked keygate for.

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, CONTENT_LOCATION, HOST, LINK, LOCATION};
use http::{HeaderMap, Request};
use memchr::memmem::Finder;

/// One spelling of the site's origin in a body, with its searcher built once.
#[derive(Debug)]
struct Pattern {
    finder: Finder<'static>,
    /// Written with `\/` for `/` (JSON allows it).
    escaped: bool,
}

impl Pattern {
    fn bytes(&self) -> &[u8] {
        self.finder.needle()
    }
}

/// The site's origin as Confluence writes it in URLs.
#[derive(Debug, Clone)]
pub struct Site {
    /// `https://example.atlassian.net`, lower-case.
    origin: String,
    /// The same with the scheme's default port written out.
    with_port: String,
    patterns: Arc<Patterns>,
}

/// The site's origin in every spelling, and one searcher for the part they all
/// share (the host): a body without it needs no closer look.
#[derive(Debug)]
struct Patterns {
    spellings: Vec<Pattern>,
    host: Finder<'static>,
}

/// keygate's public origin, as a replacement in both JSON spellings.
#[derive(Debug)]
pub struct Replacement {
    text: String,
    escaped: Vec<u8>,
}

impl Replacement {
    pub fn new(origin: String) -> Arc<Self> {
        let escaped = origin.replace('/', "\\/").into_bytes();
        Arc::new(Replacement {
            text: origin,
            escaped,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Where a request's public origin comes from, resolved only when a URL is
/// actually rewritten.
pub(super) struct Public<'a> {
    pub configured: Option<&'a Arc<Replacement>>,
    pub scheme: &'static str,
    /// `Host` or `:authority` as the request carried it.
    pub authority: Option<HeaderValue>,
    /// The connection's last resolution: clients send the same `Host` each time.
    pub cache: &'a Mutex<Option<(HeaderValue, Arc<Replacement>)>>,
}

impl Public<'_> {
    pub(super) fn resolve(&self) -> Arc<Replacement> {
        if let Some(c) = self.configured {
            return Arc::clone(c);
        }
        let Some(authority) = &self.authority else {
            return Replacement::new(String::new());
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((key, value)) = cache.as_ref() {
            if key == authority {
                return Arc::clone(value);
            }
        }
        let origin = match authority.to_str() {
            Ok(a) if valid_authority(a) => format!("{}://{a}", self.scheme),
            _ => String::new(),
        };
        let value = Replacement::new(origin);
        *cache = Some((super::detached(authority), Arc::clone(&value)));
        value
    }
}

impl Site {
    pub fn new(scheme: &str, authority: &str) -> Self {
        let origin = format!("{scheme}://{authority}").to_ascii_lowercase();
        let port = if scheme == "https" { 443 } else { 80 };
        let with_port = if authority.contains(':') {
            origin.clone()
        } else {
            format!("{origin}:{port}")
        };
        let mut patterns = Vec::new();
        for o in [&with_port, &origin] {
            for escaped in [false, true] {
                let text = if escaped {
                    o.replace('/', "\\/")
                } else {
                    o.clone()
                };
                patterns.push(Pattern {
                    finder: Finder::new(text.as_bytes()).into_owned(),
                    escaped,
                });
            }
        }
        let host = authority
            .split(':')
            .next()
            .unwrap_or(authority)
            .to_ascii_lowercase();
        Site {
            origin,
            with_port,
            patterns: Arc::new(Patterns {
                spellings: patterns,
                host: Finder::new(host.as_bytes()).into_owned(),
            }),
        }
    }

    /// The length of the site-origin prefix of `url`, if it has one followed by
    /// the end, a path, a query or a fragment.
    fn prefix_len(&self, url: &str) -> Option<usize> {
        [&self.with_port, &self.origin].into_iter().find_map(|o| {
            let head = url.get(..o.len())?;
            let next = url.as_bytes().get(o.len());
            (head.eq_ignore_ascii_case(o) && matches!(next, None | Some(b'/' | b'?' | b'#')))
                .then_some(o.len())
        })
    }

    /// `url` with the site's origin replaced by `public` (empty: origin-relative).
    pub fn rewrite_url(&self, url: &str, public: &str) -> Option<String> {
        let n = self.prefix_len(url)?;
        let rest = &url[n..];
        let rest = if public.is_empty() && rest.is_empty() {
            "/"
        } else {
            rest
        };
        Some(format!("{public}{rest}"))
    }

    /// Rewrites `Location`, `Content-Location` and every URL in `Link`; the
    /// public origin is resolved only if one of them is there.
    pub(super) fn rewrite_headers(&self, headers: &mut HeaderMap, public: &Public<'_>) {
        if [LOCATION, CONTENT_LOCATION, LINK]
            .iter()
            .any(|n| headers.contains_key(n))
        {
            self.rewrite_headers_to(headers, public.resolve().as_str());
        }
    }

    /// Rewrites `Location`, `Content-Location` and every URL in `Link` to `public`.
    pub fn rewrite_headers_to(&self, headers: &mut HeaderMap, public: &str) {
        for name in [LOCATION, CONTENT_LOCATION] {
            let new = headers
                .get(&name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| self.rewrite_url(v.trim(), public));
            if let Some(v) = new.and_then(|v| HeaderValue::from_str(&v).ok()) {
                headers.insert(name, v);
            }
        }
        if !headers.contains_key(LINK) {
            return;
        }
        let links: Vec<HeaderValue> = headers
            .get_all(LINK)
            .iter()
            .map(|v| match v.to_str() {
                Ok(text) => {
                    let rewritten = self.rewrite_link(text, public);
                    HeaderValue::from_str(&rewritten).unwrap_or_else(|_| v.clone())
                }
                Err(_) => v.clone(),
            })
            .collect();
        headers.remove(LINK);
        for v in links {
            headers.append(LINK, v);
        }
    }

    /// Every `<url>` of a `Link` value.
    fn rewrite_link(&self, text: &str, public: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(open) = rest.find('<') {
            out.push_str(&rest[..=open]);
            rest = &rest[open + 1..];
            let Some(close) = rest.find('>') else { break };
            let url = &rest[..close];
            match self.rewrite_url(url, public) {
                Some(new) => out.push_str(&new),
                None => out.push_str(url),
            }
            rest = &rest[close..];
        }
        out.push_str(rest);
        out
    }

    /// A streaming rewriter for a JSON body.
    pub fn json_rewriter(&self, public: Arc<Replacement>) -> Replacer {
        Replacer {
            patterns: Arc::clone(&self.patterns),
            public,
            carry: Vec::new(),
        }
    }
}

/// The authority a request arrived with (`:authority`, else `Host`).
pub(super) fn request_authority<B>(request: &Request<B>) -> Option<HeaderValue> {
    match request.uri().authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => request.headers().get(HOST).cloned(),
    }
}

/// `host[:port]` that parses as a URI authority, without user info.
fn valid_authority(text: &str) -> bool {
    !text.is_empty()
        && !text.contains(['@', '/', '\\', ' ', '"', '<', '>'])
        && text.parse::<http::uri::Authority>().is_ok()
}

/// Replaces byte patterns in a stream, holding back only what could be the
/// start of a pattern across a chunk boundary; never the whole body.
#[derive(Debug)]
pub struct Replacer {
    /// The site's origin in each spelling, longest first for each.
    patterns: Arc<Patterns>,
    public: Arc<Replacement>,
    carry: Vec<u8>,
}

impl Replacer {
    fn replacement(&self, pattern: &Pattern) -> &[u8] {
        if pattern.escaped {
            &self.public.escaped
        } else {
            self.public.text.as_bytes()
        }
    }

    /// Whether `input` (with nothing carried) can pass unchanged: no pattern in
    /// it, and no pattern starting in its tail.
    fn untouched(&self, input: &[u8], last: bool) -> bool {
        if !self.carry.is_empty() {
            return false;
        }
        let spellings = &self.patterns.spellings;
        let longest = spellings.iter().map(|p| p.bytes().len()).max().unwrap_or(0);
        let tail_start = input.len().saturating_sub(longest);
        let partial_at_end = !last
            && memchr::memchr_iter(b'h', &input[tail_start..]).any(|i| {
                let rest = &input[tail_start + i..];
                spellings.iter().any(|p| p.bytes().starts_with(rest))
            });
        !partial_at_end && self.patterns.host.find(input).is_none()
    }

    /// Rewrites `input` (passing it through without a copy when nothing in it
    /// changes), keeping back a possible partial match unless `last`.
    pub fn push_bytes(&mut self, input: Bytes, last: bool) -> Bytes {
        if self.untouched(&input, last) {
            return input;
        }
        self.push(&input, last)
    }

    /// Rewrites `input`, keeping back a possible partial match unless `last`.
    pub fn push(&mut self, input: &[u8], last: bool) -> Bytes {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(input);
        let mut out = BytesMut::with_capacity(buf.len() + 64);
        let mut i = 0;
        'scan: while i < buf.len() {
            let Some(off) = memchr::memchr(b'h', &buf[i..]) else {
                out.extend_from_slice(&buf[i..]);
                break;
            };
            out.extend_from_slice(&buf[i..i + off]);
            i += off;
            let rest = &buf[i..];
            for p in self.patterns.spellings.iter() {
                let pattern = p.bytes();
                if rest.starts_with(pattern) {
                    match rest.get(pattern.len()) {
                        // A longer host (`site.atlassian.net.evil`) or a port is
                        // another origin.
                        Some(b'/' | b'"' | b'?' | b'#' | b'\\') => {
                            out.extend_from_slice(self.replacement(p));
                            i += pattern.len();
                            continue 'scan;
                        }
                        None if !last => {
                            self.carry = rest.to_vec();
                            break 'scan;
                        }
                        _ => {}
                    }
                } else if !last && rest.len() < pattern.len() && pattern.starts_with(rest) {
                    self.carry = rest.to_vec();
                    break 'scan;
                }
            }
            out.extend_from_slice(b"h");
            i += 1;
        }
        out.freeze()
    }
}

impl crate::body::Transform for Replacer {
    fn data(&mut self, data: Bytes) -> Bytes {
        self.push_bytes(data, false)
    }

    fn finish(&mut self) -> Bytes {
        if self.carry.is_empty() {
            return Bytes::new();
        }
        self.push(&[], true)
    }
}

#[cfg(test)]
mod tests;
