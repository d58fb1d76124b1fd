//! `keygate audit verify PATH...`: recomputes every hash, `prev` link and `seq`
//! across files given in any order (or a directory), following the chain. A chain
//! whose beginning was pruned by rotation verifies from its first `seq`; a torn
//! last line (a crash mid-write) is a warning, not a failure.

use std::fmt;
use std::path::{Path, PathBuf};

use super::chain::{check_line, Checked, LineError, GENESIS};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub records: u64,
    pub files: usize,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub warnings: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ok: {} records checked in {} file(s)",
            self.records, self.files
        )?;
        if let (Some(a), Some(b)) = (self.first_seq, self.last_seq) {
            write!(f, ", seq {a}..{b}")?;
            if a > 1 {
                write!(
                    f,
                    " (the chain starts at seq {a}: earlier files were pruned)"
                )?;
            }
        }
        Ok(())
    }
}

/// The first broken record: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub file: PathBuf,
    /// 1-based; 0 for the file as a whole.
    pub line: usize,
    pub why: String,
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.why)
        } else {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.why)
        }
    }
}

struct Loaded {
    path: PathBuf,
    lines: Vec<String>,
    /// Bytes after the last newline.
    tail: Option<String>,
    first_seq: Option<u64>,
}

fn broken(file: &Path, line: usize, why: impl Into<String>) -> Broken {
    Broken {
        file: file.to_path_buf(),
        line,
        why: why.into(),
    }
}

pub(crate) fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>, Broken> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let entries =
                std::fs::read_dir(p).map_err(|e| broken(p, 0, format!("cannot read: {e}")))?;
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.contains(".jsonl") && !name.ends_with(".tmp") && entry.path().is_file() {
                    files.push(entry.path());
                }
            }
        } else {
            files.push(p.clone());
        }
    }
    if files.is_empty() {
        return Err(Broken {
            file: paths.first().cloned().unwrap_or_default(),
            line: 0,
            why: "no audit files found".into(),
        });
    }
    Ok(files)
}

fn load(path: &Path) -> Result<Loaded, Broken> {
    let bytes = std::fs::read(path).map_err(|e| broken(path, 0, format!("cannot read: {e}")))?;
    Ok(parse(path, &bytes))
}

fn parse(path: &Path, bytes: &[u8]) -> Loaded {
    let text = String::from_utf8_lossy(bytes);
    let mut lines: Vec<String> = text.split('\n').map(str::to_owned).collect();
    let last = lines.pop().unwrap_or_default();
    let tail = (!last.is_empty()).then_some(last);
    let first_seq = lines
        .first()
        .and_then(|l| check_line(l).ok())
        .map(|c| c.seq);
    Loaded {
        path: path.to_path_buf(),
        lines,
        tail,
        first_seq,
    }
}

pub fn verify(paths: &[PathBuf]) -> Result<Report, Broken> {
    let files: Vec<Loaded> = expand(paths)?
        .iter()
        .map(|p| load(p))
        .collect::<Result<_, _>>()?;
    verify_loaded(files)
}

/// Verifies files given as (name, contents), in any order: what `verify` does
/// after reading them (for the fuzzer, and for exports checked in memory).
pub fn verify_contents(files: &[(PathBuf, Vec<u8>)]) -> Result<Report, Broken> {
    verify_loaded(files.iter().map(|(p, b)| parse(p, b)).collect())
}

/// How a record fails to follow the one before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// The chain's first record (`seq` 1) does not start from 64 zeros.
    NotGenesis,
    OutOfOrder {
        after: u64,
    },
    /// `seq` skips ahead of `from + 1`.
    Jump {
        from: u64,
    },
    PrevMismatch,
}

