use super::*;

fn dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("keygate-edit-{tag}-"))
        .tempdir()
        .unwrap()
}

fn new_key(name: &str, roles: &[&str]) -> NewKey {
    NewKey {
        name: name.into(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        ..Default::default()
    }
}

const HAND_WRITTEN: &str = "# hand-written, with comments\nkeys:\n    # the scanner\n    -   id: 7\n        client_id: scanner_aaaaaaaaaaaaaaaaaaaaaaaaa   # keep me\n        name: scanner\n        secret_hash: \"HASH\"\n        roles:\n          - compliance-scanner\n\n    - id: \"8\"\n      client_id: reader_bbbbbbbbbbbbbbbbbbbbbbbbb\n      name: reader\n      secret_hash: 'HASH'\n      roles: [reader]\n# trailing comment\n";

fn hand_written(d: &Path) -> PathBuf {
    let hash = crate::client_keys::hash_secret("Secret-123").unwrap();
    let path = d.join("keys.yaml");
    std::fs::write(&path, HAND_WRITTEN.replace("HASH", &hash)).unwrap();
    path
}

#[test]
fn create_makes_the_file_and_appends_and_keeps_other_entries_byte_for_byte() {
    let tmp = dir("create");
    let d = tmp.path().to_path_buf();
    let path = d.join("keys.yaml");
    let first = create(&path, new_key("scanner", &["compliance-scanner"])).unwrap();
    let secret = first.generated_secret.clone().unwrap();
    assert!(secret.starts_with("kgs_"));
    let text1 = std::fs::read_to_string(&path).unwrap();
    assert!(
        !text1.contains(&secret),
        "the secret itself is never written"
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let second = create(&path, new_key("reader", &["reader"])).unwrap();
    let text2 = std::fs::read_to_string(&path).unwrap();
    assert!(
        text2.starts_with(&text1),
        "first entry changed:\n{text1}\n---\n{text2}"
    );
    let keys = list(&path).unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0].id, "1001");
    assert_eq!(keys[1].id, "1002");
    assert_eq!(keys[1].client_id, second.entry.client_id);
    assert!(crate::client_keys::verify_secret(
        &secret,
        &keys[0].secret_hash
    ));
}

#[test]
fn edits_touch_only_their_entry_in_a_hand_written_file() {
    let tmp = dir("hand");
    let d = tmp.path().to_path_buf();
    let path = hand_written(&d);
    let before = std::fs::read_to_string(&path).unwrap();
    revoke(
        &path,
        Selector::ClientId("reader_bbbbbbbbbbbbbbbbbbbbbbbbb"),
    )
    .unwrap();
    let after = std::fs::read_to_string(&path).unwrap();
    let keys = list(&path).unwrap();
    assert!(keys[0].is_valid);
    assert!(!keys[1].is_valid);
    // Every line of the original is still there, in order; one line was added.
    let added: Vec<&str> = after
        .lines()
        .filter(|l| !before.lines().any(|b| b == *l))
        .collect();
    assert_eq!(added, ["      is_valid: false"]);
    assert_eq!(after.lines().count(), before.lines().count() + 1);

    let issued = regenerate(&path, Selector::Id("7"), Some("Chosen-Secret-9".into())).unwrap();
    assert!(issued.generated_secret.is_none());
    let keys = list(&path).unwrap();
    assert!(crate::client_keys::verify_secret(
        "Chosen-Secret-9",
        &keys[0].secret_hash
    ));
    assert!(!crate::client_keys::verify_secret(
        "Secret-123",
        &keys[0].secret_hash
    ));
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains("# keep me")
            || text.contains("scanner_aaaaaaaaaaaaaaaaaaaaaaaaa   # keep me")
    );
    assert!(text.contains("# trailing comment"));
    assert!(
        text.contains("    # the scanner\n    -   id: 7\n"),
        "{text}"
    );

    let created = create(&path, new_key("third", &[])).unwrap();
    let keys = list(&path).unwrap();
    assert_eq!(keys.len(), 3);
    assert_eq!(created.entry.id, "9");
    assert!(std::fs::read_to_string(&path)
        .unwrap()
        .ends_with("# trailing comment\n"));
}

#[test]
fn regenerate_keeps_the_client_id_and_revalidates() {
    let tmp = dir("regen");
    let d = tmp.path().to_path_buf();
    let path = d.join("keys.yaml");
    let issued = create(&path, new_key("svc", &["r"])).unwrap();
    let old = issued.generated_secret.unwrap();
    revoke(&path, Selector::ClientId(&issued.entry.client_id)).unwrap();
    let again = regenerate(&path, Selector::ClientId(&issued.entry.client_id), None).unwrap();
    let new = again.generated_secret.unwrap();
    assert_eq!(again.entry.client_id, issued.entry.client_id);
    let keys = list(&path).unwrap();
    assert!(keys[0].is_valid);
    assert!(crate::client_keys::verify_secret(
        &new,
        &keys[0].secret_hash
    ));
    assert!(!crate::client_keys::verify_secret(
        &old,
        &keys[0].secret_hash
    ));
}

#[test]
fn refusals_write_nothing() {
    let tmp = dir("refuse");
    let d = tmp.path().to_path_buf();
    let path = d.join("keys.yaml");
    std::fs::write(&path, "keys: []\n").unwrap();
    let cases: Vec<(NewKey, &str)> = vec![
        (new_key("bad name", &[]), "name"),
        (new_key("", &[]), "name"),
        (
            NewKey {
                secret: Some("short".into()),
                ..new_key("a", &[])
            },
            "10 to 30",
        ),
        (
            NewKey {
                expiration: Some("2001-01-01T00:00:00Z".into()),
                ..new_key("a", &[])
            },
            "future",
        ),
        (
            NewKey {
                expiration: Some("soon".into()),
                ..new_key("a", &[])
            },
            "RFC 3339",
        ),
    ];
    for (key, fragment) in cases {
        let err = create(&path, key).unwrap_err().to_string();
        assert!(err.contains(fragment), "{err}");
    }
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keys: []\n");
    let err = revoke(&path, Selector::ClientId("nobody")).unwrap_err();
    assert!(matches!(err, KeysError::NotFound { .. }), "{err}");
    std::fs::write(
        &path,
        "keys: [{id: '1', client_id: a_b, name: a, secret_hash: x}]\n",
    )
    .unwrap();
    let err = create(&path, new_key("a", &[])).unwrap_err();
    assert!(
        matches!(err, KeysError::File(_)),
        "an invalid file is refused: {err}"
    );
    // `keys: []` is turned into a block list.
    std::fs::write(&path, "keys: []\n").unwrap();
    create(&path, new_key("a", &[])).unwrap();
    assert_eq!(list(&path).unwrap().len(), 1);
}

#[test]
fn a_read_only_keys_file_is_reported_as_such() {
    let tmp = dir("ro");
    let d = tmp.path().to_path_buf();
    let path = d.join("keys.yaml");
    create(&path, new_key("a", &[])).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-o", "remount,ro,bind"])
        .arg(&d)
        .status()
        .is_ok_and(|s| s.success());
    let protected = mounted
        || std::process::Command::new("chattr")
            .arg("+i")
            .arg(&d)
            .status()
            .is_ok_and(|s| s.success());
    // Without root, permission bits make the directory read-only.
    if !protected {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    let err = create(&path, new_key("b", &[]));
    let _ = std::process::Command::new("chattr")
        .arg("-i")
        .arg(&d)
        .status();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(matches!(err, Err(KeysError::ReadOnly(_))), "{err:?}");
    assert_eq!(list(&path).unwrap().len(), 1);
}
