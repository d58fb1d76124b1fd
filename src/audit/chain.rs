//! The line format and the hash chain, as pure functions.
//!
//! A record is serialised once into bytes B — `{"ts":…,"seq":…,"event":…,"prev":…,
//! <event fields>}` — and written as B with its final `}` replaced by
//! `,"hash":"<hex SHA-256 of B>"}`. `prev` is the hex SHA-256 of the previous line's
//! bytes without its newline (64 zeros for the very first record).

use ring::digest::{Context, SHA256};

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const HASH_SUFFIX_LEN: usize = r#","hash":""}"#.len() + 64;

pub fn hex(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for chunk in bytes.chunks(32) {
        out.extend_from_slice(&hex32(chunk)[..chunk.len() * 2]);
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Up to 32 bytes (a SHA-256) in lower-case hex, built on the stack and
/// appended in one go by the caller (two per record). Four bytes at a time:
/// their eight nibbles spread one per byte of a `u64`, then turned into
/// digits all at once (`'0' + n`, and 39 more for `a`-`f`).
fn hex32(bytes: &[u8]) -> [u8; 64] {
    let input: [u8; 32] = match <[u8; 32]>::try_from(bytes) {
        Ok(hash) => hash,
        Err(_) => {
            let mut padded = [0u8; 32];
            let n = bytes.len().min(32);
            padded[..n].copy_from_slice(&bytes[..n]);
            padded
        }
    };
    let mut text = [0u8; 64];
    for (digits, group) in text.chunks_exact_mut(8).zip(input.chunks_exact(4)) {
        let mut x = u64::from(u32::from_be_bytes([group[0], group[1], group[2], group[3]]));
        x = (x | (x << 16)) & 0x0000_FFFF_0000_FFFF;
        x = (x | (x << 8)) & 0x00FF_00FF_00FF_00FF;
        x = (x | (x << 4)) & 0x0F0F_0F0F_0F0F_0F0F;
        let letters = ((x + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
        let ascii = x + 0x3030_3030_3030_3030 + letters * 39;
        digits.copy_from_slice(&ascii.to_be_bytes());
    }
    text
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&SHA256, bytes).as_ref())
}

/// The head of a chain: the last `seq` and the hex SHA-256 of the last line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub prev: String,
}

impl Head {
    pub fn genesis() -> Self {
        Head {
            seq: 0,
            prev: GENESIS.to_owned(),
        }
    }

    /// Appends the next record's line and its newline to `out`, and moves the
    /// head past it. `fields` is the JSON of the event's members without braces.
    /// Values are JSON-encoded, so client-controlled strings are escaped, never
    /// spliced in.
    pub fn append(&mut self, out: &mut Vec<u8>, ts: &str, event: &str, fields: &[u8]) {
        self.seq += 1;
        let start = out.len();
        out.extend_from_slice(b"{\"ts\":\"");
        out.extend_from_slice(ts.as_bytes());
        out.extend_from_slice(b"\",\"seq\":");
        crate::rfc3339::push_decimal(out, self.seq);
        out.extend_from_slice(b",\"event\":\"");
        out.extend_from_slice(event.as_bytes());
        out.extend_from_slice(b"\",\"prev\":\"");
        out.extend_from_slice(self.prev.as_bytes());
        out.push(b'"');
        if !fields.is_empty() {
            out.push(b',');
            out.extend_from_slice(fields);
        }
        // B and the line share everything but their ending: hash that prefix once.
        let mut prefix = Context::new(&SHA256);
        prefix.update(&out[start..]);
        let mut body = prefix.clone();
        body.update(b"}");
        let tail = out.len();
        out.extend_from_slice(b",\"hash\":\"");
        out.extend_from_slice(&hex32(body.finish().as_ref()));
        out.extend_from_slice(b"\"}");
        prefix.update(&out[tail..]);
        let prev = hex32(prefix.finish().as_ref());
        self.prev.clear();
        self.prev
            .push_str(std::str::from_utf8(&prev).unwrap_or_default());
        out.push(b'\n');
    }
}

/// Encodes one line (without newline) and returns it with its own SHA-256 (the
/// next record's `prev`).
pub fn encode(ts: &str, seq: u64, event: &str, prev: &str, fields: &[u8]) -> (String, String) {
    let mut head = Head {
        seq: seq - 1,
        prev: prev.to_owned(),
    };
    let mut out = Vec::with_capacity(256 + fields.len());
    head.append(&mut out, ts, event, fields);
    out.pop();
    (String::from_utf8_lossy(&out).into_owned(), head.prev)
}

/// Why a line does not check out on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineError {
    NotJson,
    NoHash,
    HashMismatch,
    MissingField(&'static str),
}

/// What verification needs from a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub seq: u64,
    pub prev: String,
    /// SHA-256 of the whole line: what the next record's `prev` must be.
    pub line_hash: String,
}

