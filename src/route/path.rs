//! Canonical request paths.
//!
//! The path keygate matches against the allow-list is exactly the path it forwards,
//! so there must be one spelling of every path and nothing that a server behind us
//! could read differently. `CanonicalPath::parse` decodes percent-encoded unreserved
//! characters, upper-cases every other escape, and refuses anything that stays
//! ambiguous: dot segments (raw or encoded), empty segments, encoded `/` or `\`,
//! a raw `\` or `;` (servlet containers strip `;…` path parameters, so
//! `/pages/..;/x` would escape), control characters raw or encoded, double
//! encoding, invalid escapes, characters RFC 3986 does not allow in a path, and
//! every target that is not in origin form.
//!
//! Invariant: `parse(parse(x)?.as_str()) == parse(x)` and the output never contains
//! a form that `parse` refuses.

use std::fmt;

/// Why a request target was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request target is not in origin form (absolute URI, `*` or authority form)")]
    NotOriginForm,
    #[error("the path contains a `.` or `..` segment")]
    DotSegment,
    #[error("the path contains an empty segment (`//`)")]
    EmptySegment,
    #[error("the path contains an encoded `/` (%2F)")]
    EncodedSlash,
    #[error("the path contains an encoded `\\` (%5C)")]
    EncodedBackslash,
    #[error("the path contains a `\\`")]
    Backslash,
    #[error("the path contains a `;` (path parameters are not allowed)")]
    Semicolon,
    #[error("the path contains a control character, raw or encoded")]
    ControlCharacter,
    #[error("the path contains a double-encoded escape (%25 followed by hex digits)")]
    DoubleEncoding,
    #[error("the path contains an invalid percent escape")]
    InvalidEscape,
    #[error("the path contains a character that must be percent-encoded")]
    InvalidCharacter,
}

/// A request path in its one canonical spelling, with at most one trailing slash.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CanonicalPath {
    text: String,
}

impl CanonicalPath {
    /// Canonicalises the path part of an origin-form request target (no query).
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        let bytes = raw.as_bytes();
        if bytes.first() != Some(&b'/') {
            return Err(PathError::NotOriginForm);
        }
        let mut out = String::with_capacity(raw.len());
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match b {
                b'%' => {
                    let value = escape_at(bytes, i)?;
                    push_escaped(&mut out, value)?;
                    i += 3;
                }
                b'\\' => return Err(PathError::Backslash),
                b';' => return Err(PathError::Semicolon),
                0x00..=0x1F | 0x7F => return Err(PathError::ControlCharacter),
                _ if is_path_char(b) => {
                    out.push(char::from(b));
                    i += 1;
                }
                _ => return Err(PathError::InvalidCharacter),
            }
        }
        check_double_encoding(&out)?;
        check_segments(&out)?;
        Ok(CanonicalPath { text: out })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The segments between slashes, without the empty one a trailing slash leaves.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        let trimmed = self.text.strip_prefix('/').unwrap_or(&self.text);
        let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
        trimmed.split('/').filter(|s| !s.is_empty())
    }
}

impl fmt::Display for CanonicalPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The byte value of the escape `%XY` at `i`.
fn escape_at(bytes: &[u8], i: usize) -> Result<u8, PathError> {
    match (
        bytes.get(i + 1).and_then(|b| hex_value(*b)),
        bytes.get(i + 2).and_then(|b| hex_value(*b)),
    ) {
        (Some(hi), Some(lo)) => Ok(hi << 4 | lo),
        _ => Err(PathError::InvalidEscape),
    }
}

/// Appends the canonical form of an escaped byte.
fn push_escaped(out: &mut String, value: u8) -> Result<(), PathError> {
    match value {
        b'/' => Err(PathError::EncodedSlash),
        b'\\' => Err(PathError::EncodedBackslash),
        0x00..=0x1F | 0x7F => Err(PathError::ControlCharacter),
        _ if is_unreserved(value) => {
            out.push(char::from(value));
            Ok(())
        }
        _ => {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(char::from(HEX[usize::from(value >> 4)]));
            out.push(char::from(HEX[usize::from(value & 0x0F)]));
            Ok(())
        }
    }
}

/// `%25` followed by two hex digits decodes, a second time, to another escape: a
/// server that decodes twice would see what we did not. Checked on the output, as
/// decoding `%32%65` after a `%25` forms the same thing.
fn check_double_encoding(path: &str) -> Result<(), PathError> {
    let refused = path
        .as_bytes()
        .windows(5)
        .any(|w| w[..3] == *b"%25" && hex_value(w[3]).is_some() && hex_value(w[4]).is_some());
    if refused {
        Err(PathError::DoubleEncoding)
    } else {
        Ok(())
    }
}

