//! Prometheus metrics as typed handles (prometheus-client). Label sets that a
//! request touches are resolved once — per configuration generation for routes —
//! so a request costs one atomic add per counter, never a string or a map lookup.

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Latency buckets in seconds.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Status classes, as labels and by index (`status / 100 - 1`, else `other`).
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status: String,
    bypass: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BypassLabels {
    bypass: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdminKeyLabels {
    action: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn histogram() -> Histogram {
    Histogram::new(BUCKETS.iter().copied())
}

type SecondsLeft = Box<dyn Fn() -> Option<f64> + Send + Sync>;

/// `keygate_admin_key_seconds_left`, read at scrape time and absent without a key.
#[derive(Default)]
struct AdminKeyGauge(Mutex<Option<SecondsLeft>>);

impl std::fmt::Debug for AdminKeyGauge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminKeyGauge")
    }
}

impl Collector for AdminKeyGauge {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let source = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let value = source.as_ref().and_then(|f| f());
        let metric = encoder.encode_descriptor(
            "keygate_admin_key_seconds_left",
            "Seconds until the held admin key expires (absent without one)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        if let Some(value) = value {
            ConstGauge::new(value).encode(metric)?;
        }
        Ok(())
    }
}

/// The series families keygate exports (counters with `_total`), for
/// dashboards and alerts to be checked against.
pub const FAMILIES: &[&str] = &[
    "keygate_requests_total",
    "keygate_request_duration_seconds",
    "keygate_upstream_duration_seconds",
    "keygate_auth_failures_total",
    "keygate_auth_throttled_total",
    "keygate_admin_key_events_total",
    "keygate_admin_key_seconds_left",
    "keygate_config_reloads_total",
    "keygate_open_connections",
    "keygate_connections_closed_total",
    "keygate_audit_records_total",
    "keygate_audit_fsyncs_total",
    "keygate_audit_fsync_seconds",
    "keygate_audit_errors_total",
    "keygate_audit_dropped_total",
    "keygate_audit_auth_failures_suppressed_total",
    "keygate_audit_files_retained",
    "keygate_access_log_dropped_total",
    "keygate_upstream_credentials_rejected_total",
    "keygate_body_idle_timeouts_total",
];

