//! Changes to the keys file — create, revoke, regenerate — shared by `keygate keys`
//! and the key API. Each is: lock, read, edit the lines of the one entry concerned,
//! re-parse and check that every other entry is unchanged, then replace the file
//! atomically (temp file, fsync, rename, fsync of the directory).
//!
//! Invariants: other entries, comments and layout stay byte for byte; a secret is
//! never written, only its argon2id hash; a refused change writes nothing.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::file::{validate, KeyEntry, KeysFile};
use crate::config::{from_yaml, ConfigErrors};

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("{0}: the keys file is read-only (a mounted Secret?); change it where it comes from")]
    ReadOnly(PathBuf),
    #[error("{file}: no key with {what}")]
    NotFound { file: PathBuf, what: String },
    #[error("{0}")]
    Invalid(String),
    /// The key store (the database) cannot be reached or did not answer.
    #[error("the key store is unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    File(ConfigErrors),
    #[error("{file}: {reason}")]
    Layout { file: PathBuf, reason: String },
    #[error("{file}: {source}")]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
}

/// Which key a change is about.
#[derive(Debug, Clone, Copy)]
pub enum Selector<'a> {
    ClientId(&'a str),
    Id(&'a str),
}

/// A `Selector` that owns its text (to move it to another thread).
#[derive(Debug, Clone)]
pub enum OwnedSelector {
    ClientId(String),
    Id(String),
}

impl OwnedSelector {
    pub fn as_selector(&self) -> Selector<'_> {
        match self {
            OwnedSelector::ClientId(c) => Selector::ClientId(c),
            OwnedSelector::Id(i) => Selector::Id(i),
        }
    }
}

impl Selector<'_> {
    pub fn owned(&self) -> OwnedSelector {
        match self {
            Selector::ClientId(c) => OwnedSelector::ClientId((*c).to_owned()),
            Selector::Id(i) => OwnedSelector::Id((*i).to_owned()),
        }
    }

    fn matches(&self, e: &KeyEntry) -> bool {
        match self {
            Selector::ClientId(c) => e.client_id == *c,
            Selector::Id(i) => e.id == *i,
        }
    }
    fn describe(&self) -> String {
        match self {
            Selector::ClientId(c) => format!("client_id `{c}`"),
            Selector::Id(i) => format!("id `{i}`"),
        }
    }
}

/// What a new key should be.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    pub roles: Vec<String>,
    /// RFC 3339.
    pub expiration: Option<String>,
    /// A user-chosen secret; generated when `None`.
    pub secret: Option<String>,
}

/// The outcome of create or regenerate: the entry, and the secret if keygate
/// generated it (shown once, never stored).
#[derive(Debug, Clone)]
pub struct Issued {
    pub entry: KeyEntry,
    pub generated_secret: Option<String>,
}

/// All keys, for listings.
pub fn list(path: &Path) -> Result<Vec<KeyEntry>, KeysError> {
    Ok(super::file::read(path).map_err(KeysError::File)?.0.keys)
}

pub fn create(path: &Path, new: NewKey) -> Result<Issued, KeysError> {
    let mut issued = create_many(path, vec![new])?;
    issued
        .pop()
        .ok_or_else(|| KeysError::Invalid("nothing was created".into()))
}

/// Creates several keys in one change: all of them or, if any is refused, none.
pub fn create_many(path: &Path, batch: Vec<NewKey>) -> Result<Vec<Issued>, KeysError> {
    for new in &batch {
        check_new(new)?;
    }
    change(path, |file| plan_create(file, &batch))
}

/// The entries `batch` adds to `file` (ids after the highest, client_ids and
/// hashes made here), as an edit and as what the caller gets back.
pub(crate) fn plan_create(
    file: &KeysFile,
    batch: &[NewKey],
) -> Result<(Edit, Vec<Issued>), KeysError> {
    let first_id = file
        .keys
        .iter()
        .filter_map(|k| k.id.parse::<u64>().ok())
        .max()
        .map_or(1001, |m| m + 1);
    let mut entries = Vec::with_capacity(batch.len());
    let mut issued = Vec::with_capacity(batch.len());
    for (next_id, new) in (first_id..).zip(batch) {
        let client_id = super::new_client_id(&new.name);
        let (secret, generated) = secret_for(&client_id, new.secret.clone())?;
        let entry = KeyEntry {
            id: next_id.to_string(),
            client_id,
            name: new.name.clone(),
            secret_hash: hash(&secret)?,
            roles: new.roles.clone(),
            expiration: new.expiration.clone(),
            is_valid: true,
            created: Some(crate::rfc3339::format_seconds(SystemTime::now())),
        };
        entries.push(entry.clone());
        issued.push(Issued {
            entry,
            generated_secret: generated,
        });
    }
    Ok((Edit::Append(entries), issued))
}

