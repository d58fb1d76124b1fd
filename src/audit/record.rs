//! The audit records, one typed struct per event (SPEC §7 readable in one place),
//! serialised once — on the side that makes the record — into the bytes of their
//! fields. The writer wraps them with `ts`, `seq`, `event`, `prev` and `hash`.
//!
//! Invariants: values are JSON-encoded, never spliced in; a string a client
//! controls is cut to a bound (on a character boundary) and the record says so
//! in `truncated` with the original length, so a client cannot make keygate write
//! large records; U+2028 and U+2029 are written escaped, so line-based log
//! shippers never split a record; no record holds a secret, an `Authorization`
//! value, a cookie or a body.

use std::net::SocketAddr;
use std::time::SystemTime;

use serde::ser::{SerializeMap as _, Serializer};
use serde::Serialize;

/// Longest client-controlled strings kept in a record, in bytes.
pub const MAX_PATH: usize = 1024;
pub const MAX_QUERY: usize = 1024;
pub const MAX_USER_AGENT: usize = 256;
pub const MAX_CLIENT_ID: usize = 128;
pub const MAX_METHOD: usize = 32;

/// A record ready for the writer: its event name and the JSON of its fields,
/// without the enclosing braces (`"a":1,"b":"x"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub event: &'static str,
    pub fields: Vec<u8>,
}

/// Serialises `record` (a struct serialising as a JSON object) into an `Encoded`.
pub fn encode<T: Serialize>(event: &'static str, record: &T) -> Encoded {
    let mut json = Vec::with_capacity(384);
    if serde_json::to_writer(&mut json, record).is_err() {
        json.clear();
        json.extend_from_slice(b"{}");
    }
    let mut fields = escape_line_separators(json);
    // `{...}` → `...`: the writer puts its own members in front.
    if fields.len() >= 2 {
        fields.pop();
        fields.remove(0);
    } else {
        fields.clear();
    }
    Encoded { event, fields }
}

/// Replaces raw U+2028/U+2029 (valid in JSON strings, but line breaks to many
/// shippers) by their `\u` escapes.
fn escape_line_separators(json: Vec<u8>) -> Vec<u8> {
    let hit = |w: &[u8]| w[0] == 0xE2 && w[1] == 0x80 && (w[2] == 0xA8 || w[2] == 0xA9);
    let found = memchr::memchr_iter(0xE2, &json).any(|i| json.get(i..i + 3).is_some_and(hit));
    if !found {
        return json;
    }
    let mut out = Vec::with_capacity(json.len() + 8);
    let mut i = 0;
    while i < json.len() {
        if i + 3 <= json.len() && hit(&json[i..i + 3]) {
            out.extend_from_slice(if json[i + 2] == 0xA8 {
                b"\\u2028"
            } else {
                b"\\u2029"
            });
            i += 3;
        } else {
            out.push(json[i]);
            i += 1;
        }
    }
    out
}

/// A client-controlled string, cut to `max` bytes on a character boundary.
#[derive(Debug, Clone, Copy)]
pub struct Clip<'a> {
    text: &'a str,
    max: usize,
}

impl<'a> Clip<'a> {
    pub fn new(text: &'a str, max: usize) -> Self {
        Clip { text, max }
    }

    fn kept(&self) -> &'a str {
        if self.text.len() <= self.max {
            return self.text;
        }
        let mut end = self.max;
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        &self.text[..end]
    }

    /// The original length when it was cut.
    fn cut(&self) -> Option<usize> {
        (self.text.len() > self.max).then_some(self.text.len())
    }
}

impl Serialize for Clip<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.kept())
    }
}

/// Original lengths of the fields that were cut: `{"user_agent": 70000}`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Truncated<'a> {
    fields: [Option<(&'static str, usize)>; 5],
    _marker: std::marker::PhantomData<&'a ()>,
}

impl<'a> Truncated<'a> {
    /// Notes `clip` under `name` if it was cut; returns it for chaining.
    pub fn note(&mut self, name: &'static str, clip: Option<Clip<'a>>) -> Option<Clip<'a>> {
        if let Some(len) = clip.and_then(|c| c.cut()) {
            if let Some(slot) = self.fields.iter_mut().find(|s| s.is_none()) {
                *slot = Some((name, len));
            }
        }
        clip
    }

    pub fn is_empty(&self) -> bool {
        self.fields.iter().all(Option::is_none)
    }
}

impl Serialize for Truncated<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for (name, len) in self.fields.iter().flatten() {
            map.serialize_entry(name, len)?;
        }
        map.end()
    }
}

fn seconds<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => crate::rfc3339::with_seconds(*t, |text| s.serialize_str(text)),
        None => s.serialize_none(),
    }
}

