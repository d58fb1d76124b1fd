//! RFC 3339 timestamps in UTC, as the keys file, the audit trail and Confluence's
//! admin-key API write them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `2026-11-23T10:00:00.123Z`: UTC with milliseconds.
pub fn format_millis(t: SystemTime) -> String {
    let (secs, millis) = split(t);
    match Stamp::new(secs, Some(millis)) {
        Some(stamp) => stamp.as_str().to_owned(),
        None => {
            let (date, time) = civil(secs);
            format!("{date}T{time}.{millis:03}Z")
        }
    }
}

/// `2026-11-23T10:00:00Z`: UTC, whole seconds.
pub fn format_seconds(t: SystemTime) -> String {
    with_seconds(t, str::to_owned)
}

/// Calls `f` with `t` formatted as [`format_seconds`] does, on the stack for
/// years 0 to 9999 (no allocation on the audit trail's hot path).
pub fn with_seconds<R>(t: SystemTime, f: impl FnOnce(&str) -> R) -> R {
    let (secs, _) = split(t);
    match Stamp::new(secs, None) {
        Some(stamp) => f(stamp.as_str()),
        None => {
            let (date, time) = civil(secs);
            f(&format!("{date}T{time}Z"))
        }
    }
}

/// A timestamp formatted into a fixed buffer.
struct Stamp {
    buf: [u8; 24],
    len: usize,
}

impl Stamp {
    /// `None` for years past 9999, which need more than four digits.
    fn new(secs: i64, millis: Option<u32>) -> Option<Stamp> {
        let rem = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
        if !(0..=9999).contains(&y) {
            return None;
        }
        let mut buf = *b"0000-00-00T00:00:00.000Z";
        let field = |buf: &mut [u8; 24], at: usize, width: usize, n: i64| {
            let mut n = n.unsigned_abs();
            for b in buf[at..at + width].iter_mut().rev() {
                *b = b'0' + (n % 10) as u8;
                n /= 10;
            }
        };
        field(&mut buf, 0, 4, y);
        field(&mut buf, 5, 2, m);
        field(&mut buf, 8, 2, d);
        field(&mut buf, 11, 2, rem / 3600);
        field(&mut buf, 14, 2, rem % 3600 / 60);
        field(&mut buf, 17, 2, rem % 60);
        let len = match millis {
            Some(ms) => {
                field(&mut buf, 20, 3, i64::from(ms.min(999)));
                24
            }
            None => {
                buf[19] = b'Z';
                20
            }
        };
        Some(Stamp { buf, len })
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

/// Appends `n` in decimal. Most numbers in a record are short (an octet, a
/// status, a port, a duration): those are pushed byte by byte, without the
/// copy call a slice would cost.
#[inline]
pub fn push_decimal(out: &mut Vec<u8>, n: u64) {
    const DIGIT: u8 = b'0';
    match n {
        0..=9 => out.push(DIGIT + n as u8),
        10..=99 => out.extend_from_slice(&[DIGIT + (n / 10) as u8, DIGIT + (n % 10) as u8]),
        100..=999 => out.extend_from_slice(&[
            DIGIT + (n / 100) as u8,
            DIGIT + (n / 10 % 10) as u8,
            DIGIT + (n % 10) as u8,
        ]),
        _ => push_long_decimal(out, n),
    }
}

fn push_long_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Appends `2026-11-23T10:00:00.123456Z` (UTC, microseconds) without allocating.
pub fn write_micros(out: &mut Vec<u8>, t: SystemTime) {
    use std::io::Write as _;
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, day) = civil_from_days(days);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    );
}

fn split(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_millis(),
        ),
        Err(_) => (0, 0),
    }
}