/// Checks what a caller asked for before anything is written.
pub fn check_new(new: &NewKey) -> Result<(), KeysError> {
    check_name(&new.name)?;
    for role in &new.roles {
        if role.trim().is_empty() || role.contains(['\n', '\r']) {
            return Err(KeysError::Invalid(format!(
                "role `{role}`: expected a non-empty name"
            )));
        }
    }
    if let Some(exp) = &new.expiration {
        let t = crate::rfc3339::parse(exp).map_err(KeysError::Invalid)?;
        if t <= SystemTime::now() {
            return Err(KeysError::Invalid(format!(
                "expiration {exp}: expected a time in the future"
            )));
        }
    }
    if let Some(secret) = &new.secret {
        super::check_user_secret(secret).map_err(KeysError::Invalid)?;
    }
    Ok(())
}

pub fn revoke(path: &Path, which: Selector<'_>) -> Result<KeyEntry, KeysError> {
    change(path, |file| plan_revoke(file, which, path))
}

/// The entry `which` names, revoked; `store` names the store in messages.
pub(crate) fn plan_revoke(
    file: &KeysFile,
    which: Selector<'_>,
    store: &Path,
) -> Result<(Edit, KeyEntry), KeysError> {
    let index = find(file, which, store)?;
    let mut entry = file.keys[index].clone();
    entry.is_valid = false;
    Ok((
        Edit::Fields(index, vec![("is_valid", "false".into())]),
        entry,
    ))
}

pub fn regenerate(
    path: &Path,
    which: Selector<'_>,
    secret: Option<String>,
) -> Result<Issued, KeysError> {
    change(path, |file| plan_regenerate(file, which, secret, path))
}

/// The entry `which` names with a new secret's hash, valid again.
pub(crate) fn plan_regenerate(
    file: &KeysFile,
    which: Selector<'_>,
    secret: Option<String>,
    store: &Path,
) -> Result<(Edit, Issued), KeysError> {
    let index = find(file, which, store)?;
    let mut entry = file.keys[index].clone();
    let (secret, generated) = secret_for(&entry.client_id, secret)?;
    entry.secret_hash = hash(&secret)?;
    entry.is_valid = true;
    let fields = vec![
        ("secret_hash", yaml_string(&entry.secret_hash)),
        ("is_valid", "true".into()),
    ];
    Ok((
        Edit::Fields(index, fields),
        Issued {
            entry,
            generated_secret: generated,
        },
    ))
}

fn find(file: &KeysFile, which: Selector<'_>, path: &Path) -> Result<usize, KeysError> {
    file.keys
        .iter()
        .position(|e| which.matches(e))
        .ok_or_else(|| KeysError::NotFound {
            file: path.to_path_buf(),
            what: which.describe(),
        })
}

fn check_name(name: &str) -> Result<(), KeysError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(KeysError::Invalid(format!(
            "name `{name}`: expected 1 to 64 letters, digits, `-`, `.` or `_` (it becomes part of the client_id)"
        )))
    }
}

fn secret_for(
    client_id: &str,
    chosen: Option<String>,
) -> Result<(String, Option<String>), KeysError> {
    match chosen {
        Some(s) => {
            super::check_user_secret(&s).map_err(KeysError::Invalid)?;
            Ok((s, None))
        }
        None => {
            let s = super::new_secret(client_id);
            Ok((s.clone(), Some(s)))
        }
    }
}

fn hash(secret: &str) -> Result<String, KeysError> {
    super::hash_secret(secret)
        .map_err(|e| KeysError::Invalid(format!("cannot hash the secret: {e}")))
}