/// A socket address as `Display` writes it; IPv4 without the formatting
/// machinery (every record carries one).
fn address<S: Serializer>(a: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
    let mut text = Vec::with_capacity(24);
    write_address(&mut text, a);
    s.serialize_str(std::str::from_utf8(&text[1..text.len() - 1]).unwrap_or_default())
}

/// Appends the address as a JSON string, as `Display` writes it.
fn write_address(out: &mut Vec<u8>, a: &SocketAddr) {
    let SocketAddr::V4(v4) = a else {
        crate::json::push_str(out, &a.to_string());
        return;
    };
    // "255.255.255.255:65535"
    out.push(b'"');
    for (i, octet) in v4.ip().octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        crate::rfc3339::push_decimal(out, u64::from(octet));
    }
    out.push(b':');
    crate::rfc3339::push_decimal(out, u64::from(v4.port()));
    out.push(b'"');
}

/// `request`: one per request (`phase: "end"`), and for a bypass request a
/// `phase: "start"` record made durable before it leaves.
#[derive(Debug, Serialize)]
pub struct Request<'a> {
    pub phase: &'static str,
    pub request_id: &'a str,
    pub client_id: Option<Clip<'a>>,
    pub key_name: Option<&'a str>,
    #[serde(serialize_with = "address")]
    pub remote_addr: SocketAddr,
    pub method: Clip<'a>,
    pub path: Clip<'a>,
    pub query: Option<Clip<'a>>,
    pub route: Option<&'a str>,
    pub admin_key: bool,
    pub admin_account: Option<&'a str>,
    #[serde(serialize_with = "seconds")]
    pub admin_key_expires: Option<SystemTime>,
    pub status: Option<u16>,
    pub upstream_status: Option<u16>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: Option<u64>,
    pub user_agent: Option<Clip<'a>>,
    #[serde(skip_serializing_if = "Truncated::is_empty")]
    pub truncated: Truncated<'a>,
}

/// The members of a `request` record that only its end knows.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub status: Option<u16>,
    pub upstream_status: Option<u16>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: Option<u64>,
}

impl Outcome {
    fn write(&self, m: &mut crate::json::Members<'_>) {
        m.opt_u64("status", self.status.map(u64::from));
        m.opt_u64("upstream_status", self.upstream_status.map(u64::from));
        m.u64("bytes_in", self.bytes_in);
        m.u64("bytes_out", self.bytes_out);
        m.opt_u64("duration_ms", self.duration_ms);
    }
}

/// A durable `phase: "start"` record's fields, kept to make the request's end
/// record from: the two differ only in `phase` and the [`Outcome`] members, so
/// the end record is these bytes with both replaced instead of a second encoding.
#[derive(Debug, Clone)]
pub struct Started {
    fields: Vec<u8>,
    /// Where the outcome members are (`"status":…` to the end of `duration_ms`).
    outcome: std::ops::Range<usize>,
}

const PHASE_START: &[u8] = br#""phase":"start""#;

impl Started {
    /// The end record: what [`Request::encode`] gives for the same request with
    /// `phase: "end"` and `outcome`.
    pub fn end(mut self, outcome: &Outcome) -> Encoded {
        let mut members = Vec::with_capacity(96);
        outcome.write(&mut crate::json::Members::new(&mut members));
        self.fields.splice(self.outcome.clone(), members);
        // `"phase":"start"` → `"phase":"end"` (the first member).
        let value = PHASE_START.len() - 6..PHASE_START.len() - 1;
        self.fields.splice(value, b"end".iter().copied());
        Encoded {
            event: "request",
            fields: self.fields,
        }
    }
}

impl Request<'_> {
    /// The record's fields, written by hand: byte for byte what the derived
    /// `Serialize` and [`encode`] give, in a fraction of the instructions (two
    /// of these per bypass request).
    pub fn encode(&self) -> Encoded {
        self.encode_marked().0
    }

    /// The `phase: "start"` record, and its bytes kept for the end record.
    pub fn start(&self) -> (Encoded, Started) {
        let (encoded, outcome) = self.encode_marked();
        debug_assert!(encoded.fields.starts_with(PHASE_START));
        let started = Started {
            fields: encoded.fields.clone(),
            outcome,
        };
        (encoded, started)
    }

    /// The fields and where the outcome members are in them.
    fn encode_marked(&self) -> (Encoded, std::ops::Range<usize>) {
        let mut fields = Vec::with_capacity(512);
        let mut m = crate::json::Members::new(&mut fields);
        m.str("phase", self.phase);
        m.str("request_id", self.request_id);
        m.opt_str("client_id", self.client_id.map(|c| c.kept()));
        m.opt_str("key_name", self.key_name);
        write_address(m.key("remote_addr"), &self.remote_addr);
        m.str("method", self.method.kept());
        m.str("path", self.path.kept());
        m.opt_str("query", self.query.map(|c| c.kept()));
        m.opt_str("route", self.route);
        m.bool("admin_key", self.admin_key);
        m.opt_str("admin_account", self.admin_account);
        match self.admin_key_expires {
            Some(t) => {
                crate::rfc3339::with_seconds(t, |text| m.str("admin_key_expires", text));
            }
            None => m.opt_str("admin_key_expires", None),
        }
        // Past the comma that separates the outcome from what precedes it.
        let from = m.position() + 1;
        Outcome {
            status: self.status,
            upstream_status: self.upstream_status,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            duration_ms: self.duration_ms,
        }
        .write(&mut m);
        let outcome = from..m.position();
        m.opt_str("user_agent", self.user_agent.map(|c| c.kept()));
        if !self.truncated.is_empty() {
            let out = m.key("truncated");
            out.push(b'{');
            let mut inner = crate::json::Members::new(out);
            for (name, len) in self.truncated.fields.iter().flatten() {
                inner.u64(name, *len as u64);
            }
            out.push(b'}');
        }
        (
            Encoded {
                event: "request",
                fields,
            },
            outcome,
        )
    }
}

