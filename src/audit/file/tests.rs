//! The file sink when the disk misbehaves.

use super::*;
use crate::config::{AuditSettings, AuditSink};
use crate::metrics::Metrics;

fn sink(path: &Path) -> FileSink {
    let settings = AuditSettings {
        sink: AuditSink::File(path.to_path_buf()),
        rotate_size: 1 << 20,
        keep: 1,
        record_passthrough: true,
        write_timeout: Duration::from_secs(5),
        bypass_retention: Duration::from_secs(3600),
    };
    let shared = Shared::new(settings, Arc::default(), Arc::new(Metrics::default()));
    FileSink::open(path.to_path_buf(), shared).0
}

fn record(i: usize) -> Encoded {
    crate::audit::record::encode("request", &serde_json::json!({"request_id": i}))
}

#[test]
fn nothing_is_appended_after_a_batch_that_could_not_be_cut_off() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("audit.jsonl");
    let mut s = sink(&path);
    s.write("t", &[record(1), record(2)], true).unwrap();
    let good = std::fs::metadata(&path).unwrap().len();

    // A handle that can neither write nor truncate: the batch fails, and so does
    // cutting it off.
    let writable = std::mem::replace(
        &mut s.open.as_mut().unwrap().file,
        File::open(&path).unwrap(),
    );
    assert!(s.write("t", &[record(3)], true).is_err());
    assert!(s.dirty, "the failed cut is remembered");
    // Until the cut succeeds, every batch is refused — never appended after it.
    let err = s.write("t", &[record(4)], true).unwrap_err();
    assert!(err.to_string().contains("refusing to append"), "{err}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), good);

    s.open.as_mut().unwrap().file = writable;
    s.write("t", &[record(5)], true).unwrap();
    assert!(!s.dirty);
    let report = crate::audit::verify::verify(std::slice::from_ref(&path)).unwrap();
    assert_eq!((report.records, report.last_seq), (3, Some(3)));
}