fn check_segments(path: &str) -> Result<(), PathError> {
    let body = &path[1..];
    let body = body.strip_suffix('/').unwrap_or(body);
    if body.is_empty() {
        // "/" itself; "//" ends up here as an empty body after one strip.
        return if path.len() <= 1 {
            Ok(())
        } else {
            Err(PathError::EmptySegment)
        };
    }
    for segment in body.split('/') {
        match segment {
            "" => return Err(PathError::EmptySegment),
            "." | ".." => return Err(PathError::DotSegment),
            _ => {}
        }
    }
    Ok(())
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 `pchar` without `%` and `;` (handled separately), plus the `/` separator.
fn is_path_char(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'/' | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b'='
                | b':'
                | b'@'
        )
}

#[cfg(test)]
mod tests {
    use super::PathError::*;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn canonicalisation_table() {
        let cases: &[(&str, Result<&str, PathError>)] = &[
            // plain paths
            ("/", Ok("/")),
            ("/wiki", Ok("/wiki")),
            ("/wiki/", Ok("/wiki/")),
            ("/wiki/api/v2/pages/42", Ok("/wiki/api/v2/pages/42")),
            ("/wiki/api/v2/pages/42/", Ok("/wiki/api/v2/pages/42/")),
            ("/a-b_c~d.e", Ok("/a-b_c~d.e")),
            ("/a:b@c!$&'()*+,=", Ok("/a:b@c!$&'()*+,=")),
            ("/...", Ok("/...")),
            ("/.hidden", Ok("/.hidden")),
            ("/a..b", Ok("/a..b")),
            // dot segments, raw
            ("/.", Err(DotSegment)),
            ("/..", Err(DotSegment)),
            ("/a/./b", Err(DotSegment)),
            ("/a/../b", Err(DotSegment)),
            ("/a/..", Err(DotSegment)),
            ("/a/../", Err(DotSegment)),
            ("/a/.", Err(DotSegment)),
            // dot segments, encoded and mixed case
            ("/a/%2e/b", Err(DotSegment)),
            ("/a/%2E%2E/b", Err(DotSegment)),
            ("/a/%2e%2E/b", Err(DotSegment)),
            ("/a/.%2e/b", Err(DotSegment)),
            ("/a/%2e./b", Err(DotSegment)),
            ("/wiki/api/v2/pages/%2e%2e/admin", Err(DotSegment)),
            // dot segments, double encoded
            ("/a/%252e%252e/b", Err(DoubleEncoding)),
            ("/a/%252E/b", Err(DoubleEncoding)),
            ("/a/%25%32%65/b", Err(DoubleEncoding)),
            // encoded slash and backslash, any case
            ("/a%2Fb", Err(EncodedSlash)),
            ("/a%2fb", Err(EncodedSlash)),
            ("/a/..%2F..%2Fadmin", Err(EncodedSlash)),
            ("/a%5Cb", Err(EncodedBackslash)),
            ("/a%5cb", Err(EncodedBackslash)),
            ("/a%252Fb", Err(DoubleEncoding)),
            // raw backslash
            ("/a\\b", Err(Backslash)),
            ("/a/..\\b", Err(Backslash)),
            // empty segments
            ("//", Err(EmptySegment)),
            ("//wiki", Err(EmptySegment)),
            ("/wiki//api", Err(EmptySegment)),
            ("/wiki//", Err(EmptySegment)),
            ("/wiki///", Err(EmptySegment)),
            // NUL and control characters, raw and encoded
            ("/a%00b", Err(ControlCharacter)),
            ("/a%00", Err(ControlCharacter)),
            ("/a%0Ab", Err(ControlCharacter)),
            ("/a%0db", Err(ControlCharacter)),
            ("/a%1F", Err(ControlCharacter)),
            ("/a%7F", Err(ControlCharacter)),
            ("/a%7f", Err(ControlCharacter)),
            ("/a\0b", Err(ControlCharacter)),
            ("/a\tb", Err(ControlCharacter)),
            ("/a\nb", Err(ControlCharacter)),
            ("/a\x7Fb", Err(ControlCharacter)),
            // invalid escapes
            ("/a%", Err(InvalidEscape)),
            ("/a%2", Err(InvalidEscape)),
            ("/a%zz", Err(InvalidEscape)),
            ("/a%g1", Err(InvalidEscape)),
            ("/a%%41", Err(InvalidEscape)),
            ("/a%-1", Err(InvalidEscape)),
            // encoded unreserved characters are decoded
            ("/%61%62%63", Ok("/abc")),
            ("/wiki/api/v2/pages/%34%32", Ok("/wiki/api/v2/pages/42")),
            ("/%7E%2D%5F%2E", Ok("/~-_.")),
            ("/%41%5a", Ok("/AZ")),
            // other escapes keep their meaning, hex upper-cased
            ("/a%20b", Ok("/a%20b")),
            ("/a%3b", Ok("/a%3B")),
            ("/a%3Fb", Ok("/a%3Fb")),
            ("/a%2a", Ok("/a%2A")),
            ("/caf%c3%a9", Ok("/caf%C3%A9")),
            ("/100%25", Ok("/100%25")),
            ("/100%25x", Ok("/100%25x")),
            // raw semicolon: servlet path parameters
            ("/wiki;jsessionid=1", Err(Semicolon)),
            ("/wiki/api/v2/pages/..;/admin", Err(Semicolon)),
            ("/wiki/api/v2/pages/42;x", Err(Semicolon)),
            // non-origin-form targets
            ("", Err(NotOriginForm)),
            ("*", Err(NotOriginForm)),
            ("http://evil.example/wiki", Err(NotOriginForm)),
            ("example.atlassian.net:443", Err(NotOriginForm)),
            ("wiki/api", Err(NotOriginForm)),
            // characters RFC 3986 does not allow raw, and non-ASCII
            ("/a b", Err(InvalidCharacter)),
            ("/a\"b", Err(InvalidCharacter)),
            ("/a<b>", Err(InvalidCharacter)),
            ("/a{b}", Err(InvalidCharacter)),
            ("/a|b", Err(InvalidCharacter)),
            ("/a#b", Err(InvalidCharacter)),
            ("/a?b", Err(InvalidCharacter)),
            ("/café", Err(InvalidCharacter)),
            ("/\u{202e}", Err(InvalidCharacter)),
        ];
        assert!(cases.len() >= 60, "{} cases", cases.len());
        for (input, expected) in cases {
            let got = CanonicalPath::parse(input);
            let got = got.as_ref().map(|p| p.as_str()).map_err(|e| *e);
            assert_eq!(got, *expected, "input {input:?}");
        }
    }

