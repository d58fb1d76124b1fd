//! The one audit writer: a thread that takes records from a bounded channel, gives
//! them `seq`, `ts`, `prev` and `hash`, writes each batch with one write and — when a
//! record in it must be durable — one fsync shared by all (group commit).
//!
//! Invariants: a record is acknowledged as durable only after its fsync; a batch
//! that fails is cut off the file again (truncate to the last good length), so the
//! chain on disk never has a hole or a torn line of ours; `seq` is gap-free across
//! rotations and restarts.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};

use super::chain::{self, GENESIS};
use super::{AuditError, Shared};
use crate::config::{AuditSettings, AuditSink};

/// Unsynced records are fsynced at least this often.
const SYNC_EVERY: Duration = Duration::from_secs(1);
/// How many queued records one batch takes at most.
const MAX_BATCH: usize = 1024;

type Fields = Vec<(&'static str, serde_json::Value)>;
type Pending = (
    &'static str,
    Fields,
    Option<oneshot::Sender<Result<(), AuditError>>>,
);

pub enum Job {
    Write {
        event: &'static str,
        fields: Vec<(&'static str, serde_json::Value)>,
        durable: Option<oneshot::Sender<Result<(), AuditError>>>,
    },
    /// Fsync what is unsynced (sent every second).
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

struct Open {
    file: File,
    dev: u64,
    ino: u64,
    /// Bytes known good (everything up to the last acknowledged batch).
    len: u64,
}

pub struct Writer {
    settings: AuditSettings,
    open: Option<Open>,
    seq: u64,
    prev: String,
    unsynced: bool,
    last_sync: Instant,
    shared: Arc<Shared>,
}

fn now_ts() -> String {
    crate::rfc3339::format_millis(SystemTime::now())
}

impl Writer {
    /// Opens the trail, cutting off a torn last line, and finds where the chain is.
    pub fn start(settings: AuditSettings, shared: Arc<Shared>) -> (Writer, Recovery) {
        let mut w = Writer {
            settings,
            open: None,
            seq: 0,
            prev: GENESIS.to_owned(),
            unsynced: false,
            last_sync: Instant::now(),
            shared,
        };
        let mut recovery = Recovery::default();
        if let AuditSink::File(path) = w.settings.sink.clone() {
            match resume(&path) {
                Ok((seq, prev, torn)) => {
                    w.seq = seq;
                    w.prev = prev;
                    recovery.torn_bytes = torn;
                    if let Some(bytes) = torn {
                        tracing::warn!(file = %path.display(), bytes, "cut off a torn last audit line left by a crash");
                    }
                }
                Err(e) => w
                    .shared
                    .failed(&format!("cannot read {}: {e}", path.display())),
            }
        }
        recovery.next_seq = w.seq + 1;
        (w, recovery)
    }

    /// Runs until `Close` or until every sender is gone.
    pub fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let mut records = Vec::with_capacity(batch.len());
            let mut close = None;
            for job in batch {
                match job {
                    Job::Write {
                        event,
                        fields,
                        durable,
                    } => records.push((event, fields, durable)),
                    Job::Tick => {}
                    Job::Close(done) => close = Some(done),
                }
            }
            if !records.is_empty() {
                self.write_batch(records);
            }
            if self.unsynced && (self.last_sync.elapsed() >= SYNC_EVERY || close.is_some()) {
                let _ = self.sync();
            }
            if let Some(done) = close {
                let _ = done.send(());
                return;
            }
        }
        let _ = self.sync();
    }

    fn write_batch(&mut self, records: Vec<Pending>) {
        let mut text = String::with_capacity(records.len() * 512);
        let (mut seq, mut prev) = (self.seq, self.prev.clone());
        let ts = now_ts();
        let mut waiters = Vec::new();
        for (event, fields, durable) in records {
            seq += 1;
            let (line, line_hash) = chain::encode(&ts, seq, event, &prev, &fields);
            prev = line_hash;
            text.push_str(&line);
            text.push('\n');
            waiters.extend(durable);
        }
        let count = seq - self.seq;
        let durable = !waiters.is_empty();
        let result = self.append(text.as_bytes(), durable);
        match &result {
            Ok(()) => {
                self.seq = seq;
                self.prev = prev;
                self.shared.written(count);
            }
            Err(e) => self.shared.failed(&e.to_string()),
        }
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }

    /// Appends and, if asked, fsyncs; on any failure the file is cut back.
    fn append(&mut self, bytes: &[u8], durable: bool) -> Result<(), AuditError> {
        let path = match &self.settings.sink {
            AuditSink::Stdout => {
                let mut out = std::io::stdout().lock();
                return out
                    .write_all(bytes)
                    .and_then(|()| out.flush())
                    .map_err(|e| AuditError::Write(format!("standard output: {e}")));
            }
            AuditSink::File(p) => p.clone(),
        };
        self.ensure_open(&path)?;
        self.rotate_if_needed(&path, bytes.len() as u64)?;
        let open = self
            .open
            .as_mut()
            .ok_or_else(|| AuditError::Write("not open".into()))?;
        let good = open.len;
        let written = open.file.write_all(bytes);
        let synced = written.and_then(|()| {
            if durable {
                let started = Instant::now();
                open.file.sync_data()?;
                self.shared.synced(started.elapsed());
            }
            Ok(())
        });
        match synced {
            Ok(()) => {
                open.len = good + bytes.len() as u64;
                if durable {
                    self.unsynced = false;
                    self.last_sync = Instant::now();
                } else {
                    self.unsynced = true;
                }
                Ok(())
            }
            Err(e) => {
                // Cut the batch off again so no torn or unacknowledged line stays.
                if open.file.set_len(good).is_err() {
                    self.open = None;
                }
                Err(AuditError::Write(format!("{}: {e}", path.display())))
            }
        }
    }

    fn sync(&mut self) -> Result<(), AuditError> {
        if let Some(open) = self.open.as_mut() {
            let started = Instant::now();
            open.file
                .sync_data()
                .map_err(|e| AuditError::Write(format!("fsync: {e}")))?;
            self.shared.synced(started.elapsed());
        }
        self.unsynced = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// (Re)opens the active file when it is not open or no longer at its path
    /// (removed or renamed by someone else).
    fn ensure_open(&mut self, path: &Path) -> Result<(), AuditError> {
        let current = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        if let Some(open) = &self.open {
            if current == Some((open.dev, open.ino)) {
                return Ok(());
            }
            tracing::error!(file = %path.display(), "the audit file was removed or replaced; starting a new one");
            self.open = None;
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(path)
            .map_err(|e| AuditError::Write(format!("{}: {e}", path.display())))?;
        let meta = file
            .metadata()
            .map_err(|e| AuditError::Write(format!("{}: {e}", path.display())))?;
        self.open = Some(Open {
            file,
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
        });
        Ok(())
    }

    /// Renames the active file to `.1` (older ones shift up, beyond `keep` they go)
    /// when this batch would take it past `rotate_size`.
    fn rotate_if_needed(&mut self, path: &Path, adding: u64) -> Result<(), AuditError> {
        let len = self.open.as_ref().map_or(0, |o| o.len);
        if len == 0 || len + adding <= self.settings.rotate_size {
            return Ok(());
        }
        let err =
            |e: std::io::Error| AuditError::Write(format!("rotating {}: {e}", path.display()));
        if let Some(open) = self.open.take() {
            open.file.sync_data().map_err(err)?;
        }
        let keep = self.settings.keep;
        let _ = std::fs::remove_file(rotated(path, keep + 1));
        for n in (1..=keep).rev() {
            let from = if n == 1 {
                path.to_path_buf()
            } else {
                rotated(path, n - 1)
            };
            if from.exists() {
                std::fs::rename(&from, rotated(path, n)).map_err(err)?;
            }
        }
        if keep == 0 {
            std::fs::remove_file(path).map_err(err)?;
        }
        if let Some(dir) = path.parent() {
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        self.ensure_open(path)
    }
}

pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// The last seq and line hash of the trail at `path` (or of its `.1` when the
/// active file is empty), cutting a torn last line off the active file.
fn resume(path: &Path) -> std::io::Result<(u64, String, Option<u64>)> {
    let mut torn = None;
    if let Ok(mut file) = OpenOptions::new().read(true).write(true).open(path) {
        let (good_len, cut) = good_length(&mut file)?;
        if cut > 0 {
            file.set_len(good_len)?;
            file.sync_all()?;
            torn = Some(cut);
        }
        if let Some(line) = last_line(&mut file, good_len)? {
            if let Ok(c) = chain::check_line(&line) {
                return Ok((c.seq, c.line_hash, torn));
            }
        }
    }
    if let Ok(mut file) = File::open(rotated(path, 1)) {
        let len = file.metadata()?.len();
        if let Some(line) = last_line(&mut file, len)? {
            if let Ok(c) = chain::check_line(&line) {
                return Ok((c.seq, c.line_hash, torn));
            }
        }
    }
    Ok((0, GENESIS.to_owned(), torn))
}

/// The length up to the end of the last good line, and how many bytes follow it:
/// an unterminated tail, or a terminated last line that is not a valid record.
fn good_length(file: &mut File) -> std::io::Result<(u64, u64)> {
    let len = file.metadata()?.len();
    let end = end_of_last_newline(file, len)?;
    let mut good = end;
    if let Some(line) = last_line(file, end)? {
        if chain::check_line(&line).is_err() {
            good = end - line.len() as u64 - 1;
        }
    }
    Ok((good, len - good))
}

/// Offset just after the last `\n` at or before `len` (0 if none).
fn end_of_last_newline(file: &mut File, len: u64) -> std::io::Result<u64> {
    let mut pos = len;
    let mut buf = vec![0u8; 64 * 1024];
    while pos > 0 {
        let start = pos.saturating_sub(buf.len() as u64);
        let n = usize::try_from(pos - start).unwrap_or(buf.len());
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf[..n])?;
        if let Some(i) = buf[..n].iter().rposition(|b| *b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        pos = start;
    }
    Ok(0)
}

/// The newline-terminated line ending at `end` (exclusive of its newline).
fn last_line(file: &mut File, end: u64) -> std::io::Result<Option<String>> {
    if end == 0 {
        return Ok(None);
    }
    let start = end_of_last_newline(file, end - 1)?;
    let n = usize::try_from(end - 1 - start).unwrap_or(0);
    let mut buf = vec![0u8; n];
    file.seek(SeekFrom::Start(start))?;
    file.read_exact(&mut buf)?;
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}
