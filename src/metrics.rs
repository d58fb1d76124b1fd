//! Prometheus text-format metrics: labelled counters, histograms and gauges,
//! rendered on `/metrics` of the ops listener.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;

/// Latency buckets in seconds.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

const HELP: &[(&str, &str, &str)] = &[
    (
        "keygate_requests_total",
        "counter",
        "Requests answered, by route, status class and whether the bypass was added.",
    ),
    (
        "keygate_request_duration_seconds",
        "histogram",
        "Time from request head to response head, by bypass.",
    ),
    (
        "keygate_upstream_duration_seconds",
        "histogram",
        "Time Confluence took to answer with a response head.",
    ),
    (
        "keygate_auth_failures_total",
        "counter",
        "Refused credentials, by reason.",
    ),
    (
        "keygate_admin_key_events_total",
        "counter",
        "Admin-key actions (enabled, refreshed, adopted, disabled, failed).",
    ),
    (
        "keygate_admin_key_seconds_left",
        "gauge",
        "Seconds until the held admin key expires (absent without one).",
    ),
    (
        "keygate_config_reloads_total",
        "counter",
        "Configuration reloads, by result.",
    ),
    (
        "keygate_open_connections",
        "gauge",
        "Open client connections on the proxy listener.",
    ),
    (
        "keygate_audit_records_total",
        "counter",
        "Audit records written.",
    ),
    (
        "keygate_audit_fsyncs_total",
        "counter",
        "Fsyncs of the audit trail (group commit: several records per fsync).",
    ),
    (
        "keygate_audit_fsync_seconds",
        "histogram",
        "Fsync latency of the audit trail.",
    ),
    (
        "keygate_audit_errors_total",
        "counter",
        "Audit batches that could not be written.",
    ),
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

type Key = (&'static str, String);

#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<Key, u64>>,
    histograms: Mutex<BTreeMap<Key, Histogram>>,
    pub open_connections: std::sync::Arc<AtomicI64>,
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let escaped = v
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = write!(out, "{k}=\"{escaped}\"");
    }
    out
}

impl Metrics {
    pub fn inc(&self, name: &'static str, pairs: &[(&str, &str)]) {
        self.add(name, pairs, 1);
    }

    pub fn add(&self, name: &'static str, pairs: &[(&str, &str)], n: u64) {
        let mut map = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((name, labels(pairs))).or_insert(0) += n;
    }

    /// A counter's current value (for benchmarks and tests).
    pub fn counter(&self, name: &'static str, pairs: &[(&str, &str)]) -> u64 {
        let map = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(name, labels(pairs))).copied().unwrap_or(0)
    }

    pub fn observe(&self, name: &'static str, pairs: &[(&str, &str)], seconds: f64) {
        let mut map = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        let h = map
            .entry((name, labels(pairs)))
            .or_insert_with(|| Histogram {
                counts: vec![0; BUCKETS.len()],
                ..Histogram::default()
            });
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                h.counts[i] += 1;
            }
        }
        h.sum += seconds;
        h.count += 1;
    }

    /// The exposition text; `gauges` are values read at scrape time.
    pub fn render(&self, gauges: &[(&'static str, f64)]) -> String {
        let counters = self
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let histograms = self
            .histograms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let open = self.open_connections.load(Ordering::Relaxed) as f64;
        let mut gauges = gauges.to_vec();
        gauges.push(("keygate_open_connections", open));
        let mut out = String::new();
        for (name, kind, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for ((n, l), v) in counters.iter().filter(|((n, _), _)| n == name) {
                let _ = writeln!(out, "{n}{} {v}", braces(l));
            }
            for ((n, l), h) in histograms.iter().filter(|((n, _), _)| n == name) {
                let sep = if l.is_empty() { "" } else { "," };
                for (bound, count) in BUCKETS.iter().zip(&h.counts) {
                    let _ = writeln!(out, "{n}_bucket{{{l}{sep}le=\"{bound}\"}} {count}");
                }
                let _ = writeln!(out, "{n}_bucket{{{l}{sep}le=\"+Inf\"}} {}", h.count);
                let _ = writeln!(out, "{n}_sum{} {}", braces(l), h.sum);
                let _ = writeln!(out, "{n}_count{} {}", braces(l), h.count);
            }
            for (gauge, value) in gauges.iter().filter(|(g, _)| g == name) {
                let _ = writeln!(out, "{gauge} {value}");
            }
        }
        out
    }
}

fn braces(l: &str) -> String {
    if l.is_empty() {
        String::new()
    } else {
        format!("{{{l}}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.inc(
            "keygate_requests_total",
            &[("route", "r\"1"), ("status", "2xx")],
        );
        m.inc(
            "keygate_requests_total",
            &[("route", "r\"1"), ("status", "2xx")],
        );
        m.observe(
            "keygate_request_duration_seconds",
            &[("bypass", "true")],
            0.02,
        );
        let text = m.render(&[("keygate_admin_key_seconds_left", 42.0)]);
        assert!(
            text.contains("keygate_requests_total{route=\"r\\\"1\",status=\"2xx\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("keygate_request_duration_seconds_bucket{bypass=\"true\",le=\"0.01\"} 0"),
            "{text}"
        );
        assert!(
            text.contains(
                "keygate_request_duration_seconds_bucket{bypass=\"true\",le=\"0.025\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("keygate_request_duration_seconds_count{bypass=\"true\"} 1"),
            "{text}"
        );
        assert!(text.contains("keygate_admin_key_seconds_left 42"), "{text}");
        assert!(
            text.contains("# TYPE keygate_open_connections gauge"),
            "{text}"
        );
    }
}