/// `auth_failure`: every 401 (within the per-source rate; beyond it, counted into
/// an `auth_failure_summary`).
#[derive(Debug, Serialize)]
pub struct AuthFailure<'a> {
    pub request_id: &'a str,
    pub client_id: Option<Clip<'a>>,
    pub reason: &'static str,
    #[serde(serialize_with = "address")]
    pub remote_addr: SocketAddr,
    pub method: Clip<'a>,
    pub path: Clip<'a>,
    pub user_agent: Option<Clip<'a>>,
    #[serde(skip_serializing_if = "Truncated::is_empty")]
    pub truncated: Truncated<'a>,
}

/// `auth_failure_summary`: `auth_failure` records of one source that were over
/// its rate, counted instead of written.
#[derive(Debug, Serialize)]
pub struct AuthFailureSummary {
    pub remote_addr: String,
    pub suppressed: u64,
    #[serde(serialize_with = "seconds")]
    pub since: Option<SystemTime>,
}

/// `audit_dropped`: best-effort records the writer's full queue turned away.
#[derive(Debug, Serialize)]
pub struct Dropped {
    pub dropped: u64,
}

/// `admin_key`: enabled, refreshed, adopted, disabled, failed.
#[derive(Debug, Serialize)]
pub struct AdminKey<'a> {
    pub action: &'static str,
    #[serde(serialize_with = "seconds")]
    pub expires: Option<SystemTime>,
    pub account_id: Option<&'a str>,
    pub reason: &'a str,
    pub replica: &'a str,
}

/// `config_reload`: names the fields in error, not the messages (a message may
/// quote a value).
#[derive(Debug, Serialize)]
pub struct ConfigReload<'a> {
    pub result: &'static str,
    pub trigger: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// `key_management`: a key created, revoked, regenerated, re-validated or removed.
#[derive(Debug, Serialize)]
pub struct KeyManagement<'a> {
    pub action: &'a str,
    pub client_id: &'a str,
    pub key_id: &'a str,
    pub principal: &'a str,
}

/// `startup`.
#[derive(Debug, Serialize)]
pub struct Startup<'a> {
    pub version: &'static str,
    pub pid: u32,
    pub config: &'a str,
    pub upstream: &'a str,
    pub admin_account_email: &'a str,
    pub torn_line_cut_bytes: Option<u64>,
    pub replica: &'a str,
}

