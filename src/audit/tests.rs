use std::path::Path;

use super::verify::verify;
use super::*;
use crate::config::{AuditSettings, AuditSink};
use serde_json::Value;

fn dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("keygate-audit-{tag}-"))
        .tempdir()
        .unwrap()
}

fn settings(path: &Path, rotate_size: u64, keep: u32) -> AuditSettings {
    AuditSettings {
        sink: AuditSink::File(path.to_path_buf()),
        rotate_size,
        keep,
        record_passthrough: true,
        write_timeout: std::time::Duration::from_secs(5),
        bypass_retention: std::time::Duration::from_secs(24 * 3600),
    }
}

fn start(s: AuditSettings) -> (Audit, AuditThread, Recovery, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let (audit, thread, recovery) = Audit::start(s, Arc::default(), Arc::clone(&metrics)).unwrap();
    (audit, thread, recovery, metrics)
}

fn fields(i: usize) -> Encoded {
    record::encode(
        "request",
        &serde_json::json!({"request_id": format!("r{i}"), "path": "/wiki/x"}),
    )
}

async fn write_n(audit: &Audit, n: usize) {
    for i in 0..n {
        audit.durable(fields(i)).await.unwrap();
    }
}

async fn stop(audit: Audit, thread: AuditThread) {
    audit.close().await;
    drop(audit);
    thread.join().await;
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn a_fresh_trail_verifies_and_the_chain_continues_across_restarts() {
    let tmp = dir("fresh");
    let d = tmp.path().to_path_buf();
    let path = d.join("audit.jsonl");
    let (audit, thread, recovery, _) = start(settings(&path, 1 << 20, 3));
    assert_eq!(recovery.next_seq, 1);
    write_n(&audit, 5).await;
    stop(audit, thread).await;
    let (audit, thread, recovery, _) = start(settings(&path, 1 << 20, 3));
    assert_eq!(recovery.next_seq, 6, "seq continues after a restart");
    write_n(&audit, 5).await;
    stop(audit, thread).await;
    let report = verify(std::slice::from_ref(&path)).unwrap();
    assert_eq!(report.records, 10);
    assert_eq!((report.first_seq, report.last_seq), (Some(1), Some(10)));
    assert!(report.warnings.is_empty());
    let first: Value = serde_json::from_str(&lines(&path)[0]).unwrap();
    assert_eq!(first["prev"], chain::GENESIS);
}

#[tokio::test]
async fn rotation_keeps_the_chain_and_prunes_beyond_keep() {
    let tmp = dir("rotate");
    let d = tmp.path().to_path_buf();
    let path = d.join("audit.jsonl");
    let (audit, thread, _, _) = start(settings(&path, 4096, 2));
    write_n(&audit, 100).await;
    stop(audit, thread).await;
    assert!(file::rotated(&path, 1).exists());
    assert!(file::rotated(&path, 2).exists());
    assert!(!file::rotated(&path, 3).exists(), "beyond keep is deleted");
    for f in [
        path.clone(),
        file::rotated(&path, 1),
        file::rotated(&path, 2),
    ] {
        assert!(
            std::fs::metadata(&f).unwrap().len() <= 4096,
            "{f:?} over rotate_size"
        );
    }
    // Given as a directory, or as files in any order: the chain is followed.
    let report = verify(std::slice::from_ref(&d)).unwrap();
    assert_eq!(report.last_seq, Some(100));
    assert!(
        report.first_seq.unwrap() > 1,
        "the pruned beginning is reported"
    );
    assert!(report.to_string().contains("earlier files were pruned"));
    let shuffled = [
        file::rotated(&path, 1),
        path.clone(),
        file::rotated(&path, 2),
    ];
    assert_eq!(verify(&shuffled).unwrap().records, report.records);
    // The first record of the active file links to the last line of `.1`.
    let last_of_1 = lines(&file::rotated(&path, 1)).pop().unwrap();
    let first_active: Value = serde_json::from_str(&lines(&path)[0]).unwrap();
    assert_eq!(
        first_active["prev"],
        chain::sha256_hex(last_of_1.as_bytes())
    );
    // A missing file in the middle of the chain is named.
    let err = verify(&[path.clone(), file::rotated(&path, 2)]).unwrap_err();
    assert!(err.why.contains("a file is missing in the middle"), "{err}");
    assert_eq!(err.line, 1);
}

/// Tampering cases: each must fail, naming the file and line.
#[tokio::test]
async fn verify_names_the_first_broken_line() {
    let tmp = dir("tamper");
    let d = tmp.path().to_path_buf();
    let path = d.join("audit.jsonl");
    let (audit, thread, _, _) = start(settings(&path, 1 << 20, 1));
    write_n(&audit, 10).await;
    stop(audit, thread).await;
    let original = lines(&path);
    let write = |ls: &[String]| std::fs::write(&path, ls.join("\n") + "\n").unwrap();

    // One byte edited in line 4.
    let mut edited = original.clone();
    edited[3] = edited[3].replacen("/wiki/x", "/wiki/y", 1);
    write(&edited);
    let err = verify(std::slice::from_ref(&path)).unwrap_err();
    assert_eq!(err.line, 4, "{err}");
    assert!(err.why.contains("edited"), "{err}");

    // Line 6 deleted.
    let mut deleted = original.clone();
    deleted.remove(5);
    write(&deleted);
    let err = verify(std::slice::from_ref(&path)).unwrap_err();
    assert_eq!(err.line, 6, "{err}");
    assert!(err.why.contains("deleted"), "{err}");

    // Lines 7 and 8 swapped.
    let mut swapped = original.clone();
    swapped.swap(6, 7);
    write(&swapped);
    let err = verify(std::slice::from_ref(&path)).unwrap_err();
    assert_eq!(err.line, 7, "{err}");
    assert!(err.why.contains("reordered"), "{err}");
    assert!(err
        .to_string()
        .starts_with(&format!("{}:7:", path.display())));

    // The last line deleted is undetectable by the chain alone — but re-hashing a
    // forged record is not: its prev and seq must still fit.
    write(&original);
    assert!(verify(std::slice::from_ref(&path)).is_ok());
}

#[tokio::test]
async fn a_torn_last_line_is_cut_at_start_and_a_warning_for_verify() {
    let tmp = dir("torn");
    let d = tmp.path().to_path_buf();
    let path = d.join("audit.jsonl");
    let (audit, thread, _, _) = start(settings(&path, 1 << 20, 1));
    write_n(&audit, 3).await;
    stop(audit, thread).await;
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"ts\":\"2026-11-23T10:00:00.000Z\",\"seq\":4,\"ev");
    std::fs::write(&path, &text).unwrap();
    let report = verify(std::slice::from_ref(&path)).unwrap();
    assert_eq!(report.records, 3);
    assert_eq!(report.warnings.len(), 1, "{report:?}");
    assert!(
        report.warnings[0].contains(":4: torn last line"),
        "{:?}",
        report.warnings
    );

    let (audit, thread, recovery, _) = start(settings(&path, 1 << 20, 1));
    assert!(recovery.torn_bytes.unwrap() > 10);
    assert_eq!(recovery.next_seq, 4);
    audit
        .durable(record::encode(
            "startup",
            &serde_json::json!({"torn_line_cut_bytes": recovery.torn_bytes}),
        ))
        .await
        .unwrap();
    stop(audit, thread).await;
    let report = verify(std::slice::from_ref(&path)).unwrap();
    assert_eq!(report.records, 4);
    assert!(report.warnings.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_durable_records_share_fsyncs() {
    let tmp = dir("group");
    let d = tmp.path().to_path_buf();
    let path = d.join("audit.jsonl");
    let (audit, thread, _, metrics) = start(settings(&path, 1 << 30, 1));
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..32 {
        let audit = audit.clone();
        tasks.spawn(async move {
            for i in 0..50 {
                audit.durable(fields(t * 1000 + i)).await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let fsyncs = metrics.audit_fsyncs.get();
    stop(audit, thread).await;
    assert_eq!(verify(&[path]).unwrap().records, 1600);
    assert!(
        fsyncs < 1600 / 2,
        "{fsyncs} fsyncs for 1600 durable records"
    );
}

#[tokio::test]
async fn client_strings_are_escaped_never_spliced() {
    let tmp = dir("escape");
    let d = tmp.path().to_path_buf();
    let path = d.join("audit.jsonl");
    let (audit, thread, _, _) = start(settings(&path, 1 << 20, 1));
    let nasty = "ua\",\"admin_key\":true,\"x\":\"\n{\"seq\":1}";
    audit
        .durable(record::encode(
            "request",
            &serde_json::json!({"user_agent": nasty}),
        ))
        .await
        .unwrap();
    stop(audit, thread).await;
    let all = lines(&path);
    assert_eq!(all.len(), 1);
    let v: Value = serde_json::from_str(&all[0]).unwrap();
    assert_eq!(v["user_agent"], nasty);
    assert!(v.get("admin_key").is_none());
    assert!(verify(&[path]).is_ok());
}

/// A sink that keeps what it is given, or blocks while `hold` is set.
#[derive(Default)]
struct Captured {
    records: Arc<std::sync::Mutex<Vec<Encoded>>>,
    hold: Arc<std::sync::atomic::AtomicBool>,
    /// Each write: how many records, and whether durable.
    batches: Arc<std::sync::Mutex<Vec<(usize, bool)>>>,
    written: Arc<tokio::sync::Notify>,
}

impl writer::Sink for Captured {
    fn write(&mut self, _ts: &str, records: &[Encoded], durable: bool) -> Result<(), AuditError> {
        while self.hold.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        self.records.lock().unwrap().extend(records.iter().cloned());
        self.batches.lock().unwrap().push((records.len(), durable));
        self.written.notify_one();
        Ok(())
    }
    fn tick(&mut self, _closing: bool) {}
}

fn request_ids(records: &[Encoded]) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_slice(&[b"{", &r.fields[..], b"}"].concat()).unwrap();
            v["request_id"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

#[tokio::test]
async fn best_effort_records_reach_the_writer_together_and_in_the_order_made() {
    let (audit, shared, rx, _) = captured(std::time::Duration::from_secs(5), 64, Some(QUEUE));
    let sink = Captured::default();
    let (records, batches, written) = (
        Arc::clone(&sink.records),
        Arc::clone(&sink.batches),
        Arc::clone(&sink.written),
    );
    let handle = writer::start_with(Box::new(sink), Arc::clone(&shared), rx).unwrap();
    for i in 0..100 {
        audit.record(fields(i));
    }
    // Handed over by the task once this task yields: one write for all of them.
    tokio::time::timeout(std::time::Duration::from_secs(10), written.notified())
        .await
        .unwrap();
    assert_eq!(*batches.lock().unwrap(), [(100, false)]);
    // A durable record takes those made before it along, ahead of it.
    audit.record(fields(100));
    audit.record(fields(101));
    audit.durable(fields(102)).await.unwrap();
    assert_eq!(batches.lock().unwrap()[1], (3, true));
    audit.close().await;
    handle.join().await;
    let ids = request_ids(&records.lock().unwrap());
    let expected: Vec<String> = (0..103).map(|i| format!("r{i}")).collect();
    assert_eq!(ids, expected);
    assert_eq!(batches.lock().unwrap().len(), 2, "nothing left for close");
    assert_eq!(shared.queued.load(Ordering::Acquire), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_requests_lose_no_gathered_record_and_keep_each_ones_order() {
    let (audit, shared, rx, metrics) =
        captured(std::time::Duration::from_secs(10), 64, Some(QUEUE));
    let sink = Captured::default();
    let records = Arc::clone(&sink.records);
    let handle = writer::start_with(Box::new(sink), Arc::clone(&shared), rx).unwrap();
    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let audit = audit.clone();
            tokio::spawn(async move {
                for round in 0..5 {
                    let i = (t * 5 + round) * 3;
                    audit.record(fields(i));
                    audit.durable(fields(i + 1)).await.unwrap();
                    audit.record(fields(i + 2));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    audit.close().await;
    handle.join().await;
    let ids = request_ids(&records.lock().unwrap());
    assert_eq!(metrics.audit_dropped.get(), 0);
    let mut sorted = ids.clone();
    sorted.sort();
    let mut expected: Vec<String> = (0..64 * 5 * 3).map(|i| format!("r{i}")).collect();
    expected.sort();
    assert_eq!(sorted, expected, "every record exactly once");
    let at = |i: usize| ids.iter().position(|id| *id == format!("r{i}")).unwrap();
    for n in 0..64 * 5 {
        let i = n * 3;
        assert!(
            at(i) < at(i + 1) && at(i + 1) < at(i + 2),
            "request {n} out of order"
        );
        if n % 5 > 0 {
            assert!(at(i - 1) < at(i), "one task's requests out of order at {n}");
        }
    }
    assert_eq!(shared.queued.load(Ordering::Acquire), 0);
}

#[tokio::test]
async fn gathered_records_are_bounded_dropped_beyond_and_counted() {
    let (audit, shared, rx, metrics) = captured(std::time::Duration::from_secs(5), 64, Some(3));
    for i in 0..5 {
        audit.record(fields(i));
    }
    assert_eq!(metrics.audit_dropped.get(), 2);
    let sink = Captured::default();
    let records = Arc::clone(&sink.records);
    let handle = writer::start_with(Box::new(sink), Arc::clone(&shared), rx).unwrap();
    audit.close().await;
    handle.join().await;
    let got = records.lock().unwrap().clone();
    let events: Vec<&str> = got.iter().map(|r| r.event).collect();
    assert_eq!(events, ["audit_dropped", "request", "request", "request"]);
    assert_eq!(String::from_utf8_lossy(&got[0].fields), "\"dropped\":2");
    assert_eq!(shared.queued.load(Ordering::Acquire), 0, "room again");
}

/// A handle on a channel the test reads from (no writer yet). With `gather`,
/// best-effort records are gathered as `Audit::start` does on a runtime, at most
/// that many waiting.
fn captured(
    write_timeout: std::time::Duration,
    queue: usize,
    gather: Option<usize>,
) -> (
    Audit,
    Arc<Shared>,
    tokio::sync::mpsc::Receiver<writer::Job>,
    Arc<Metrics>,
) {
    let metrics = Arc::new(Metrics::default());
    let mut s = settings(Path::new("/nonexistent/audit.jsonl"), 1 << 20, 1);
    s.write_timeout = write_timeout;
    let mut shared = Shared::new(s, Arc::default(), Arc::clone(&metrics));
    let (tx, rx) = tokio::sync::mpsc::channel(queue);
    let audit = match gather {
        Some(limit) => {
            Arc::get_mut(&mut shared).unwrap().queue_limit = limit;
            Audit::new(tx, Arc::clone(&shared))
        }
        None => Audit {
            tx,
            shared: Arc::clone(&shared),
            gathered: None,
        },
    };
    (audit, shared, rx, metrics)
}

#[tokio::test]
async fn a_full_queue_drops_best_effort_records_and_the_trail_says_how_many() {
    let (audit, shared, rx, metrics) = captured(std::time::Duration::from_secs(5), 2, None);
    for i in 0..5 {
        audit.record(fields(i));
    }
    assert_eq!(
        metrics.audit_dropped.get(),
        3,
        "no task, no memory: dropped and counted"
    );
    let records = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Captured {
        records: Arc::clone(&records),
        ..Captured::default()
    };
    let handle = writer::start_with(Box::new(sink), shared, rx).unwrap();
    audit.close().await;
    handle.join().await;
    let got = records.lock().unwrap().clone();
    let events: Vec<&str> = got.iter().map(|r| r.event).collect();
    assert_eq!(events, ["audit_dropped", "request", "request"]);
    assert_eq!(String::from_utf8_lossy(&got[0].fields), "\"dropped\":3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_disk_fails_durable_writes_within_the_write_timeout() {
    let (audit, shared, rx, metrics) = captured(std::time::Duration::from_millis(300), 64, None);
    let hold = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sink = Captured {
        hold: Arc::clone(&hold),
        ..Captured::default()
    };
    let handle = writer::start_with(Box::new(sink), Arc::clone(&shared), rx).unwrap();
    let started = std::time::Instant::now();
    let result = audit.durable(fields(1)).await;
    assert!(matches!(result, Err(AuditError::Timeout(_))), "{result:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert_eq!(metrics.audit_errors.get(), 1);
    assert!(shared.readiness.reasons()[0].contains("longer than"));
    hold.store(false, std::sync::atomic::Ordering::Relaxed);
    audit.durable(fields(2)).await.unwrap();
    assert!(shared.readiness.reasons().is_empty(), "recovers by itself");
    audit.close().await;
    handle.join().await;
}

/// A request record that carried the bypass.
fn bypass(i: usize) -> Encoded {
    record::encode(
        "request",
        &serde_json::json!({"phase": "start", "request_id": format!("b{i}"), "admin_key": true}),
    )
}

#[tokio::test]
async fn rotation_never_deletes_recent_bypass_records_and_says_so() {
    let tmp = dir("retain");
    let path = tmp.path().join("audit.jsonl");
    let (audit, thread, _, metrics) = start(settings(&path, 4096, 1));
    for i in 0..60 {
        audit.durable(bypass(i)).await.unwrap();
    }
    let files = std::fs::read_dir(tmp.path()).unwrap().count();
    assert!(files > 3, "{files} files: nothing was pruned");
    assert!(metrics.audit_files_retained.get() > 0);
    // Passthrough-only files beyond keep go as before.
    stop(audit, thread).await;
    assert!(verify(std::slice::from_ref(&tmp.path().to_path_buf())).is_ok());
    assert_eq!(
        verify(std::slice::from_ref(&tmp.path().to_path_buf()))
            .unwrap()
            .first_seq,
        Some(1),
        "the whole chain is still there"
    );

    // With the retention over, the next rotation prunes them.
    let mut s = settings(&path, 4096, 1);
    s.bypass_retention = std::time::Duration::ZERO;
    let (audit, thread, _, metrics) = start(s);
    for i in 0..20 {
        audit.durable(fields(i)).await.unwrap();
    }
    stop(audit, thread).await;
    assert_eq!(metrics.audit_files_retained.get(), 0);
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 2);
}

#[tokio::test]
async fn with_keep_zero_a_crash_after_rotation_keeps_the_chain_head() {
    let tmp = dir("keep0");
    let path = tmp.path().join("audit.jsonl");
    let (audit, thread, _, _) = start(settings(&path, 4096, 0));
    write_n(&audit, 10).await;
    stop(audit, thread).await;
    // A crash right after a rotation's rename, before the new file's first batch.
    std::fs::rename(&path, file::rotated(&path, 1)).unwrap();
    let (audit, thread, recovery, _) = start(settings(&path, 4096, 0));
    assert_eq!(
        recovery.next_seq, 11,
        "the head is read from the rotated file"
    );
    write_n(&audit, 60).await;
    stop(audit, thread).await;
    assert!(!file::rotated(&path, 2).exists());
    let report = verify(std::slice::from_ref(&path)).unwrap();
    assert_eq!(report.last_seq, Some(70));
}
