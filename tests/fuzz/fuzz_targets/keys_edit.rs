//! The keys-file editor: never a panic; an edit it accepts leaves a file that
//! parses to exactly the intended keys (checked inside `edit_text`).
#![no_main]

use keygate::client_keys::edit::edit_text;
use keygate::client_keys::KeyEntry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&op, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let new = KeyEntry {
        id: "9999".into(),
        client_id: "fuzz_aaaaaaaaaaaaaaaaaaaaaaaaa".into(),
        name: "fuzz".into(),
        secret_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g".into(),
        roles: vec!["r".into()],
        expiration: None,
        is_valid: true,
        created: None,
    };
    let index = (op < 128).then_some(usize::from(op % 8));
    let _ = edit_text(text, index, &new);
});
