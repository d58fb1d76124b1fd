//! The one audit writer: it takes records from a bounded channel in batches and
//! hands each batch to its sink, which chains the records (`seq`, `prev`,
//! `hash`) and writes them with one write and — when a record in the batch must
//! be durable — one fsync or commit shared by all (group commit).
//!
//! Invariants: a record is acknowledged as durable only after its fsync/commit; a
//! batch that fails leaves nothing behind (the sink cuts it off again, or refuses
//! to write until it can), so the chain never has a hole or a torn line of ours.
//!
//! A batch's waiters are answered by a task on the runtime, handed the whole
//! batch at once: waking tasks from this thread costs the runtime a wake-up
//! (a syscall) per task, handing over a batch costs one.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};

use super::file::FileSink;
use super::{AuditError, Encoded, Shared};
use crate::config::AuditSink;

/// How many queued records one batch takes at most.
pub const MAX_BATCH: usize = 1024;

pub type Waiter = oneshot::Sender<Result<(), AuditError>>;

pub enum Job {
    /// Records in the order they were made; with `durable`, the last one is
    /// the durable record and the waiter hears when all are on disk.
    Write {
        records: Vec<Encoded>,
        durable: Option<Waiter>,
    },
    /// Periodic work: fsync what is unsynced, look at the active file.
    Tick,
    Close(oneshot::Sender<()>),
}

/// What the start found, for the `startup` record.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// Bytes of a torn last line cut off.
    pub torn_bytes: Option<u64>,
    /// Next seq to write.
    pub next_seq: u64,
}

/// Where a batch goes: the file trail or standard output.
pub trait Sink: Send {
    /// Chains and writes `records` (stamped `ts`); with `durable`, returns only
    /// once they are on disk. On error nothing of the batch stays.
    fn write(&mut self, ts: &str, records: &[Encoded], durable: bool) -> Result<(), AuditError>;

    /// Periodic work (called about once a second, and at close).
    fn tick(&mut self, closing: bool);
}

/// Standard output (container log pipelines): nothing to resume, nothing durable
/// beyond the pipe.
struct StdoutSink {
    head: super::chain::Head,
}

impl Sink for StdoutSink {
    fn write(&mut self, ts: &str, records: &[Encoded], _durable: bool) -> Result<(), AuditError> {
        use std::io::Write as _;
        let mut head = self.head.clone();
        let mut out = Vec::with_capacity(records.len() * 512);
        for r in records {
            head.append(&mut out, ts, r.event, &r.fields);
        }
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(&out)
            .and_then(|()| stdout.flush())
            .map_err(|e| AuditError::Write(format!("standard output: {e}")))?;
        self.head = head;
        Ok(())
    }

    fn tick(&mut self, _closing: bool) {}
}

/// The writer thread, to wait for at shutdown.
pub struct Handle(std::thread::JoinHandle<()>);

impl Handle {
    pub async fn join(self) {
        let _ = tokio::task::spawn_blocking(move || self.0.join()).await;
    }
}

/// Opens the sink the settings name and starts the writer thread on it.
pub fn start_local(
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Job>,
) -> std::io::Result<(Handle, Recovery)> {
    let settings = shared.settings();
    let (sink, recovery): (Box<dyn Sink>, Recovery) = match &settings.sink {
        AuditSink::Stdout => (
            Box::new(StdoutSink {
                head: super::chain::Head::genesis(),
            }),
            Recovery {
                torn_bytes: None,
                next_seq: 1,
            },
        ),
        AuditSink::File(path) => {
            let (sink, recovery) = FileSink::open(path.clone(), Arc::clone(&shared));
            (Box::new(sink), recovery)
        }
        AuditSink::Database => {
            return Err(std::io::Error::other(
                "the database trail needs its sink from the caller (Audit::start_on)",
            ))
        }
    };
    Ok((start_with(sink, shared, rx)?, recovery))
}

/// Starts the writer thread on `sink`.
pub fn start_with(
    sink: Box<dyn Sink>,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Job>,
) -> std::io::Result<Handle> {
    let answers = Answers::start();
    let thread = std::thread::Builder::new()
        .name("keygate-audit".into())
        .spawn(move || run(sink, shared, rx, answers))?;
    Ok(Handle(thread))
}

type Answer = (Vec<Waiter>, Result<(), AuditError>);

/// Who tells a batch's waiters how it went.
enum Answers {
    /// A task on the runtime the writer was started from.
    Runtime(mpsc::UnboundedSender<Answer>),
    /// The writer thread itself (no runtime to hand them to).
    Direct,
}

