//! The file trail: one active JSON Lines file, rotated at `rotate_size` into
//! `audit.jsonl.1`, `.2`, … (newest first).
//!
//! Invariants:
//! - a batch that fails is cut off the file again; if even that fails, nothing is
//!   appended until it succeeds — the file never holds a line that was not
//!   acknowledged followed by more records;
//! - `seq` is gap-free across rotations and restarts: a rotated file is deleted
//!   (beyond `keep`) only after the first batch in the new active file is on
//!   disk, so a crash at any point leaves the chain's head readable;
//! - rotation never silently deletes bypass records younger than
//!   `bypass_retention`: such a file is kept beyond `keep`, and readiness and a
//!   metric say so;
//! - a removed or replaced active file is noticed before the next durable batch
//!   (and at the next tick, within a second, otherwise) and a new one is
//!   started; the chain continues in it.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::chain::{self, Head};
use super::writer::{Recovery, Sink};
use super::{AuditError, Encoded, Shared};

struct Open {
    file: File,
    dev: u64,
    ino: u64,
    /// Bytes known good (everything up to the last acknowledged batch).
    len: u64,
}

pub struct FileSink {
    path: PathBuf,
    open: Option<Open>,
    head: Head,
    /// A failed batch could not be cut off: `open.len` is what the file must be
    /// cut back to before anything else is written.
    dirty: bool,
    unsynced: bool,
    last_sync: Instant,
    /// Rotated files beyond `keep` wait to be pruned until the new active file
    /// holds a durable batch.
    prune_pending: bool,
    shared: Arc<Shared>,
    buffer: Vec<u8>,
}

impl FileSink {
    /// Opens the trail, cutting off a torn last line, and finds where the chain is.
    pub fn open(path: PathBuf, shared: Arc<Shared>) -> (FileSink, Recovery) {
        let mut sink = FileSink {
            path,
            open: None,
            head: Head::genesis(),
            dirty: false,
            unsynced: false,
            last_sync: Instant::now(),
            prune_pending: false,
            shared,
            buffer: Vec::with_capacity(64 * 1024),
        };
        let mut recovery = Recovery::default();
        match resume(&sink.path) {
            Ok((head, torn)) => {
                sink.head = head;
                recovery.torn_bytes = torn;
                if let Some(bytes) = torn {
                    tracing::warn!(file = %sink.path.display(), bytes, "cut off a torn last audit line left by a crash");
                }
            }
            Err(e) => sink
                .shared
                .failed(&format!("cannot read {}: {e}", sink.path.display())),
        }
        // A crash between rotation and pruning leaves files beyond `keep`.
        sink.prune_pending = true;
        recovery.next_seq = sink.head.seq + 1;
        (sink, recovery)
    }

    fn err(&self, e: impl std::fmt::Display) -> AuditError {
        AuditError::Write(format!("{}: {e}", self.path.display()))
    }