/// `shutdown`.
#[derive(Debug, Serialize)]
pub struct Shutdown<'a> {
    pub pid: u32,
    pub replica: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-z/?=&\"\\\u{0}-\u{1f}\u{2028}\u{2029}é]{0,40}",
            // Longer than the bounds, so that cuts and `truncated` show.
            "[a-zé\u{2028}]{1000,1500}",
        ]
    }

    proptest! {
        #[test]
        fn hand_written_request_records_equal_the_derived_ones(
            strings in proptest::collection::vec(text(), 8),
            some in proptest::collection::vec(any::<bool>(), 10),
            numbers in proptest::collection::vec(any::<u64>(), 4),
            v4 in any::<bool>(),
            secs in 0u64..400_000_000_000,
        ) {
            let addr: SocketAddr = if v4 {
                SocketAddr::from(([10, 1, (numbers[0] % 256) as u8, 255], (numbers[1] % 65536) as u16))
            } else {
                SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, (numbers[0] % 65536) as u16], 443))
            };
            let mut truncated = Truncated::default();
            let record = Request {
                phase: if some[0] { "start" } else { "end" },
                request_id: &strings[0],
                client_id: truncated.note("client_id", some[1].then(|| Clip::new(&strings[1], MAX_CLIENT_ID))),
                key_name: some[2].then_some(strings[2].as_str()),
                remote_addr: addr,
                method: Clip::new(&strings[3], MAX_METHOD),
                path: truncated
                    .note("path", Some(Clip::new(&strings[4], MAX_PATH)))
                    .unwrap_or_else(|| Clip::new("", 0)),
                query: truncated.note("query", some[3].then(|| Clip::new(&strings[5], MAX_QUERY))),
                route: some[4].then_some(strings[6].as_str()),
                admin_key: some[5],
                admin_account: some[5].then_some(strings[2].as_str()),
                admin_key_expires: some[6].then(|| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)),
                status: some[7].then_some((numbers[2] % 1000) as u16),
                upstream_status: some[8].then_some((numbers[3] % 1000) as u16),
                bytes_in: numbers[2],
                bytes_out: numbers[3],
                duration_ms: some[9].then_some(numbers[1]),
                user_agent: truncated.note("user_agent", some[9].then(|| Clip::new(&strings[7], MAX_USER_AGENT))),
                truncated,
            };
            let derived = encode("request", &record);
            let by_hand = record.encode();
            prop_assert_eq!(
                String::from_utf8_lossy(&by_hand.fields),
                String::from_utf8_lossy(&derived.fields)
            );
            prop_assert_eq!(&by_hand, &derived);

            // The end record made from the start record's bytes is the one
            // encoded from scratch.
            let start = Request { phase: "start", status: None, upstream_status: None, bytes_out: 0, duration_ms: None, ..record };
            let (start_record, started) = start.start();
            prop_assert_eq!(start_record, start.encode());
            let outcome = Outcome {
                status: Some((numbers[2] % 600) as u16),
                upstream_status: some[8].then_some((numbers[3] % 600) as u16),
                bytes_in: numbers[3],
                bytes_out: numbers[0],
                duration_ms: some[7].then_some(numbers[1]),
            };
            let end = Request {
                phase: "end",
                status: outcome.status,
                upstream_status: outcome.upstream_status,
                bytes_in: outcome.bytes_in,
                bytes_out: outcome.bytes_out,
                duration_ms: outcome.duration_ms,
                ..start
            };
            let spliced = started.end(&outcome);
            let expected = end.encode();
            prop_assert_eq!(
                String::from_utf8_lossy(&spliced.fields),
                String::from_utf8_lossy(&expected.fields)
            );
        }
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        #[derive(Serialize)]
        struct A {
            #[serde(serialize_with = "address")]
            a: SocketAddr,
        }
        for text in [
            "0.0.0.0:0",
            "127.0.0.1:42190",
            "255.255.255.255:65535",
            "10.20.3.4:8080",
            "[::1]:443",
            "[2001:db8::7]:65535",
        ] {
            let a: SocketAddr = text.parse().unwrap();
            let json = serde_json::to_string(&A { a }).unwrap();
            assert_eq!(json, format!("{{\"a\":\"{a}\"}}"), "{text}");
        }
    }

    #[test]
    fn client_strings_are_cut_and_the_cut_is_recorded() {
        let long = "é".repeat(1000);
        let mut truncated = Truncated::default();
        let ua = truncated.note("user_agent", Some(Clip::new(&long, MAX_USER_AGENT)));
        let record = AuthFailure {
            request_id: "r",
            client_id: None,
            reason: "missing",
            remote_addr: "127.0.0.1:1".parse().unwrap(),
            method: Clip::new("GET", MAX_METHOD),
            path: Clip::new("/x\u{2028}y\u{2029}", MAX_PATH),
            user_agent: ua,
            truncated,
        };
        let e = encode("auth_failure", &record);
        let text = String::from_utf8(e.fields.clone()).unwrap();
        assert!(
            !text.contains('\u{2028}') && !text.contains('\u{2029}'),
            "{text}"
        );
        assert!(text.contains("\\u2028y\\u2029"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&format!("{{{text}}}")).unwrap();
        assert_eq!(v["path"], "/x\u{2028}y\u{2029}");
        assert_eq!(v["user_agent"].as_str().unwrap().len(), 256);
        assert_eq!(v["truncated"]["user_agent"], 2000);
        assert!(e.fields.len() < 1024, "{}", e.fields.len());
    }

    #[test]
    fn uncut_records_have_no_truncated_member() {
        let record = AuthFailure {
            request_id: "r",
            client_id: Some(Clip::new("scanner_x", MAX_CLIENT_ID)),
            reason: "wrong_secret",
            remote_addr: "[::1]:2".parse().unwrap(),
            method: Clip::new("GET", MAX_METHOD),
            path: Clip::new("/wiki", MAX_PATH),
            user_agent: None,
            truncated: Truncated::default(),
        };
        let text = String::from_utf8(encode("auth_failure", &record).fields).unwrap();
        assert!(!text.contains("truncated"), "{text}");
        assert!(text.starts_with("\"request_id\":\"r\""), "{text}");
    }
}
