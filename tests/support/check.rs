//! Assertions used across areas.

use keygate::dev::confluence_standin::{Recorded, StandinState};

/// Fails if the stand-in received any request for which `matches` holds.
pub fn assert_never_forwarded(
    standin: &StandinState,
    what: &str,
    matches: impl Fn(&Recorded) -> bool,
) {
    let seen: Vec<String> = standin
        .requests()
        .iter()
        .filter(|r| matches(r))
        .map(|r| format!("{} {}", r.method, r.target))
        .collect();
    assert!(seen.is_empty(), "{what} reached Confluence: {seen:?}");
}

/// Fails if `text` contains any of `secrets` (or their Basic base64 form).
pub fn assert_no_secret(text: &str, secrets: &[&str], context: &str) {
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        assert!(
            !text.contains(secret),
            "a secret appears in {context}: {}…",
            &secret[..secret.len().min(6)]
        );
    }
}