/// A YAML double-quoted scalar (JSON string syntax is valid YAML).
fn yaml_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// Applies an edit to a keys file's text as `keygate keys` would, without files
/// or hashing (for the fuzzer): revoke the entry at `index`, or (`None`) append
/// `new`. `Ok` only if the result parses to exactly the intended keys.
pub fn edit_text(text: &str, index: Option<usize>, new: &KeyEntry) -> Result<String, String> {
    let path = Path::new("keys.yaml");
    let before: KeysFile = from_yaml(text, path).map_err(|e| e.to_string())?;
    let edit = match index {
        Some(i) if i < before.keys.len() => Edit::Fields(i, vec![("is_valid", "false".into())]),
        Some(_) => return Err("no such entry".into()),
        None => Edit::Append(vec![new.clone()]),
    };
    let (new_text, expected) = apply(text, &before, edit)?;
    let after: KeysFile = from_yaml(&new_text, path).map_err(|e| e.to_string())?;
    if after.keys != expected {
        return Err("the layout could not be edited safely".into());
    }
    Ok(new_text)
}

/// A planned change to a keys file's text.
pub(crate) enum Edit {
    Append(Vec<KeyEntry>),
    /// Set these fields of the entry at this index.
    Fields(usize, Vec<(&'static str, String)>),
}

/// Lock, read, plan, edit, verify, replace.
fn change<T>(
    path: &Path,
    plan: impl FnOnce(&KeysFile) -> Result<(Edit, T), KeysError>,
) -> Result<T, KeysError> {
    let io = |source| KeysError::Io {
        file: path.to_path_buf(),
        source,
    };
    let _lock = lock(path).map_err(|e| read_only_or(path, e))?;
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "keys:\n".to_owned(),
        Err(e) => return Err(io(e)),
    };
    let before: KeysFile = from_yaml(&text, path).map_err(KeysError::File)?;
    validate(&before, path).map_err(KeysError::File)?;
    let (edit, outcome) = plan(&before)?;
    let (new_text, expected) = apply(&text, &before, edit).map_err(|reason| KeysError::Layout {
        file: path.to_path_buf(),
        reason,
    })?;
    // The edit must change exactly what was planned, or nothing is written.
    let after: KeysFile = from_yaml(&new_text, path).map_err(KeysError::File)?;
    validate(&after, path).map_err(KeysError::File)?;
    if after.keys != expected {
        return Err(KeysError::Layout {
            file: path.to_path_buf(),
            reason: "the file's layout could not be edited safely; edit it by hand".into(),
        });
    }
    replace(path, &new_text).map_err(|e| read_only_or(path, e))?;
    Ok(outcome)
}

fn read_only_or(path: &Path, e: std::io::Error) -> KeysError {
    match e.kind() {
        std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied => {
            KeysError::ReadOnly(path.to_path_buf())
        }
        _ => KeysError::Io {
            file: path.to_path_buf(),
            source: e,
        },
    }
}

/// An exclusive lock held for the whole read-modify-write, on the keys file's
/// directory: the file itself is replaced by a rename, so a lock on it would be
/// on the old inode and two writers could both win. `keygate keys` and the key
/// API (any number of concurrent calls) are serialised here.
fn lock(path: &Path) -> std::io::Result<std::fs::File> {
    let dir = std::fs::File::open(parent(path))?;
    dir.lock()?;
    Ok(dir)
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `text` to a temp file beside `path`, fsyncs it, renames it over `path`
/// and fsyncs the directory. Keeps the old file's permissions (0600 for a new one).
fn replace(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = parent(path);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("keys.yaml");
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let mode = std::fs::metadata(path).map_or(0o600, |m| m.permissions().mode() & 0o7777);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The item lines of the block sequence under `keys:`.
struct Layout {
    /// Line index of `keys:`.
    header: usize,
    /// Column of each item's `-`.
    indent: usize,
    /// `[start, end)` line ranges of the items.
    items: Vec<(usize, usize)>,
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn is_meaningful(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && !t.starts_with('#')
}

fn layout(lines: &[String]) -> Result<Layout, String> {
    let header = lines
        .iter()
        .position(|l| l.starts_with("keys:"))
        .ok_or("expected a top-level `keys:`")?;
    let rest = lines[header]["keys:".len()..].trim();
    if !(rest.is_empty() || rest.starts_with('#')) {
        return Err(
            "`keys:` is written in flow style; rewrite it as a block list to edit it with keygate"
                .into(),
        );
    }
    let mut items: Vec<(usize, usize)> = Vec::new();
    let mut indent = None;
    let mut end = lines.len();
    for (i, line) in lines.iter().enumerate().skip(header + 1) {
        if !is_meaningful(line) {
            continue;
        }
        let col = indent_of(line);
        let item = line[col..].starts_with("- ") || line[col..] == *"-";
        match indent {
            None if item => indent = Some(col),
            None => {
                end = i;
                break;
            }
            Some(c) if col < c || (col == c && !item) => {
                end = i;
                break;
            }
            _ => {}
        }
        if item && Some(col) == indent {
            if let Some(last) = items.last_mut() {
                last.1 = i;
            }
            items.push((i, lines.len()));
        }
    }
    if let Some(last) = items.last_mut() {
        last.1 = end;
    }
    Ok(Layout {
        header,
        indent: indent.unwrap_or(2),
        items,
    })
}

fn render_entry(e: &KeyEntry, indent: usize) -> Vec<String> {
    let pad = " ".repeat(indent);
    let field = " ".repeat(indent + 2);
    let roles: Vec<String> = e.roles.iter().map(|r| yaml_string(r)).collect();
    let mut out = vec![
        format!("{pad}- id: {}", yaml_string(&e.id)),
        format!("{field}client_id: {}", e.client_id),
        format!("{field}name: {}", yaml_string(&e.name)),
        format!("{field}secret_hash: {}", yaml_string(&e.secret_hash)),
        format!("{field}roles: [{}]", roles.join(", ")),
    ];
    if let Some(exp) = &e.expiration {
        out.push(format!("{field}expiration: {exp}"));
    }
    out.push(format!("{field}is_valid: {}", e.is_valid));
    if let Some(c) = &e.created {
        out.push(format!("{field}created: {c}"));
    }
    out
}

/// Applies the edit to the text; returns the new text and the keys it must parse to.
fn apply(text: &str, before: &KeysFile, edit: Edit) -> Result<(String, Vec<KeyEntry>), String> {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    if let Some(header) = lines.iter().position(|l| l.starts_with("keys:")) {
        let rest = lines[header]["keys:".len()..].trim();
        if rest.starts_with("[]") && before.keys.is_empty() {
            lines[header] = "keys:".into();
        }
    } else if before.keys.is_empty() {
        lines.push("keys:".into());
    }
    let layout = layout(&lines)?;
    if layout.items.len() != before.keys.len() {
        return Err("could not find every entry of `keys:` as a block list item".into());
    }
    let mut expected = before.keys.clone();
    match edit {
        Edit::Append(entries) => {
            let at = layout
                .items
                .last()
                .map_or(layout.header + 1, |(_, end)| *end);
            // Keep trailing blank lines and comments after the new entries.
            let at = (layout.header + 1..at)
                .rev()
                .take_while(|i| !is_meaningful(&lines[*i]))
                .last()
                .unwrap_or(at);
            let new: Vec<String> = entries
                .iter()
                .flat_map(|e| render_entry(e, layout.indent))
                .collect();
            lines.splice(at..at, new);
            expected.extend(entries);
        }
        Edit::Fields(index, fields) => {
            let (start, mut end) = layout.items[index];
            let first = &lines[start];
            let field_col = indent_of(first)
                + 1
                + (first[indent_of(first) + 1..].len()
                    - first[indent_of(first) + 1..].trim_start_matches(' ').len());
            for (name, value) in fields {
                let found = (start..end).find(|i| {
                    let l = &lines[*i];
                    let col = if *i == start { field_col } else { indent_of(l) };
                    col == field_col && l[col..].starts_with(&format!("{name}:"))
                });
                match found {
                    Some(i) => {
                        lines[i] = format!("{}{name}: {value}", &lines[i][..field_col]);
                    }
                    None => {
                        let last = (start..end)
                            .rev()
                            .find(|i| is_meaningful(&lines[*i]))
                            .unwrap_or(start);
                        lines.insert(
                            last + 1,
                            format!("{}{name}: {value}", " ".repeat(field_col)),
                        );
                        end += 1;
                    }
                }
                let e = &mut expected[index];
                match name {
                    "is_valid" => e.is_valid = value == "true",
                    "secret_hash" => {
                        e.secret_hash = serde_json::from_str(&value).unwrap_or_default()
                    }
                    _ => {}
                }
            }
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    Ok((out, expected))
}

#[cfg(test)]
mod tests;