/// Every metric keygate exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: [Histogram; 2],
    pub upstream_duration: Histogram,
    auth_failures: Family<ReasonLabels, Counter>,
    auth_throttled: Family<ReasonLabels, Counter>,
    admin_key_events: Family<AdminKeyLabels, Counter>,
    config_reloads: Family<ResultLabels, Counter>,
    connections_closed: Family<ReasonLabels, Counter>,
    pub open_connections: Gauge,
    pub audit_records: Counter,
    pub audit_fsyncs: Counter,
    pub audit_fsync_seconds: Histogram,
    pub audit_errors: Counter,
    pub audit_dropped: Counter,
    pub audit_auth_failures_suppressed: Counter,
    pub audit_files_retained: Gauge,
    pub access_log_dropped: Counter,
    pub upstream_credentials_rejected: Counter,
    pub body_idle_timeouts: Counter,
    seconds_left: Arc<AdminKeyGauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration = HistogramFamily::<BypassLabels>::new_with_constructor(histogram);
        let upstream_duration = histogram();
        let auth_failures = Family::<ReasonLabels, Counter>::default();
        let auth_throttled = Family::<ReasonLabels, Counter>::default();
        let admin_key_events = Family::<AdminKeyLabels, Counter>::default();
        let config_reloads = Family::<ResultLabels, Counter>::default();
        let connections_closed = Family::<ReasonLabels, Counter>::default();
        let open_connections = Gauge::default();
        let audit_records = Counter::default();
        let audit_fsyncs = Counter::default();
        let audit_fsync_seconds = histogram();
        let audit_errors = Counter::default();
        let audit_dropped = Counter::default();
        let audit_auth_failures_suppressed = Counter::default();
        let audit_files_retained = Gauge::default();
        let access_log_dropped = Counter::default();
        let upstream_credentials_rejected = Counter::default();
        let body_idle_timeouts = Counter::default();
        let seconds_left = Arc::new(AdminKeyGauge::default());

        registry.register(
            "keygate_requests",
            "Requests answered, by route, status class and whether the bypass was added",
            requests.clone(),
        );
        registry.register(
            "keygate_request_duration_seconds",
            "Time from request head to response head, by bypass",
            request_duration.clone(),
        );
        registry.register(
            "keygate_upstream_duration_seconds",
            "Time Confluence took to answer with a response head",
            upstream_duration.clone(),
        );
        registry.register(
            "keygate_auth_failures",
            "Refused credentials, by reason",
            auth_failures.clone(),
        );
        registry.register(
            "keygate_auth_throttled",
            "Requests answered 429 before a secret was verified, by reason (source, client, busy)",
            auth_throttled.clone(),
        );
        registry.register(
            "keygate_admin_key_events",
            "Admin-key actions (enabled, refreshed, adopted, disabled, failed) this replica made",
            admin_key_events.clone(),
        );
        registry.register_collector(Box::new(Arc::clone(&seconds_left)));
        registry.register(
            "keygate_config_reloads",
            "Configuration reloads, by result",
            config_reloads.clone(),
        );
        registry.register(
            "keygate_open_connections",
            "Open client connections on the proxy listener",
            open_connections.clone(),
        );
        registry.register(
            "keygate_connections_closed",
            "Client connections keygate closed, by reason (idle, header_timeout, evicted)",
            connections_closed.clone(),
        );
        registry.register(
            "keygate_audit_records",
            "Audit records written",
            audit_records.clone(),
        );
        registry.register(
            "keygate_audit_fsyncs",
            "Fsyncs or commits of the audit trail (group commit: several records per fsync)",
            audit_fsyncs.clone(),
        );
        registry.register(
            "keygate_audit_fsync_seconds",
            "Fsync (or commit) latency of the audit trail",
            audit_fsync_seconds.clone(),
        );
        registry.register(
            "keygate_audit_errors",
            "Audit batches that could not be written",
            audit_errors.clone(),
        );
        registry.register(
            "keygate_audit_dropped",
            "Best-effort audit records dropped because the writer's queue was full (the trail records how many)",
            audit_dropped.clone(),
        );
        registry.register(
            "keygate_audit_auth_failures_suppressed",
            "auth_failure records folded into per-source summary records",
            audit_auth_failures_suppressed.clone(),
        );
        registry.register(
            "keygate_audit_files_retained",
            "Rotated audit files kept beyond `keep` because they hold bypass records younger than `bypass_retention`",
            audit_files_retained.clone(),
        );
        registry.register(
            "keygate_access_log_dropped",
            "Access log lines dropped because the log thread fell behind",
            access_log_dropped.clone(),
        );
        registry.register(
            "keygate_upstream_credentials_rejected",
            "Forwarded requests Confluence answered 401 (the admin credential was refused)",
            upstream_credentials_rejected.clone(),
        );
        registry.register(
            "keygate_body_idle_timeouts",
            "Request or response bodies that stalled longer than the body idle timeout",
            body_idle_timeouts.clone(),
        );
        let request_duration = ["false", "true"].map(|bypass| {
            request_duration
                .get_or_create(&BypassLabels {
                    bypass: bypass.to_owned(),
                })
                .clone()
        });
        Metrics {
            registry,
            requests,
            request_duration,
            upstream_duration,
            auth_failures,
            auth_throttled,
            admin_key_events,
            config_reloads,
            connections_closed,
            open_connections,
            audit_records,
            audit_fsyncs,
            audit_fsync_seconds,
            audit_errors,
            audit_dropped,
            audit_auth_failures_suppressed,
            audit_files_retained,
            access_log_dropped,
            upstream_credentials_rejected,
            body_idle_timeouts,
            seconds_left,
        }
    }

    /// Handles for every route of a generation (by index) and for requests no
    /// route decided.
    pub fn route_counters(&self, routes: &[&str]) -> RouteCounters {
        let resolve = |route: &str| -> [[Counter; 6]; 2] {
            ["false", "true"].map(|bypass| {
                CLASSES.map(|status| {
                    self.requests
                        .get_or_create(&RequestLabels {
                            route: route.to_owned(),
                            status: status.to_owned(),
                            bypass: bypass.to_owned(),
                        })
                        .clone()
                })
            })
        };
        RouteCounters {
            routes: routes.iter().map(|r| resolve(r)).collect(),
            none: resolve("none"),
        }
    }

    /// The request duration histogram for bypass or not.
    pub fn request_duration(&self, bypass: bool) -> &Histogram {
        &self.request_duration[usize::from(bypass)]
    }

    pub fn auth_failure(&self, reason: &str) -> Counter {
        self.auth_failures
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .clone()
    }

    pub fn auth_throttled(&self, reason: &str) -> Counter {
        self.auth_throttled
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .clone()
    }

    pub fn connection_closed(&self, reason: &str) -> Counter {
        self.connections_closed
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .clone()
    }

    /// Counts an admin-key event. Each replica exports its own counts, so the
    /// scrape target says which replica made the call.
    pub fn admin_key_event(&self, action: &str) {
        let result = if action == "failed" { "error" } else { "ok" };
        self.admin_key_events
            .get_or_create(&AdminKeyLabels {
                action: action.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.config_reloads
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Where the admin key's remaining seconds are read at scrape time.
    pub fn set_admin_key_source(&self, source: impl Fn() -> Option<f64> + Send + Sync + 'static) {
        *self
            .seconds_left
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Box::new(source));
    }

    /// The exposition text (OpenMetrics, which Prometheus reads).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// The content type of `render`'s text.
    pub const CONTENT_TYPE: &'static str =
        "application/openmetrics-text; version=1.0.0; charset=utf-8";
}

/// Pre-resolved request counters of one generation: `[bypass][status class]` per
/// route.
pub struct RouteCounters {
    routes: Vec<[[Counter; 6]; 2]>,
    none: [[Counter; 6]; 2],
}

impl RouteCounters {
    /// Counts one answered request: one atomic add.
    pub fn count(&self, route: Option<usize>, bypass: bool, status: u16) {
        let class = match status / 100 {
            c @ 1..=5 => usize::from(c) - 1,
            _ => 5,
        };
        let table = route.and_then(|i| self.routes.get(i)).unwrap_or(&self.none);
        table[usize::from(bypass)][class].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::new();
        let routes = m.route_counters(&["r\"1"]);
        routes.count(Some(0), false, 200);
        routes.count(Some(0), false, 204);
        routes.count(None, true, 503);
        m.request_duration(true).observe(0.02);
        m.set_admin_key_source(|| Some(42.0));
        m.admin_key_event("enabled");
        let text = m.render();
        for line in [
            "keygate_requests_total{route=\"r\\\"1\",status=\"2xx\",bypass=\"false\"} 2",
            "keygate_requests_total{route=\"none\",status=\"5xx\",bypass=\"true\"} 1",
            "keygate_request_duration_seconds_bucket{le=\"0.01\",bypass=\"true\"} 0",
            "keygate_request_duration_seconds_bucket{le=\"0.025\",bypass=\"true\"} 1",
            "keygate_request_duration_seconds_count{bypass=\"true\"} 1",
            "keygate_admin_key_seconds_left 42",
            "# TYPE keygate_open_connections gauge",
            "keygate_admin_key_events_total{action=\"enabled\",result=\"ok\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // Every family in FAMILIES shows up once it has a value.
        m.auth_failure("x").inc();
        m.auth_throttled("x").inc();
        m.config_reload(true);
        m.connection_closed("idle").inc();
        let text = m.render();
        for family in FAMILIES {
            assert!(
                text.lines().any(|l| l.starts_with(family)),
                "{family} missing from\n{text}"
            );
        }
        m.set_admin_key_source(|| None);
        assert!(!m
            .render()
            .lines()
            .any(|l| l.starts_with("keygate_admin_key_seconds_left ")));
    }
}
