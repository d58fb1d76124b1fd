//! keygate's own audit trail: hash-chained JSON Lines records (`audit/record.rs`),
//! chained by `audit/chain.rs`, written by one writer (`audit/writer.rs`) into a
//! sink — a file with rotation (`audit/file.rs`), standard output, or (cluster
//! mode) the database — and checked by `keygate audit verify` (`audit/verify.rs`).
//!
//! Invariants: a bypass request is forwarded only after its `phase: "start"` record
//! is durable, and a durable write that takes longer than `write_timeout` counts as
//! failed; when the trail cannot be written, bypass requests fail closed (503
//! `audit_unavailable`) while passthrough goes on, and writing resumes by itself;
//! the writer's queue is bounded — a best-effort record that finds it full is
//! dropped, counted, and the count is written into the trail as an
//! `audit_dropped` record; no record ever holds a secret, an `Authorization`
//! value, a cookie or a body.

pub mod chain;
pub mod file;
pub mod record;
pub mod search;
pub mod verify;
pub mod writer;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot};

use crate::config::AuditSettings;
use crate::metrics::Metrics;
use crate::readiness::Readiness;
pub use record::Encoded;
pub use writer::Recovery;
use writer::{Job, Waiter};

/// Records waiting for the writer at most; beyond, best-effort records are
/// dropped (and counted) and durable ones wait for room in the channel.
const QUEUE: usize = 8192;
const READINESS: &str = "audit";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    #[error("audit write failed: {0}")]
    Write(String),
    #[error("the audit write did not finish within {0:?}")]
    Timeout(Duration),
    #[error("the audit writer has stopped")]
    Closed,
}

/// Why a writer on a caller's sink did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError<E> {
    #[error("{0}")]
    Open(E),
    #[error("cannot start the audit writer thread: {0}")]
    Thread(std::io::Error),
}

/// State the writer reports into: metrics, readiness, and a log line per change.
pub struct Shared {
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    failed: AtomicBool,
    /// Best-effort records dropped since the last batch.
    dropped: AtomicU64,
    /// Best-effort records handed over and not yet taken by the writer.
    queued: AtomicUsize,
    queue_limit: usize,
    /// What a reload may change while the writer runs.
    live: ArcSwap<AuditSettings>,
}

impl Shared {
    pub fn new(
        settings: AuditSettings,
        readiness: Arc<Readiness>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Shared {
            readiness,
            metrics,
            failed: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            queued: AtomicUsize::new(0),
            queue_limit: QUEUE,
            live: ArcSwap::from_pointee(settings),
        })
    }

    pub(crate) fn failed(&self, why: &str) {
        self.metrics.audit_errors.inc();
        if !self.failed.swap(true, Ordering::AcqRel) {
            tracing::error!(error = %why, "the audit trail cannot be written: bypass requests are refused until it can");
        }
        self.readiness.set(
            READINESS,
            format!("the audit trail cannot be written: {why}"),
        );
    }

    pub(crate) fn written(&self, records: u64) {
        self.metrics.audit_records.inc_by(records);
        if self.failed.swap(false, Ordering::AcqRel) {
            tracing::info!("the audit trail is writable again");
            self.readiness.clear(READINESS);
        }
    }

    pub(crate) fn synced(&self, took: Duration) {
        self.metrics.audit_fsyncs.inc();
        self.metrics.audit_fsync_seconds.observe(took.as_secs_f64());
    }

    /// Files kept beyond `keep` for their bypass records: a gauge and, while any,
    /// a readiness reason (the disk fills instead of the trail losing them).
    fn retained(&self, files: usize) {
        self.metrics
            .audit_files_retained
            .set(i64::try_from(files).unwrap_or(i64::MAX));
        const RETENTION: &str = "audit_retention";
        if files > 0 {
            if self.readiness.set(
                RETENTION,
                format!("{files} rotated audit file(s) beyond `keep` hold bypass records younger than `bypass_retention`; they are kept: archive them or free disk"),
            ) {
                tracing::error!(files, "audit rotation kept files beyond `keep`: they hold bypass records younger than bypass_retention");
            }
        } else {
            self.readiness.clear(RETENTION);
        }
    }

    pub(crate) fn settings(&self) -> Arc<AuditSettings> {
        self.live.load_full()
    }

    /// The writer took `n` best-effort records.
    pub(crate) fn taken(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::AcqRel);
    }

    /// The `audit_dropped` record for records dropped since the last batch.
    fn take_dropped(&self) -> Option<Encoded> {
        let dropped = self.dropped.swap(0, Ordering::AcqRel);
        (dropped > 0).then(|| record::encode("audit_dropped", &record::Dropped { dropped }))
    }
}