    #[test]
    fn segments_ignore_one_trailing_slash() {
        let p = CanonicalPath::parse("/wiki/api/").unwrap();
        assert_eq!(p.segments().collect::<Vec<_>>(), ["wiki", "api"]);
        let root = CanonicalPath::parse("/").unwrap();
        assert_eq!(root.segments().count(), 0);
    }

    /// Strings built from the characters that matter for canonicalisation.
    fn path_like() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/".to_string()),
            Just(".".to_string()),
            Just("..".to_string()),
            Just(";".to_string()),
            Just("\\".to_string()),
            Just("%".to_string()),
            Just("%25".to_string()),
            Just("%2e".to_string()),
            Just("%2F".to_string()),
            Just("%5c".to_string()),
            Just("%00".to_string()),
            Just("%41".to_string()),
            Just("%c3%a9".to_string()),
            "[a-zA-Z0-9]{1,3}",
            "%[0-9a-fA-F]{2}",
            any::<char>().prop_map(|c| c.to_string()),
        ];
        proptest::collection::vec(piece, 0..12).prop_map(|v| format!("/{}", v.concat()))
    }

    fn refused_form(out: &str) -> bool {
        let upper = out.to_ascii_uppercase();
        out.contains("//")
            || out.contains('\\')
            || out.contains(';')
            || out.bytes().any(|b| b < 0x20 || b == 0x7F || b >= 0x80)
            || upper.contains("%2F")
            || upper.contains("%5C")
            || (0..0x20).any(|c| upper.contains(&format!("%{c:02X}")))
            || upper.contains("%7F")
            || out.split('/').any(|s| s == "." || s == "..")
            || out
                .as_bytes()
                .windows(3)
                .any(|w| w[0] == b'%' && (w[1].is_ascii_lowercase() || w[2].is_ascii_lowercase()))
    }

    proptest! {
        #[test]
        fn canonicalisation_is_idempotent(raw in path_like()) {
            if let Ok(once) = CanonicalPath::parse(&raw) {
                let twice = CanonicalPath::parse(once.as_str());
                prop_assert_eq!(twice.as_ref(), Ok(&once));
            }
        }

        #[test]
        fn output_never_contains_a_refused_form(raw in path_like()) {
            if let Ok(p) = CanonicalPath::parse(&raw) {
                prop_assert!(!refused_form(p.as_str()), "{:?} -> {:?}", raw, p.as_str());
            }
        }

        #[test]
        fn any_string_never_panics(raw in any::<String>()) {
            let _ = CanonicalPath::parse(&raw);
        }
    }
}
