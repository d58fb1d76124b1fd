//! JSON written by hand where serde's machinery is too slow for the hot path (the
//! audit `request` record, two per bypass request): strings escaped exactly as
//! serde_json escapes them, plus U+2028 and U+2029 as `\u` escapes so that
//! line-based log shippers never split a line; clean runs of eight bytes are
//! checked at a time and copied in one go.

/// Appends `s` as a JSON string.
pub fn push_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut clean = 0; // start of the run not yet copied
    let mut i = 0;
    while i < bytes.len() {
        // Eight bytes at a time. A string's last few bytes are checked as its
        // last eight (a byte looked at twice only costs a closer look), and a
        // string shorter than eight is padded with a harmless byte.
        let n = (bytes.len() - i).min(8);
        let word = if n == 8 {
            word_at(bytes, i)
        } else if bytes.len() >= 8 {
            word_at(bytes, bytes.len() - 8)
        } else {
            let mut w = [b'a'; 8];
            for (slot, b) in w.iter_mut().zip(&bytes[i..]) {
                *slot = *b;
            }
            u64::from_le_bytes(w)
        };
        if !special(word) {
            i += n;
            continue;
        }
        let end = i + n;
        while i < end {
            let b = bytes[i];
            let escape: Option<&[u8]> = match b {
                b'"' => Some(b"\\\""),
                b'\\' => Some(b"\\\\"),
                b'\n' => Some(b"\\n"),
                b'\r' => Some(b"\\r"),
                b'\t' => Some(b"\\t"),
                0x08 => Some(b"\\b"),
                0x0C => Some(b"\\f"),
                0x00..=0x1F => None,
                0xE2 if bytes.get(i + 1) == Some(&0x80)
                    && matches!(bytes.get(i + 2), Some(0xA8 | 0xA9)) =>
                {
                    Some(if bytes[i + 2] == 0xA8 {
                        b"\\u2028"
                    } else {
                        b"\\u2029"
                    })
                }
                _ => {
                    i += 1;
                    continue;
                }
            };
            out.extend_from_slice(&bytes[clean..i]);
            match escape {
                Some(text) => {
                    out.extend_from_slice(text);
                    i += if b == 0xE2 { 3 } else { 1 };
                }
                None => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(b >> 4)]);
                    out.push(HEX[usize::from(b & 0x0F)]);
                    i += 1;
                }
            }
            clean = i;
        }
    }
    out.extend_from_slice(&bytes[clean..]);
    out.push(b'"');
}

/// The eight bytes from `at` (the caller knows there are eight).
fn word_at(bytes: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Whether any byte of `w` may need escaping: below 0x20, `"`, `\` or 0xE2 (the
/// lead byte of U+2028/U+2029). Exact for "none"; a hit is checked byte by byte.
fn special(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    below_space != 0
        || zero(w ^ (ONES * u64::from(b'"'))) != 0
        || zero(w ^ (ONES * u64::from(b'\\'))) != 0
        || zero(w ^ (ONES * 0xE2)) != 0
}

/// The members of an object, written in order (the caller writes the braces,
/// or leaves them off for the audit writer).
pub struct Members<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Members<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        Members { out, first: true }
    }

    /// Bytes written so far (the members of the object start at 0).
    pub fn position(&self) -> usize {
        self.out.len()
    }

    /// Starts a member; `name` is a plain identifier, written as is. Inlined,
    /// so that a literal name is copied as a constant (a record has ~25).
    #[inline(always)]
    pub fn key(&mut self, name: &str) -> &mut Vec<u8> {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    #[inline(always)]
    pub fn str(&mut self, name: &str, value: &str) {
        push_str(self.key(name), value);
    }

    #[inline(always)]
    pub fn opt_str(&mut self, name: &str, value: Option<&str>) {
        match value {
            Some(v) => self.str(name, v),
            None => self.key(name).extend_from_slice(b"null"),
        }
    }

    #[inline(always)]
    pub fn bool(&mut self, name: &str, value: bool) {
        let text: &[u8] = if value { b"true" } else { b"false" };
        self.key(name).extend_from_slice(text);
    }

    #[inline(always)]
    pub fn u64(&mut self, name: &str, value: u64) {
        crate::rfc3339::push_decimal(self.key(name), value);
    }

    #[inline(always)]
    pub fn opt_u64(&mut self, name: &str, value: Option<u64>) {
        match value {
            Some(v) => self.u64(name, v),
            None => self.key(name).extend_from_slice(b"null"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What serde_json writes, with U+2028/U+2029 escaped afterwards.
    fn reference(s: &str) -> String {
        serde_json::to_string(s)
            .unwrap()
            .replace('\u{2028}', "\\u2028")
            .replace('\u{2029}', "\\u2029")
    }

    #[test]
    fn strings_table() {
        for s in [
            "",
            "plain",
            "exactly8",
            "a longer plain string of many words",
            "\"",
            "\\",
            "quote \" in the middle of a long enough string",
            "\u{0}\u{1}\u{7}\u{8}\t\n\u{b}\u{c}\r\u{1b}\u{1f}\u{7f}",
            "line\u{2028}sep\u{2029}end",
            "\u{2028}",
            "almost \u{2027} and \u{202a} and â\u{80}",
            "é日本語🙂 with non-ASCII all along the string",
            "/wiki/api/v2/pages/1001?expand=body.storage&limit=25",
            // Specials in a tail checked as the last eight bytes, and before it.
            "12345678\"",
            "1234567\"89",
            "\"123456789",
            "123456789abcdef\u{2028}",
        ] {
            let mut out = Vec::new();
            push_str(&mut out, s);
            assert_eq!(String::from_utf8(out).unwrap(), reference(s), "{s:?}");
        }
    }

    proptest! {
        #[test]
        fn strings_match_serde_json(s in any::<String>()) {
            let mut out = Vec::new();
            push_str(&mut out, &s);
            prop_assert_eq!(String::from_utf8(out).unwrap(), reference(&s));
        }

        #[test]
        fn strings_near_the_special_bytes_match(s in "[\"\\\\\u{0}-\u{1f} a\u{2028}\u{2029}\u{2027}]{0,40}") {
            let mut out = Vec::new();
            push_str(&mut out, &s);
            prop_assert_eq!(String::from_utf8(out).unwrap(), reference(&s));
        }
    }

    #[test]
    fn members_in_order() {
        let mut out = Vec::new();
        let mut m = Members::new(&mut out);
        m.str("a", "x");
        m.opt_str("b", None);
        m.bool("c", true);
        m.u64("d", 42);
        m.opt_u64("e", None);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#""a":"x","b":null,"c":true,"d":42,"e":null"#
        );
    }
}