/// A handle for writing records; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    /// Where best-effort records wait for the writer, when a runtime runs the
    /// task that hands them over (else each is sent on its own).
    gathered: Option<Arc<Gathered>>,
}

/// Best-effort records made on the runtime, handed to the writer together: with
/// the next durable record, or by one task once the runtime has run the tasks
/// that were ready (a turn of its run queue). The writer wakes once per batch,
/// not once per record — each of those wake-ups is a thread switch and, when
/// keygate has one core, preempts the runtime. Records keep the order they were
/// made in; at rest a record is handed over within microseconds.
#[derive(Default)]
struct Gathered {
    records: std::sync::Mutex<Vec<Encoded>>,
    ready: tokio::sync::Notify,
}

impl Gathered {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Encoded>> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends the gathered records, then `durable`'s record, as one job through
    /// `room`. The list stays locked until the job is in the channel, so jobs
    /// enter it in the order their records were made, whichever thread sends.
    fn hand_over(&self, room: mpsc::Permit<'_, Job>, durable: Option<(Encoded, Waiter)>) {
        let mut list = self.lock();
        let mut records = std::mem::take(&mut *list);
        let durable = durable.map(|(record, waiter)| {
            records.push(record);
            waiter
        });
        if !records.is_empty() {
            room.send(Job::Write { records, durable });
        }
    }

    /// Hands the gathered records over once per turn of the runtime, until the
    /// writer's channel is gone.
    fn spawn(self: &Arc<Self>, runtime: &tokio::runtime::Handle, tx: &mpsc::Sender<Job>) {
        let gathered = Arc::clone(self);
        let tx = tx.downgrade();
        runtime.spawn(async move {
            loop {
                gathered.ready.notified().await;
                // Let the requests that are ready now add theirs first.
                tokio::task::yield_now().await;
                let Some(tx) = tx.upgrade() else { return };
                // Nothing is taken before there is room: a record is never
                // held anywhere it could be lost.
                let Ok(room) = tx.reserve().await else { return };
                gathered.hand_over(room, None);
            }
        });
    }
}

/// The writer, to wait for at shutdown.
pub struct AuditThread(writer::Handle);

impl AuditThread {
    pub async fn join(self) {
        self.0.join().await;
    }
}

impl Audit {
    /// Opens the trail (cutting a torn last line) and starts the writer.
    pub fn start(
        settings: AuditSettings,
        readiness: Arc<Readiness>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Audit, AuditThread, Recovery)> {
        let shared = Shared::new(settings, readiness, metrics);
        let (tx, rx) = mpsc::channel(QUEUE);
        let (handle, recovery) = writer::start_local(Arc::clone(&shared), rx)?;
        Ok((Audit::new(tx, shared), AuditThread(handle), recovery))
    }

    /// Starts the writer on a sink the caller opens with the writer's shared
    /// state (the database's).
    pub fn start_on<E>(
        settings: AuditSettings,
        readiness: Arc<Readiness>,
        metrics: Arc<Metrics>,
        open: impl FnOnce(Arc<Shared>) -> Result<(Box<dyn writer::Sink>, Recovery), E>,
    ) -> Result<(Audit, AuditThread, Recovery), StartError<E>> {
        let shared = Shared::new(settings, readiness, metrics);
        let (sink, recovery) = open(Arc::clone(&shared)).map_err(StartError::Open)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let handle =
            writer::start_with(sink, Arc::clone(&shared), rx).map_err(StartError::Thread)?;
        Ok((Audit::new(tx, shared), AuditThread(handle), recovery))
    }

