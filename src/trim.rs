//! Gives memory that the allocator holds but no longer uses back to the system
//! once the process is quiet.
//!
//! mimalloc returns emptied pages to the system a second after they empty
//! (its purge delay), but only when it next runs its collection: on some of its
//! allocation paths, or when a thread ends. A burst of connections leaves
//! megabytes of such pages behind, and a proxy that goes quiet afterwards may
//! not run that collection again for hours: at 256 connections, 7 MiB of
//! keygate's 26 MiB stayed resident after the load for good. Safe code cannot
//! call mimalloc's `mi_collect`, so a thread does what mimalloc does when a
//! thread ends: every `EVERY`, if the process used less than `QUIET` of a core
//! since the last look, it starts a thread that allocates once and ends, and
//! that ending visits every arena and purges what has been free for longer than
//! the purge delay. A busy process is left alone (it runs mimalloc's own
//! collection, and a round would only cost it a thread start); memory still in
//! use, or freed less than a second ago, is never touched.

use std::time::Duration;

/// How often the process is looked at (past mimalloc's one-second delay).
pub const EVERY: Duration = Duration::from_secs(2);
/// At most this much CPU time per `EVERY` counts as quiet (5 % of a core).
const QUIET: Duration = Duration::from_millis(100);

/// Starts the trimming thread (once per process: `keygate run` and `keygate dev`).
pub fn start() {
    let spawned = std::thread::Builder::new()
        .name("keygate-trim".into())
        .spawn(|| {
            let mut last = cpu_time();
            loop {
                std::thread::sleep(EVERY);
                let now = cpu_time();
                if quiet(last, now) {
                    round();
                }
                last = now;
            }
        });
    if let Err(e) = spawned {
        tracing::debug!(error = %e, "no memory trimming thread");
    }
}

/// Whether the process used at most `QUIET` between two readings (when the
/// time cannot be read, it counts as quiet: trimming is cheap).
fn quiet(before: Option<Duration>, after: Option<Duration>) -> bool {
    match (before, after) {
        (Some(before), Some(after)) => after.saturating_sub(before) <= QUIET,
        _ => true,
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

/// The process's user and system CPU time so far (`/proc/self/stat`).
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let ticks = cpu_ticks(&stat)?;
    // Linux reports these in USER_HZ, 100 on every architecture it exposes.
    Some(Duration::from_millis(ticks.checked_mul(10)?))
}

/// utime + stime from a `/proc/PID/stat` line: fields 14 and 15, counted after
/// the command name, which is in parentheses and may itself hold spaces and
/// parentheses.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_after_the_command_name() {
        let tail = "S 1 2 3 4 5 6 7 8 9 10 120 35 0 0 20 0 7 0 100 200 300";
        for (line, expected) in [
            (format!("4242 (keygate) {tail}"), Some(155)),
            (format!("4242 (key gate) {tail}"), Some(155)),
            (format!("4242 (k) (x) {tail}"), Some(155)),
            (format!("4242 (k)) {tail}"), Some(155)),
            ("4242 (keygate) S 1 2".to_owned(), None),
            ("no parenthesis at all".to_owned(), None),
            (format!("4242 (keygate) {}", tail.replace("120", "x")), None),
        ] {
            assert_eq!(cpu_ticks(&line), expected, "{line}");
        }
        assert!(cpu_time().is_some(), "this process's own");
    }

    #[test]
    fn a_process_is_quiet_below_five_percent_of_a_core() {
        let at = |ms| Some(Duration::from_millis(ms));
        assert!(quiet(at(1000), at(1000)));
        assert!(quiet(at(1000), at(1100)));
        assert!(!quiet(at(1000), at(1110)));
        assert!(!quiet(at(0), at(2000)));
        assert!(quiet(None, at(5000)), "unreadable counts as quiet");
        assert!(quiet(at(5000), at(4000)), "never negative");
    }
}
