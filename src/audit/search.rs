//! `keygate audit search`: the records that answer "who made which requests" —
//! by client, path prefix, route, event, time range, bypass only — from audit
//! files (here) or the database (`state/audit.rs`, same `Filter`).

use std::io::BufRead as _;
use std::path::PathBuf;
use std::time::SystemTime;

use serde_json::Value;

/// What to look for; `None` matches anything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub client_id: Option<String>,
    /// Records whose `path` starts with this.
    pub path_prefix: Option<String>,
    pub route: Option<String>,
    pub event: Option<String>,
    /// From this time on (inclusive).
    pub since: Option<SystemTime>,
    /// Before this time.
    pub until: Option<SystemTime>,
    /// Only requests made with the admin key.
    pub bypass: bool,
}

impl Filter {
    pub fn matches(&self, record: &Value) -> bool {
        let text = |name: &str| record.get(name).and_then(Value::as_str);
        let equal = |wanted: &Option<String>, name: &str| {
            wanted.as_deref().is_none_or(|w| text(name) == Some(w))
        };
        let ts = text("ts").and_then(|t| crate::rfc3339::parse(t).ok());
        equal(&self.client_id, "client_id")
            && equal(&self.route, "route")
            && equal(&self.event, "event")
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| text("path").is_some_and(|path| path.starts_with(p)))
            && self.since.is_none_or(|s| ts.is_some_and(|t| t >= s))
            && self.until.is_none_or(|u| ts.is_some_and(|t| t < u))
            && (!self.bypass || record.get("admin_key") == Some(&Value::Bool(true)))
    }

    /// `matches` on a line of the trail; a line that is not JSON matches nothing.
    pub fn matches_line(&self, line: &str) -> bool {
        serde_json::from_str::<Value>(line).is_ok_and(|v| self.matches(&v))
    }
}

/// Matching lines from audit files (or directories of them), in `seq` order
/// across files; at most `limit`.
pub fn search_files(
    paths: &[PathBuf],
    filter: &Filter,
    limit: usize,
) -> Result<Vec<String>, String> {
    let files = super::verify::expand(paths).map_err(|b| b.to_string())?;
    let mut found: Vec<(u64, String)> = Vec::new();
    for path in files {
        let file = std::fs::File::open(&path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        for line in std::io::BufReader::new(file).lines() {
            let line = line.map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
            let Ok(record) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if filter.matches(&record) {
                let seq = record.get("seq").and_then(Value::as_u64).unwrap_or(0);
                found.push((seq, line));
            }
        }
    }
    found.sort_by_key(|(seq, _)| *seq);
    found.truncate(limit);
    Ok(found.into_iter().map(|(_, line)| line).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ts: &str, client: &str, path: &str, admin_key: bool) -> Value {
        serde_json::json!({
            "ts": ts, "seq": 1, "event": "request", "client_id": client,
            "path": path, "route": "pages", "admin_key": admin_key,
        })
    }

    #[test]
    fn filters_combine() {
        let t = |s: &str| crate::rfc3339::parse(s).ok();
        let r = record(
            "2026-11-29T10:00:00.000Z",
            "scanner_x",
            "/wiki/api/v2/pages/7",
            true,
        );
        let cases: Vec<(Filter, bool)> = vec![
            (Filter::default(), true),
            (
                Filter {
                    client_id: Some("scanner_x".into()),
                    ..Filter::default()
                },
                true,
            ),
            (
                Filter {
                    client_id: Some("scanner".into()),
                    ..Filter::default()
                },
                false,
            ),
            (
                Filter {
                    path_prefix: Some("/wiki/api/v2/pages".into()),
                    ..Filter::default()
                },
                true,
            ),
            (
                Filter {
                    path_prefix: Some("/wiki/rest".into()),
                    ..Filter::default()
                },
                false,
            ),
            (
                Filter {
                    route: Some("pages".into()),
                    bypass: true,
                    ..Filter::default()
                },
                true,
            ),
            (
                Filter {
                    event: Some("auth_failure".into()),
                    ..Filter::default()
                },
                false,
            ),
            (
                Filter {
                    since: t("2026-11-29T10:00:00Z"),
                    ..Filter::default()
                },
                true,
            ),
            (
                Filter {
                    until: t("2026-11-29T10:00:00Z"),
                    ..Filter::default()
                },
                false,
            ),
            (
                Filter {
                    since: t("2026-11-29T09:00:00Z"),
                    until: t("2026-11-29T11:00:00Z"),
                    ..Filter::default()
                },
                true,
            ),
        ];
        for (i, (filter, expected)) in cases.iter().enumerate() {
            assert_eq!(filter.matches(&r), *expected, "case {i}: {filter:?}");
        }
        let passthrough = record("2026-11-29T10:00:00.000Z", "scanner_x", "/wiki/x", false);
        assert!(!Filter {
            bypass: true,
            ..Filter::default()
        }
        .matches(&passthrough));
        assert!(!Filter::default().matches_line("not json"));
    }
}