fn civil(secs: i64) -> (String, String) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    (
        format!("{y:04}-{m:02}-{d:02}"),
        format!("{:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60),
    )
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`; `t` or a space may separate.
pub fn parse(text: &str) -> Result<SystemTime, String> {
    let err = || format!("expected an RFC 3339 time like `2027-06-30T00:00:00Z`, got `{text}`");
    let b = text.trim().as_bytes();
    if b.len() < 20 {
        return Err(err());
    }
    let num = |range: std::ops::Range<usize>| -> Result<i64, String> {
        let s = std::str::from_utf8(&b[range]).map_err(|_| err())?;
        if !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(err());
        }
        s.parse::<i64>().map_err(|_| err())
    };
    let seps_ok = b[4] == b'-'
        && b[7] == b'-'
        && matches!(b[10], b'T' | b't' | b' ')
        && b[13] == b':'
        && b[16] == b':';
    if !seps_ok {
        return Err(err());
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(err());
    }
    let mut i = 19;
    let mut nanos: u32 = 0;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 9 {
                nanos = nanos * 10 + u32::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return Err(err());
        }
        for _ in (i - start).min(9)..9 {
            nanos *= 10;
        }
    }
    let offset_secs = match &b[i..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digits = [*h1, *h2, *m1, *m2];
            if !digits.iter().all(u8::is_ascii_digit) {
                return Err(err());
            }
            let h = i64::from((h1 - b'0') * 10 + (h2 - b'0'));
            let m = i64::from((m1 - b'0') * 10 + (m2 - b'0'));
            let total = h * 3600 + m * 60;
            if *sign == b'+' {
                total
            } else {
                -total
            }
        }
        _ => return Err(err()),
    };
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second
        - offset_secs;
    let secs = u64::try_from(secs).map_err(|_| err())?;
    Ok(UNIX_EPOCH + Duration::new(secs, nanos))
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn stack_stamps_match_the_formatted_ones(secs in 0i64..253_402_300_800, millis in 0u32..1000) {
            let (date, time) = civil(secs);
            let stamp = Stamp::new(secs, Some(millis)).unwrap();
            prop_assert_eq!(stamp.as_str(), format!("{date}T{time}.{millis:03}Z"));
            let stamp = Stamp::new(secs, None).unwrap();
            prop_assert_eq!(stamp.as_str(), format!("{date}T{time}Z"));
        }
    }

    #[test]
    fn years_past_9999_still_format() {
        let t = UNIX_EPOCH + Duration::from_secs(253_402_300_800 + 86_400);
        assert_eq!(format_seconds(t), "10000-01-02T00:00:00Z");
        assert_eq!(format_millis(t), "10000-01-02T00:00:00.000Z");
    }

    #[test]
    fn parse_table() {
        let cases: &[(&str, Option<u64>)] = &[
            ("1970-01-01T00:00:00Z", Some(0)),
            ("2000-02-29T12:00:00Z", Some(951_825_600)),
            ("2027-06-30T00:00:00Z", Some(1_814_313_600)),
            ("2027-06-30T02:00:00+02:00", Some(1_814_313_600)),
            ("2027-06-29T22:00:00-02:00", Some(1_814_313_600)),
            ("2027-06-30T00:00:00.999Z", Some(1_814_313_600)),
            ("2027-06-30t00:00:00z", Some(1_814_313_600)),
            ("2027-06-30", None),
            ("2027-13-01T00:00:00Z", None),
            ("2027-02-29T00:00:00Z", None),
            ("2027-06-30T00:00:00", None),
            ("2027-06-30T00:00:00+0200", None),
            ("2027-06-30T00:00:00.Z", None),
            ("not a time at all!!!", None),
        ];
        for (text, secs) in cases {
            let got = parse(text)
                .ok()
                .map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_secs());
            assert_eq!(got, *secs, "{text}");
        }
    }

    #[test]
    fn formats() {
        let t = UNIX_EPOCH + Duration::from_millis(1_814_313_600_123);
        assert_eq!(format_millis(t), "2027-06-30T00:00:00.123Z");
        assert_eq!(format_seconds(t), "2027-06-30T00:00:00Z");
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(ms in 0u64..8_000_000_000_000) {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            prop_assert_eq!(parse(&format_millis(t)).unwrap(), t);
        }
    }

    #[test]
    fn decimals_are_written_as_display_writes_them() {
        let mut out = Vec::new();
        let large = [
            u64::from(u32::MAX),
            10_u64.pow(19) - 1,
            10_u64.pow(19),
            u64::MAX,
        ];
        for n in (0..=100_000).chain(large) {
            out.clear();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes(), "{n}");
        }
    }
}
