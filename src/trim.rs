//! Gives memory that the allocator holds but no longer uses back to the system.
//!
//! mimalloc returns emptied pages to the system a second after they empty
//! (its purge delay), but only when it next runs its collection: on some of its
//! allocation paths, or when a thread ends. A burst of connections leaves
//! megabytes of such pages behind, and a proxy that goes quiet afterwards may
//! not run that collection again for hours: at 256 connections, 7 MiB of
//! keygate's 26 MiB stayed resident after the load for good. Safe code cannot
//! call mimalloc's `mi_collect`, so a thread does what mimalloc does when a
//! thread ends: every `EVERY` it starts a thread that allocates once and ends,
//! and that ending visits every arena and purges what has been free for longer
//! than the purge delay. Memory still in use, or freed less than a second ago,
//! is left alone, so under load this returns only what the load no longer
//! needs; each round costs one thread start (tens of microseconds).

use std::time::Duration;

/// How often emptied memory is given back (past mimalloc's one-second delay).
pub const EVERY: Duration = Duration::from_secs(2);

/// Starts the trimming thread (once per process: `keygate run` and `keygate dev`).
pub fn start() {
    let spawned = std::thread::Builder::new()
        .name("keygate-trim".into())
        .spawn(|| loop {
            std::thread::sleep(EVERY);
            round();
        });
    if let Err(e) = spawned {
        tracing::debug!(error = %e, "no memory trimming thread");
    }
}

/// One short-lived thread: it allocates, so that the allocator sets up (and at
/// its end collects) a heap for it.
fn round() {
    let ended = std::thread::Builder::new()
        .name("keygate-trim-1".into())
        .spawn(|| drop(std::hint::black_box(vec![0u8; 64])));
    if let Ok(thread) = ended {
        let _ = thread.join();
    }
}