/// Checks a line's own hash and reads `seq` and `prev`.
pub fn check_line(line: &str) -> Result<Checked, LineError> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|_| LineError::NotJson)?;
    if line.len() < HASH_SUFFIX_LEN || !line.ends_with("\"}") {
        return Err(LineError::NoHash);
    }
    let cut = line.len() - HASH_SUFFIX_LEN;
    // A hostile line may put a multi-byte character where the suffix should
    // start: that is not a hash suffix, and slicing there would panic.
    if !line.is_char_boundary(cut) {
        return Err(LineError::NoHash);
    }
    let suffix = &line[cut..];
    if !suffix.starts_with(r#","hash":""#) {
        return Err(LineError::NoHash);
    }
    let claimed = &suffix[r#","hash":""#.len()..suffix.len() - 2];
    let mut body = String::with_capacity(cut + 1);
    body.push_str(&line[..cut]);
    body.push('}');
    if sha256_hex(body.as_bytes()) != claimed
        || value.get("hash").and_then(|h| h.as_str()) != Some(claimed)
    {
        return Err(LineError::HashMismatch);
    }
    let seq = value
        .get("seq")
        .and_then(serde_json::Value::as_u64)
        .ok_or(LineError::MissingField("seq"))?;
    let prev = value
        .get("prev")
        .and_then(serde_json::Value::as_str)
        .ok_or(LineError::MissingField("prev"))?
        .to_owned();
    Ok(Checked {
        seq,
        prev,
        line_hash: sha256_hex(line.as_bytes()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_table() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0xff, 0x1a, 0x09]), "00ff1a09");
        let long: Vec<u8> = (0u8..70).collect();
        let expected: String = long.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex(&long), expected);
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // Every byte value in every position of a hash, and short inputs.
        for k in 0..=255u8 {
            let hash: Vec<u8> = (0..32u8)
                .map(|i| i.wrapping_mul(37).wrapping_add(k))
                .collect();
            let expected: String = hash.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(&hex32(&hash)[..], expected.as_bytes());
            let short = &hash[..usize::from(k % 33).min(32)];
            assert_eq!(hex(short), expected[..short.len() * 2]);
        }
    }

    #[test]
    fn a_multibyte_character_where_the_suffix_would_start_is_not_a_hash() {
        // Found by the audit_verify fuzz target: the cut fell inside a
        // two-byte character and slicing panicked.
        for pad in 0..4 {
            let line = format!(
                "{{\"seq\":1,\"x\":\"{}{}\"}}",
                "a".repeat(pad),
                "\u{b0}".repeat(60)
            );
            assert_eq!(check_line(&line), Err(LineError::NoHash), "{line}");
        }
    }

    #[test]
    fn encoded_lines_check_out_and_any_edit_breaks_them() {
        let fields = br#""path":"/wiki/\"quoted\"\n\u2028","status":null"#;
        let (line, line_hash) = encode("2026-11-23T10:00:00.000Z", 1, "request", GENESIS, fields);
        assert_eq!(line_hash, sha256_hex(line.as_bytes()));
        assert!(line.ends_with("\"}"));
        assert!(!line.contains('\n'));
        let checked = check_line(&line).unwrap();
        assert_eq!(checked.seq, 1);
        assert_eq!(checked.prev, GENESIS);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["path"], "/wiki/\"quoted\"\n\u{2028}");
        // The hash is the last member and covers everything before it.
        let keys: Vec<&str> = line
            .match_indices("\":")
            .map(|(i, _)| &line[..i])
            .map(|s| s.rsplit('"').next().unwrap())
            .collect();
        assert_eq!(keys.last(), Some(&"hash"));
        for i in 0..line.len() {
            let mut bytes = line.clone().into_bytes();
            bytes[i] ^= 0x01;
            if let Ok(edited) = String::from_utf8(bytes) {
                assert!(
                    check_line(&edited).is_err(),
                    "edit at byte {i} went unnoticed: {edited}"
                );
            }
        }
    }

    #[test]
    fn malformed_lines() {
        assert_eq!(check_line("not json"), Err(LineError::NotJson));
        assert_eq!(check_line("{\"seq\":1}"), Err(LineError::NoHash));
        let (line, _) = encode("t", 3, "startup", GENESIS, b"");
        let truncated = &line[..line.len() - 5];
        assert!(check_line(truncated).is_err());
    }
}
