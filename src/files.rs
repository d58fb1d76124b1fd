//! Reading files that a configuration names, bounded: a FIFO, a device or a
//! huge file must never block keygate or fill its memory.

use std::path::Path;

/// Reads a regular file of at most `max` bytes as UTF-8. A FIFO, a device or
/// anything larger is refused at once instead of blocking or filling memory.
pub fn read_capped(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    // O_NONBLOCK: opening a FIFO must not wait for a writer.
    const O_NONBLOCK: i32 = 0o4000;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "expected a regular file (not a FIFO, device or directory)",
        ));
    }
    if meta.len() > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("expected at most {max} bytes, the file has {}", meta.len()),
        ));
    }
    let mut text = String::new();
    file.take(max + 1).read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("expected at most {max} bytes"),
        ));
    }
    Ok(text)
}
