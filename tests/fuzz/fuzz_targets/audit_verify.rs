//! The audit verifier: never a panic, whatever the files hold or how they are
//! split into files.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A 0xFF byte separates files.
    let files: Vec<(std::path::PathBuf, Vec<u8>)> = data
        .split(|b| *b == 0xFF)
        .enumerate()
        .map(|(i, f)| (format!("audit.jsonl.{i}").into(), f.to_vec()))
        .collect();
    let _ = keygate::audit::verify::verify_contents(&files);
});