    /// Opens the active file if it is not open.
    fn ensure_open(&mut self) -> Result<(), AuditError> {
        if self.open.is_some() {
            return Ok(());
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(&self.path)
            .map_err(|e| self.err(e))?;
        let meta = file.metadata().map_err(|e| self.err(e))?;
        self.open = Some(Open {
            file,
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
        });
        Ok(())
    }

    /// Cuts a failed batch off the file; until that works nothing is appended.
    fn repair(&mut self) -> Result<(), AuditError> {
        if !self.dirty {
            return Ok(());
        }
        let open = self
            .open
            .as_mut()
            .ok_or_else(|| AuditError::Write("not open".into()))?;
        open.file
            .set_len(open.len)
            .and_then(|()| open.file.sync_data())
            .map_err(|e| {
                AuditError::Write(format!(
                    "cannot cut a failed batch off the audit file ({e}); refusing to append after it"
                ))
            })?;
        self.dirty = false;
        Ok(())
    }

    fn append(&mut self, bytes_len: u64, durable: bool) -> Result<(), AuditError> {
        let open = self
            .open
            .as_mut()
            .ok_or_else(|| AuditError::Write("not open".into()))?;
        let good = open.len;
        let result = open.file.write_all(&self.buffer).and_then(|()| {
            if durable {
                let started = Instant::now();
                open.file.sync_data()?;
                self.shared.synced(started.elapsed());
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                open.len = good + bytes_len;
                if durable {
                    self.unsynced = false;
                    self.last_sync = Instant::now();
                } else {
                    self.unsynced = true;
                }
                Ok(())
            }
            Err(e) => {
                // Cut the batch off again so no unacknowledged line stays.
                if open
                    .file
                    .set_len(good)
                    .and_then(|()| open.file.sync_data())
                    .is_err()
                {
                    self.dirty = true;
                }
                Err(AuditError::Write(format!("{}: {e}", self.path.display())))
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

    /// Starts a new active file when this batch would take it past `rotate_size`:
    /// the active file becomes `.1` and every older one moves up by one. Nothing
    /// is deleted here; see `prune`.
    fn rotate_if_needed(&mut self, adding: u64) -> Result<(), AuditError> {
        let len = self.open.as_ref().map_or(0, |o| o.len);
        if len == 0 || len + adding <= self.shared.settings().rotate_size {
            return Ok(());
        }
        let err =
            |e: std::io::Error| AuditError::Write(format!("rotating {}: {e}", self.path.display()));
        if let Some(open) = self.open.take() {
            open.file.sync_data().map_err(err)?;
        }
        let highest = rotated_indices(&self.path).into_iter().max().unwrap_or(0);
        for n in (1..=highest).rev() {
            std::fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1)).map_err(err)?;
        }
        std::fs::rename(&self.path, rotated(&self.path, 1)).map_err(err)?;
        sync_dir(&self.path);
        self.prune_pending = true;
        self.ensure_open()
    }

    /// Deletes rotated files beyond `keep`, oldest first — except those holding
    /// bypass records younger than `bypass_retention`.
    fn prune(&mut self) {
        let settings = self.shared.settings();
        let keep = settings.keep;
        let mut retained = 0;
        let mut beyond: Vec<u32> = rotated_indices(&self.path)
            .into_iter()
            .filter(|n| *n > keep)
            .collect();
        beyond.sort_unstable();
        for n in beyond.into_iter().rev() {
            let file = rotated(&self.path, n);
            match holds_recent_bypass(&file, settings.bypass_retention) {
                Ok(false) => {
                    if let Err(e) = std::fs::remove_file(&file) {
                        tracing::warn!(file = %file.display(), error = %e, "cannot delete an old audit file");
                    }
                }
                Ok(true) => retained += 1,
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "cannot read an old audit file; keeping it");
                    retained += 1;
                }
            }
        }
        sync_dir(&self.path);
        self.shared.retained(retained);
        self.prune_pending = false;
    }

    /// Notices an active file that was removed or replaced, so the next batch
    /// starts a new one.
    fn check_identity(&mut self) {
        let Some(open) = &self.open else { return };
        let current = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if current != Some((open.dev, open.ino)) && !self.dirty {
            tracing::error!(file = %self.path.display(), "the audit file was removed or replaced; starting a new one");
            self.open = None;
        }
    }
}

impl Sink for FileSink {
    fn write(&mut self, ts: &str, records: &[Encoded], durable: bool) -> Result<(), AuditError> {
        // A durable record must land in the file at the trail's path, so a
        // removed file is noticed before one is acknowledged; best-effort
        // batches leave that look to the next tick.
        if durable {
            self.check_identity();
        }
        self.ensure_open()?;
        self.repair()?;
        let mut head = self.head.clone();
        self.buffer.clear();
        for r in records {
            head.append(&mut self.buffer, ts, r.event, &r.fields);
        }
        let len = self.buffer.len() as u64;
        self.rotate_if_needed(len)?;
        // A fresh active file after rotation: make its first batch durable, so the
        // chain's head survives the pruning of the files before it.
        let durable = durable || self.prune_pending;
        self.append(len, durable)?;
        self.head = head;
        if self.prune_pending {
            self.prune();
        }
        Ok(())
    }

    fn tick(&mut self, closing: bool) {
        if self.unsynced && (closing || self.last_sync.elapsed() >= Duration::from_secs(1)) {
            if let Err(e) = self.sync() {
                self.shared.failed(&e.to_string());
            }
        }
        if !closing {
            self.check_identity();
        }
    }
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
}

pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// The numbers `n` of the existing `path.n` files.
fn rotated_indices(path: &Path) -> Vec<u32> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let file = e.file_name();
            let rest = file.to_str()?.strip_prefix(name)?.strip_prefix('.')?;
            rest.parse::<u32>().ok().filter(|n| *n > 0)
        })
        .collect()
}

/// Whether a rotated file may hold bypass records younger than `retention`: its
/// last write is within the retention and it holds a record with the bypass.
fn holds_recent_bypass(file: &Path, retention: Duration) -> std::io::Result<bool> {
    let modified = std::fs::metadata(file)?.modified()?;
    let age = SystemTime::now()
        .duration_since(modified)
        .unwrap_or(Duration::ZERO);
    if age >= retention {
        return Ok(false);
    }
    contains(file, b"\"admin_key\":true")
}

/// Whether `needle` occurs in the file, read in chunks.
fn contains(file: &Path, needle: &[u8]) -> std::io::Result<bool> {
    let mut f = File::open(file)?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut carry = 0;
    loop {
        let n = f.read(&mut buf[carry..])?;
        if n == 0 {
            return Ok(false);
        }
        let filled = carry + n;
        if buf[..filled].windows(needle.len()).any(|w| w == needle) {
            return Ok(true);
        }
        carry = needle.len().saturating_sub(1).min(filled);
        buf.copy_within(filled - carry..filled, 0);
    }
}

/// The chain's head at `path` (or at the newest rotated file when the active one
/// is empty), cutting a torn last line off the active file.
fn resume(path: &Path) -> std::io::Result<(Head, Option<u64>)> {
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
                return Ok((
                    Head {
                        seq: c.seq,
                        prev: c.line_hash,
                    },
                    torn,
                ));
            }
        }
    }
    let mut indices = rotated_indices(path);
    indices.sort_unstable();
    for n in indices {
        if let Ok(mut file) = File::open(rotated(path, n)) {
            let len = file.metadata()?.len();
            if let Some(line) = last_line(&mut file, len)? {
                if let Ok(c) = chain::check_line(&line) {
                    return Ok((
                        Head {
                            seq: c.seq,
                            prev: c.line_hash,
                        },
                        torn,
                    ));
                }
            }
        }
    }
    Ok((Head::genesis(), torn))
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

#[cfg(test)]
mod tests;