    /// A handle on the writer's channel; best-effort records are gathered when
    /// called on a runtime.
    fn new(tx: mpsc::Sender<Job>, shared: Arc<Shared>) -> Audit {
        let gathered = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let gathered = Arc::new(Gathered::default());
            gathered.spawn(&runtime, &tx);
            gathered
        });
        Audit {
            tx,
            shared,
            gathered,
        }
    }

    /// Whether requests without the bypass are recorded too.
    pub fn record_passthrough(&self) -> bool {
        self.shared.live.load().record_passthrough
    }

    /// Applies reloaded settings (rotation, keep, retention, record_passthrough).
    pub fn set_settings(&self, settings: AuditSettings) {
        self.shared.live.store(Arc::new(settings));
    }

    /// Writes a record and returns once it is durable (fsync or commit, shared
    /// with every record in the same batch) — or an error, at the latest after
    /// `write_timeout`: a hung disk fails bypass requests closed, it does not hang
    /// them.
    pub async fn durable(&self, record: Encoded) -> Result<(), AuditError> {
        let limit = self.shared.live.load().write_timeout;
        let (done, wait) = oneshot::channel();
        let work = async {
            let room = self.tx.reserve().await.map_err(|_| AuditError::Closed)?;
            // The best-effort records made before this one go first, in one job.
            self.hand_over(room, Some((record, done)));
            wait.await.map_err(|_| AuditError::Closed)?
        };
        match tokio::time::timeout(limit, work).await {
            Ok(result) => result,
            Err(_) => {
                self.shared.failed(&format!(
                    "a durable write took longer than {limit:?} (disk hung?)"
                ));
                Err(AuditError::Timeout(limit))
            }
        }
    }

    /// Queues a record without waiting for it. A full queue drops it; the drop is
    /// counted and recorded in the trail with the next batch.
    pub fn record(&self, record: Encoded) {
        // Records handed over and not yet taken by the writer, at most QUEUE.
        if self.shared.queued.fetch_add(1, Ordering::AcqRel) >= self.shared.queue_limit {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            return self.dropped();
        }
        let Some(gathered) = &self.gathered else {
            let job = Job::Write {
                records: vec![record],
                durable: None,
            };
            if self.tx.try_send(job).is_err() {
                self.shared.queued.fetch_sub(1, Ordering::AcqRel);
                self.dropped();
            }
            return;
        };
        let first = {
            let mut records = gathered.lock();
            records.push(record);
            records.len() == 1
        };
        if first {
            gathered.ready.notify_one();
        }
    }

    fn dropped(&self) {
        self.shared.dropped.fetch_add(1, Ordering::AcqRel);
        self.shared.metrics.audit_dropped.inc();
    }

    fn hand_over(&self, room: mpsc::Permit<'_, Job>, durable: Option<(Encoded, Waiter)>) {
        match &self.gathered {
            Some(gathered) => gathered.hand_over(room, durable),
            None => {
                if let Some((record, waiter)) = durable {
                    room.send(Job::Write {
                        records: vec![record],
                        durable: Some(waiter),
                    });
                }
            }
        }
    }

    /// Asks for the writer's periodic work (fsync of what is unsynced, a look at
    /// the active file); called every second.
    pub fn tick(&self) {
        let _ = self.tx.try_send(Job::Tick);
    }

    /// Flushes and stops the writer.
    pub async fn close(&self) {
        if let Ok(room) = self.tx.reserve().await {
            self.hand_over(room, None);
        }
        let (done, wait) = oneshot::channel();
        if self.tx.send(Job::Close(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

#[cfg(test)]
mod tests;
