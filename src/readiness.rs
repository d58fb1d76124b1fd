//! Readiness as a latch of named reasons: any component may set or clear its own;
//! the process is ready when none is set. `/readyz` answers from it.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Why the process is not ready, by component.
#[derive(Debug, Default)]
pub struct Readiness {
    reasons: Mutex<BTreeMap<&'static str, String>>,
}

impl Readiness {
    /// Sets `component`'s reason; returns whether it changed (to log once, not per request).
    pub fn set(&self, component: &'static str, reason: impl Into<String>) -> bool {
        let reason = reason.into();
        let mut map = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(component, reason.clone()).as_deref() != Some(reason.as_str())
    }

    /// Clears `component`'s reason; returns whether one was set.
    pub fn clear(&self, component: &'static str) -> bool {
        let mut map = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(component).is_some()
    }

    /// Whether `component` has a reason set.
    pub fn is_set(&self, component: &'static str) -> bool {
        let map = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        map.contains_key(component)
    }

    /// `component: reason` for each reason, sorted by component.
    pub fn reasons(&self) -> Vec<String> {
        let map = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(k, v)| format!("{k}: {v}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_reports_changes_and_clear_reports_presence() {
        let r = Readiness::default();
        assert!(r.set("audit", "disk full"));
        assert!(!r.set("audit", "disk full"), "same reason: no change");
        assert!(r.set("audit", "gone"));
        assert!(r.set("admin_key", "401"));
        assert_eq!(r.reasons(), ["admin_key: 401", "audit: gone"]);
        assert!(r.clear("audit"));
        assert!(!r.clear("audit"));
        assert!(!r.is_set("audit"));
    }
}