/// Whether `checked` follows `prev` (the previous record's `seq` and line
/// hash; `None` for the first record seen, which may start a pruned chain).
pub fn link(prev: Option<&(u64, String)>, checked: &Checked) -> Result<(), Link> {
    match prev {
        None if checked.seq == 1 && checked.prev != GENESIS => Err(Link::NotGenesis),
        None => Ok(()),
        Some((seq, _)) if checked.seq <= *seq => Err(Link::OutOfOrder { after: *seq }),
        Some((seq, _)) if checked.seq > seq + 1 => Err(Link::Jump { from: *seq }),
        Some((_, hash)) if checked.prev != *hash => Err(Link::PrevMismatch),
        Some(_) => Ok(()),
    }
}

fn verify_loaded(mut files: Vec<Loaded>) -> Result<Report, Broken> {
    files.retain(|f| !f.lines.is_empty() || f.tail.is_some());
    for f in &files {
        if f.first_seq.is_none() && !f.lines.is_empty() {
            return Err(broken(
                &f.path,
                1,
                "the first record is not a valid audit record",
            ));
        }
    }
    // Files in chain order; a file holding only a torn line goes last.
    files.sort_by_key(|f| f.first_seq.unwrap_or(u64::MAX));
    let mut report = Report {
        records: 0,
        files: files.len(),
        first_seq: None,
        last_seq: None,
        warnings: Vec::new(),
    };
    let mut prev: Option<(u64, String)> = None;
    let count = files.len();
    for (fi, file) in files.iter().enumerate() {
        let last_file = fi + 1 == count;
        for (li, line) in file.lines.iter().enumerate() {
            let n = li + 1;
            let last_line = last_file && li + 1 == file.lines.len() && file.tail.is_none();
            let checked = match check_line(line) {
                Ok(c) => c,
                Err(LineError::NotJson) if last_line => {
                    report.warnings.push(format!(
                        "{}:{n}: torn last line (not JSON), ignored",
                        file.path.display()
                    ));
                    continue;
                }
                Err(LineError::HashMismatch) => {
                    return Err(broken(
                        &file.path,
                        n,
                        "the record was edited: its hash does not match its content",
                    ))
                }
                Err(e) => {
                    return Err(broken(
                        &file.path,
                        n,
                        format!("not a valid audit record ({e:?})"),
                    ))
                }
            };
            match link(prev.as_ref(), &checked) {
                Ok(()) => {}
                Err(Link::NotGenesis) => {
                    return Err(broken(
                        &file.path,
                        n,
                        "the first record's prev is not 64 zeros",
                    ))
                }
                Err(Link::OutOfOrder { after }) => {
                    return Err(broken(
                        &file.path,
                        n,
                        format!(
                            "records out of order: seq {} after seq {after} (reordered)",
                            checked.seq
                        ),
                    ))
                }
                Err(Link::Jump { from }) => {
                    let expected = from + 1;
                    let later = file.lines[li + 1..]
                        .iter()
                        .any(|l| check_line(l).is_ok_and(|c| c.seq == expected));
                    let why = if li == 0 {
                        format!("seq jumps from {from} to {}: a file is missing in the middle of the chain", checked.seq)
                    } else if later {
                        format!("seq {} where {expected} was expected, which comes later: records were reordered", checked.seq)
                    } else {
                        format!(
                            "seq jumps from {from} to {}: records were deleted",
                            checked.seq
                        )
                    };
                    return Err(broken(&file.path, n, why));
                }
                Err(Link::PrevMismatch) => {
                    return Err(broken(
                        &file.path,
                        n,
                        "prev does not match the record before it: a record was changed, deleted or reordered",
                    ))
                }
            }
            if prev.is_none() {
                report.first_seq = Some(checked.seq);
            }
            report.records += 1;
            report.last_seq = Some(checked.seq);
            prev = Some((checked.seq, checked.line_hash));
        }
        if file.tail.is_some() {
            let n = file.lines.len() + 1;
            if last_file {
                report.warnings.push(format!(
                    "{}:{n}: torn last line (no newline), ignored",
                    file.path.display()
                ));
            } else {
                return Err(broken(
                    &file.path,
                    n,
                    "an unterminated line in the middle of the chain",
                ));
            }
        }
    }
    Ok(report)
}
