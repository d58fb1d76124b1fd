//! The command line as a user runs it: exit codes and one-line errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;

const SECRETS: &[(&str, &str)] = &[
    ("KEYGATE_ADMIN_TOKEN", "an-admin-token-of-enough-length"),
    ("CONFLUENCE_API_TOKEN", "confluence-token"),
];

fn keygate(args: &[&str]) -> (i32, String, String) {
    let out = support::process::cli(args, None, SECRETS);
    (out.code, out.stdout, out.stderr)
}

fn example() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/keygate.example.yaml")
        .display()
        .to_string()
}

#[test]
fn check_accepts_the_example_config_and_prints_a_summary() {
    let (code, out, err) = keygate(&["check", "--config", &example()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("valid"), "{out}");
    assert!(out.contains("scan-restricted-pages"), "{out}");
    assert!(out.contains("BYPASS"), "{out}");
    assert!(out.contains("2 keys, 1 usable"), "{out}");
    assert!(out.lines().count() < 25, "more than a screen: {out}");
    let (code, out, _) = keygate(&["check", "--json", "--config", &example()]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["routes"][0]["admin_key"], true);
}

#[test]
fn check_names_the_broken_field_and_exits_1() {
    let tmp = support::temp_dir("cli");
    let dir = tmp.path();
    let text = std::fs::read_to_string(example())
        .unwrap()
        .replace("methods: [GET, HEAD]", "methods: [GET, HEDA]")
        .replace(
            "keys.example.yaml",
            &format!("{}/config/keys.example.yaml", env!("CARGO_MANIFEST_DIR")),
        );
    let file = dir.join("broken.yaml");
    std::fs::write(&file, text).unwrap();
    let (code, out, err) = keygate(&["check", "--config", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("broken.yaml"), "{err}");
    assert!(err.contains("routes[2].methods[1]"), "{err}");
    assert!(err.contains("HEDA"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    std::fs::write(&file, "listen:\n  address: 127.0.0.1:1\n  tsl: {}\n").unwrap();
    let (code, _, err) = keygate(&["check", "--config", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("broken.yaml:3:"), "{err}");
    assert!(err.contains("unknown field `tsl`"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn missing_files_and_bad_flags_are_one_line_errors() {
    let (code, _, err) = keygate(&["check", "--config", "/nonexistent/keygate.yaml"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/keygate.yaml"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let (code, _, _) = keygate(&["check", "--no-such-flag"]);
    assert_eq!(code, 2);
    let (code, _, _) = keygate(&["frobnicate"]);
    assert_eq!(code, 2);
}

#[test]
fn help_lists_only_what_works() {
    let (code, out, _) = keygate(&["--help"]);
    assert_eq!(code, 0);
    for cmd in ["run", "dev", "check", "explain", "keys"] {
        assert!(out.contains(cmd), "{cmd} missing: {out}");
    }
}

#[test]
fn explain_shows_canonical_path_route_and_bypass() {
    let (code, out, err) = keygate(&[
        "explain",
        "GET",
        "/wiki/api/v2/%70ages/42",
        "--config",
        &example(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("canonical   /wiki/api/v2/pages/42"), "{out}");
    assert!(out.contains("scan-restricted-pages"), "{out}");
    assert!(out.contains("read-anything-normally"), "{out}");

    let (_, out, _) = keygate(&[
        "explain",
        "GET",
        "/wiki/api/v2/pages/42",
        "--client-id",
        "scanner_aqbrt8tj0r356s42hks91aoz1",
        "--config",
        &example(),
    ]);
    assert!(
        out.contains("forwarded by route `scan-restricted-pages`"),
        "{out}"
    );
    assert!(out.contains("ADDED"), "{out}");

    let (_, out, _) = keygate(&[
        "explain",
        "GET",
        "/wiki/api/v2/pages/42",
        "--client-id",
        "wiki-reader_8n41q2ib9j1izmo8akgv272ka",
        "--config",
        &example(),
    ]);
    assert!(out.contains("401"), "revoked key: {out}");

    let (_, out, _) = keygate(&[
        "explain",
        "GET",
        "/wiki/api/v2/pages/..;/admin",
        "--config",
        &example(),
    ]);
    assert!(out.contains("refused"), "{out}");
    assert!(out.contains("400"), "{out}");

    let (_, out, _) = keygate(&[
        "explain",
        "DELETE",
        "/wiki/api/v2/pages/42",
        "--json",
        "--config",
        &example(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], 403);
}
