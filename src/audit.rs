//! keygate's own audit trail: hash-chained JSON Lines, written by one writer
//! thread (`audit/writer.rs`), checked by `keygate audit verify` (`audit/verify.rs`).
//!
//! Invariants: a bypass request is forwarded only after its `phase: "start"` record
//! is on disk; when the trail cannot be written, bypass requests fail closed (503
//! `audit_unavailable`) while passthrough goes on, and writing resumes by itself;
//! no record ever holds a secret, an `Authorization` value, a cookie or a body.

pub mod chain;
pub mod verify;
pub mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::config::AuditSettings;
use crate::metrics::Metrics;
use crate::ops::Readiness;
use writer::{Job, Recovery, Writer};

/// Records waiting for the writer at most; beyond, durable writers wait and
/// best-effort records are handed to a task that waits.
const QUEUE: usize = 8192;
const READINESS: &str = "audit";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    #[error("audit write failed: {0}")]
    Write(String),
    #[error("the audit writer has stopped")]
    Closed,
}

/// State the writer reports into: metrics, readiness, and a log line per change.
pub struct Shared {
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    failed: AtomicBool,
}

impl Shared {
    fn failed(&self, why: &str) {
        self.metrics.inc("keygate_audit_errors_total", &[]);
        if !self.failed.swap(true, Ordering::AcqRel) {
            tracing::error!(error = %why, "the audit trail cannot be written: bypass requests are refused until it can");
        }
        self.readiness.set(
            READINESS,
            format!("the audit trail cannot be written: {why}"),
        );
    }

    fn written(&self, records: u64) {
        self.metrics
            .add("keygate_audit_records_total", &[], records);
        if self.failed.swap(false, Ordering::AcqRel) {
            tracing::info!("the audit trail is writable again");
            self.readiness.clear(READINESS);
        }
    }

    fn synced(&self, took: Duration) {
        self.metrics.inc("keygate_audit_fsyncs_total", &[]);
        self.metrics
            .observe("keygate_audit_fsync_seconds", &[], took.as_secs_f64());
    }
}

/// A handle for writing records; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    tx: mpsc::Sender<Job>,
    pub record_passthrough: bool,
}

/// The writer thread, to wait for at shutdown.
pub struct AuditThread(std::thread::JoinHandle<()>);

impl AuditThread {
    pub fn join(self) {
        let _ = self.0.join();
    }
}

impl Audit {
    /// Opens the trail (cutting a torn last line) and starts the writer thread.
    pub fn start(
        settings: AuditSettings,
        readiness: Arc<Readiness>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Audit, AuditThread, Recovery)> {
        let shared = Arc::new(Shared {
            readiness,
            metrics,
            failed: AtomicBool::new(false),
        });
        let record_passthrough = settings.record_passthrough;
        let (writer, recovery) = Writer::start(settings, shared);
        let (tx, rx) = mpsc::channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("keygate-audit".into())
            .spawn(move || writer.run(rx))?;
        Ok((
            Audit {
                tx,
                record_passthrough,
            },
            AuditThread(thread),
            recovery,
        ))
    }

    /// Writes a record and returns once it is on disk (fsync, shared with every
    /// record in the same batch).
    pub async fn durable(
        &self,
        event: &'static str,
        fields: Vec<(&'static str, Value)>,
    ) -> Result<(), AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Job::Write {
                event,
                fields,
                durable: Some(done),
            })
            .await
            .map_err(|_| AuditError::Closed)?;
        wait.await.map_err(|_| AuditError::Closed)?
    }

    /// Queues a record without waiting for it.
    pub fn record(&self, event: &'static str, fields: Vec<(&'static str, Value)>) {
        let job = Job::Write {
            event,
            fields,
            durable: None,
        };
        if let Err(mpsc::error::TrySendError::Full(job)) = self.tx.try_send(job) {
            let tx = self.tx.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = tx.send(job).await;
                });
            }
        }
    }

    /// Asks for an fsync of what is unsynced (called every second).
    pub fn tick(&self) {
        let _ = self.tx.try_send(Job::Tick);
    }

    /// Flushes and stops the writer.
    pub async fn close(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Job::Close(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

#[cfg(test)]
mod tests;
