//! Durations (`500ms`, `30s`, `10m`, `1h`, `1h30m`) and sizes (`32KiB`, `100MiB`).

use std::time::Duration;

/// Parses a duration made of one or more `<number><unit>` parts, units `ms`, `s`,
/// `m`, `h`, `d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    const EXPECTED: &str = "expected a duration like `500ms`, `30s`, `10m` or `1h`";
    let text = text.trim();
    if text.is_empty() {
        return Err(EXPECTED.into());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("{EXPECTED}, got `{text}`"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{EXPECTED}, got `{text}` (number too large)"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let part = match &rest[..unit_len] {
            "ms" => Duration::from_millis(number),
            "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number.saturating_mul(60)),
            "h" => Duration::from_secs(number.saturating_mul(3600)),
            "d" => Duration::from_secs(number.saturating_mul(86_400)),
            _ => return Err(format!("{EXPECTED}, got `{text}`")),
        };
        total = total.saturating_add(part);
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// Parses a size: a number with an optional unit `B`, `KiB`, `MiB`, `GiB`, `KB`, `MB`, `GB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    const EXPECTED: &str = "expected a size like `32KiB`, `100MiB` or `1GiB`";
    let text = text.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(format!("{EXPECTED}, got `{text}`"));
    }
    let number: u64 = text[..digits]
        .parse()
        .map_err(|_| format!("{EXPECTED}, got `{text}` (number too large)"))?;
    let factor: u64 = match text[digits..].trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(format!("{EXPECTED}, got `{text}`")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{EXPECTED}, got `{text}` (too large)"))
}

/// Formats a duration the way the config writes it, for summaries.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(86_400_000) && ms > 0 {
        format!("{}d", ms / 86_400_000)
    } else if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok: &[(&str, u64)] = &[
            ("500ms", 500),
            ("30s", 30_000),
            ("10m", 600_000),
            ("1h", 3_600_000),
            ("1h30m", 5_400_000),
            ("7d", 604_800_000),
            ("0s", 0),
        ];
        for (text, ms) in ok {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(*ms)),
                "{text}"
            );
        }
        for bad in ["", "10", "m", "10x", "1.5s", "-1s", "10 m", "s10"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sizes() {
        let ok: &[(&str, u64)] = &[
            ("32KiB", 32 * 1024),
            ("100MiB", 100 << 20),
            ("1GiB", 1 << 30),
            ("512", 512),
            ("512B", 512),
            ("2MB", 2_000_000),
        ];
        for (text, n) in ok {
            assert_eq!(parse_size(text), Ok(*n), "{text}");
        }
        for bad in ["", "KiB", "1.5MiB", "10XB", "-1", "99999999999999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn formatting_round_trips() {
        for text in ["500ms", "30s", "10m", "1h"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }
}
