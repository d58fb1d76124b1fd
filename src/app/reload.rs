//! Reload on SIGHUP and when the config, keys or certificate files change:
//! re-read and validate everything off the request path; if valid, the new
//! generation applies to new requests atomically; if not, the old one stays in
//! force and the error is logged. A change made while a reload runs is not lost:
//! what was loaded is fingerprinted before it is read, so the next poll sees the
//! difference.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::Control;
use crate::server::Shutdown;

/// How often the files are looked at. Kubernetes updates mounted Secrets and
/// ConfigMaps by swapping a symlink, which a poll of the target sees.
const POLL: Duration = Duration::from_secs(2);

/// Modification time and length of each watched file, as last loaded.
pub(super) type Fingerprint = Vec<Option<(SystemTime, u64)>>;

pub(super) fn fingerprint(files: &[PathBuf]) -> Fingerprint {
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// Watches for SIGHUP and file changes until shutdown.
pub(super) async fn watch(control: Control, mut shutdown: Shutdown) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading on file changes only");
            None
        }
    };
    // A change that failed to load is not retried until the files change again.
    let mut refused: Option<Fingerprint> = None;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let trigger = tokio::select! {
            _ = shutdown.wait() => return,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => "SIGHUP",
            _ = tick.tick() => {
                let generation = control.generation();
                let files = super::generation::watched_files(&generation.config);
                let Ok(now) = tokio::task::spawn_blocking(move || fingerprint(&files)).await else {
                    continue;
                };
                if now == generation.loaded_files || refused.as_ref() == Some(&now) {
                    continue;
                }
                refused = Some(now);
                "file change"
            }
        };
        if control.reload(trigger).await.is_ok() {
            refused = None;
        }
    }
}

/// Cluster mode: polls the keys' version in the database every
/// `state::keys::POLL` and reloads the keys when it moved.
pub(super) async fn watch_database_keys(
    control: Control,
    db: std::sync::Arc<crate::state::Db>,
    mut shutdown: Shutdown,
) {
    let mut seen: Option<i64> = None;
    let mut failing = false;
    let mut tick = tokio::time::interval(crate::state::keys::POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tick.tick() => {}
        }
        let version = match crate::state::keys::version(&db).await {
            Ok(v) => v,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot read the keys' version; the keys in force stay");
                    failing = true;
                }
                continue;
            }
        };
        failing = false;
        // The first read reloads too: a change between start and now is not missed.
        if seen != Some(version) {
            if let Err(e) = control.reload_keys().await {
                tracing::warn!(error = %e, "cannot reload the keys; the keys in force stay");
                continue;
            }
        }
        seen = Some(version);
    }
}