impl Answers {
    fn start() -> Self {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Answers::Direct;
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<Answer>();
        runtime.spawn(async move {
            while let Some((waiters, result)) = rx.recv().await {
                answer(waiters, &result);
            }
        });
        Answers::Runtime(tx)
    }

    fn send(&self, waiters: Vec<Waiter>, result: Result<(), AuditError>) {
        if waiters.is_empty() {
            return;
        }
        match self {
            Answers::Runtime(tx) => {
                if let Err(mpsc::error::SendError((waiters, result))) = tx.send((waiters, result)) {
                    // The runtime is gone: answer from here.
                    answer(waiters, &result);
                }
            }
            Answers::Direct => answer(waiters, &result),
        }
    }
}

fn answer(waiters: Vec<Waiter>, result: &Result<(), AuditError>) {
    for w in waiters {
        let _ = w.send(result.clone());
    }
}

fn now_ts() -> String {
    crate::rfc3339::format_millis(SystemTime::now())
}

/// Runs until `Close` or until every sender is gone.
fn run(
    mut sink: Box<dyn Sink>,
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Job>,
    answers: Answers,
) {
    let mut last_tick = Instant::now();
    let mut batch = Vec::with_capacity(64);
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        take_queued(&mut rx, &mut jobs);
        if jobs.iter().any(Job::is_durable) {
            // Someone waits on this batch's flush. Requests that are ready to
            // run on the same core would put their records into the next one,
            // a flush later: let them run first (with an idle core this
            // returns at once). On one core this cuts flushes per bypass
            // request by more than half at 16 connections and by ~7x at 256.
            std::thread::yield_now();
            take_queued(&mut rx, &mut jobs);
        }
        let close = collect(&shared, jobs, &mut batch);
        if let Some((waiters, result)) = write_batch(sink.as_mut(), &shared, &mut batch) {
            answers.send(waiters, result);
        }
        if close.is_some() || last_tick.elapsed() >= Duration::from_secs(1) {
            sink.tick(close.is_some());
            last_tick = Instant::now();
        }
        if let Some(done) = close {
            let _ = done.send(());
            return;
        }
    }
    sink.tick(true);
}

/// Adds what is queued now, up to a batch.
fn take_queued(rx: &mut mpsc::Receiver<Job>, jobs: &mut Vec<Job>) {
    while jobs.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(job) => jobs.push(job),
            Err(_) => break,
        }
    }
}

impl Job {
    fn is_durable(&self) -> bool {
        matches!(
            self,
            Job::Write {
                durable: Some(_),
                ..
            }
        )
    }
}

/// A batch: records and the waiters for the durable ones.
#[derive(Default)]
pub struct Batch {
    pub records: Vec<Encoded>,
    pub waiters: Vec<Waiter>,
}

/// Sorts jobs into the batch; returns the close request, if any.
fn collect(
    shared: &Shared,
    jobs: Vec<Job>,
    batch: &mut Vec<(Encoded, Option<Waiter>)>,
) -> Option<oneshot::Sender<()>> {
    let mut close = None;
    for job in jobs {
        match job {
            Job::Write { records, durable } => {
                let best_effort = records.len().saturating_sub(usize::from(durable.is_some()));
                shared.taken(best_effort);
                batch.extend(records.into_iter().map(|r| (r, None)));
                if let (Some(waiter), Some(last)) = (durable, batch.last_mut()) {
                    last.1 = Some(waiter);
                }
            }
            Job::Tick => {}
            Job::Close(done) => close = Some(done),
        }
    }
    close
}

/// Writes the collected records (with an `audit_dropped` record first when the
/// queue turned records away); returns their waiters and what to tell them.
fn write_batch(
    sink: &mut dyn Sink,
    shared: &Shared,
    batch: &mut Vec<(Encoded, Option<Waiter>)>,
) -> Option<Answer> {
    if batch.is_empty() {
        return None;
    }
    let Batch { records, waiters } = split(shared, batch);
    let durable = !waiters.is_empty();
    let result = sink.write(&now_ts(), &records, durable);
    match &result {
        Ok(()) => shared.written(records.len() as u64),
        Err(e) => shared.failed(&e.to_string()),
    }
    Some((waiters, result))
}

/// The records of a batch in order, preceded by the drop count if any.
pub fn split(shared: &Shared, batch: &mut Vec<(Encoded, Option<Waiter>)>) -> Batch {
    let mut out = Batch {
        records: Vec::with_capacity(batch.len() + 1),
        waiters: Vec::new(),
    };
    out.records.extend(shared.take_dropped());
    for (record, waiter) in batch.drain(..) {
        out.records.push(record);
        out.waiters.extend(waiter);
    }
    out
}
