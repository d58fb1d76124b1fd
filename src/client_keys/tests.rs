use super::*;
use std::time::UNIX_EPOCH;

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

fn key(client_id: &str, secret: &str) -> ApiKey {
    ApiKey {
        id: "1".into(),
        client_id: client_id.into(),
        name: client_id.split('_').next().unwrap().into(),
        secret_hash: hash_secret(secret).unwrap(),
        roles: vec!["r".into()],
        expiration: None,
        is_valid: true,
    }
}

fn basic(id: &str, secret: &str) -> HeaderValue {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
    HeaderValue::from_str(&format!("Basic {encoded}")).unwrap()
}

#[tokio::test]
async fn basic_and_bearer_authenticate_and_wrong_secrets_never_pass() {
    let id = new_client_id("scanner");
    let secret = new_secret(&id);
    let store = KeyStore::new(
        vec![key(&id, &secret)],
        Duration::from_secs(60),
        Arc::default(),
    );
    let now = SystemTime::now();
    let ok = store
        .authenticate(Some(&basic(&id, &secret)), LOCAL, now)
        .await
        .unwrap();
    assert_eq!(ok.client_id, id);
    let bearer = HeaderValue::from_str(&format!("Bearer {secret}")).unwrap();
    assert_eq!(
        store
            .authenticate(Some(&bearer), LOCAL, now)
            .await
            .unwrap()
            .client_id,
        id
    );
    // Right after the right secret was cached, a wrong one is still refused.
    let wrong = store
        .authenticate(Some(&basic(&id, "Wrong-Secret-1")), LOCAL, now)
        .await;
    assert_eq!(wrong.unwrap_err().error, AuthError::WrongSecret);
    let mut near = secret.clone();
    near.pop();
    near.push('!');
    let wrong = store
        .authenticate(Some(&basic(&id, &near)), LOCAL, now)
        .await;
    assert_eq!(wrong.unwrap_err().error, AuthError::WrongSecret);
    let wrong_bearer = HeaderValue::from_str(&format!("Bearer {near}")).unwrap();
    assert_eq!(
        store
            .authenticate(Some(&wrong_bearer), LOCAL, now)
            .await
            .unwrap_err()
            .error,
        AuthError::WrongSecret
    );
}

#[tokio::test]
async fn refusals_have_reasons() {
    let store_keys = vec![
        ApiKey {
            is_valid: false,
            ..key("revoked_aaaaaaaaaaaaaaaaaaaaaaaaa", "Secret-123")
        },
        ApiKey {
            expiration: Some(UNIX_EPOCH + Duration::from_secs(1_000)),
            ..key("expired_aaaaaaaaaaaaaaaaaaaaaaaaa", "Secret-123")
        },
    ];
    let store = KeyStore::new(store_keys, Duration::from_secs(60), Arc::default());
    let now = SystemTime::now();
    let cases: &[(Option<HeaderValue>, AuthError)] = &[
        (None, AuthError::Missing),
        (
            Some(HeaderValue::from_static("Basic !!!")),
            AuthError::Malformed,
        ),
        (
            Some(HeaderValue::from_static("Digest abc")),
            AuthError::Malformed,
        ),
        (
            Some(HeaderValue::from_static("Bearer")),
            AuthError::Malformed,
        ),
        (
            Some(basic("nobody", "Secret-123")),
            AuthError::UnknownClient,
        ),
        (
            Some(basic("revoked_aaaaaaaaaaaaaaaaaaaaaaaaa", "Secret-123")),
            AuthError::Revoked,
        ),
        (
            Some(basic("expired_aaaaaaaaaaaaaaaaaaaaaaaaa", "Secret-123")),
            AuthError::Expired,
        ),
        (
            Some(HeaderValue::from_static("Bearer user-chosen-secret")),
            AuthError::UnknownClient,
        ),
    ];
    for (header, expected) in cases {
        let got = store
            .authenticate(header.as_ref(), LOCAL, now)
            .await
            .unwrap_err();
        assert_eq!(got.error, *expected, "{header:?}");
    }
    assert_eq!(store.argon2_runs(), 0, "refused before hashing");
}

#[tokio::test]
async fn argon2_runs_once_for_many_concurrent_requests_with_one_key() {
    let id = new_client_id("busy");
    let secret = new_secret(&id);
    let store = Arc::new(KeyStore::new(
        vec![key(&id, &secret)],
        Duration::from_secs(300),
        Arc::default(),
    ));
    let header = basic(&id, &secret);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let (store, header) = (Arc::clone(&store), header.clone());
        tasks.spawn(async move {
            store
                .authenticate(Some(&header), LOCAL, SystemTime::now())
                .await
                .is_ok()
        });
    }
    while let Some(ok) = tasks.join_next().await {
        assert!(ok.unwrap());
    }
    assert_eq!(store.argon2_runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_requests_after_an_idle_spell_start_one_background_verification() {
    let id = new_client_id("idle");
    let secret = new_secret(&id);
    let verifier: Arc<Verifier> = Arc::default();
    let store = Arc::new(KeyStore::new(
        vec![key(&id, &secret)],
        Duration::from_millis(1),
        Arc::clone(&verifier),
    ));
    let header = basic(&id, &secret);
    store
        .authenticate(Some(&header), LOCAL, SystemTime::now())
        .await
        .unwrap();
    assert_eq!(verifier.runs(), 1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Past the ttl, 200 requests race: all are served from memory at once.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let (store, header) = (Arc::clone(&store), header.clone());
        tasks.spawn(async move {
            store
                .authenticate(Some(&header), LOCAL, SystemTime::now())
                .await
                .is_ok()
        });
    }
    while let Some(ok) = tasks.join_next().await {
        assert!(ok.unwrap());
    }
    // Behind them one re-verification ran; once it is over its claim is free
    // and no request started a second.
    let digest = cache_key(b'b', &id, &secret);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while verifier.runs() < 2 || verifier.recheck(digest).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no background re-verification"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(verifier.runs(), 2);
}

#[test]
fn generated_secrets_and_client_ids_have_the_documented_shape() {
    let id = new_client_id("scanner");
    let (name, suffix) = id.rsplit_once('_').unwrap();
    assert_eq!(name, "scanner");
    assert_eq!(suffix.len(), 25);
    assert!(suffix
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
    let secret = new_secret(&id);
    assert!(secret.starts_with("kgs_"));
    assert_eq!(bearer_lookup(&secret), Some(suffix));
    assert_ne!(new_secret(&id), secret);
}

#[test]
fn user_secret_rule() {
    let cases: &[(&str, bool)] = &[
        ("9011@83sd!f1042ds+f19fg86M", true),
        ("kj@s$dfS124GDd35", true),
        ("Abcdefgh12", true),
        ("abcdefgh12", false),
        ("Abc12!", false),
        ("ABCDEFGHIJ", false),
        ("Aa1!Aa1!Aa1!Aa1!Aa1!Aa1!Aa1!Aa1!", false),
        ("Bench-Secret-42", true),
    ];
    for (secret, ok) in cases {
        assert_eq!(check_user_secret(secret).is_ok(), *ok, "{secret}");
    }
}

#[test]
fn keys_file_errors_name_entry_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = dir.join("keys.yaml");
    let good_hash = hash_secret("Secret-123").unwrap();
    let cases: &[(&str, &str)] = &[
        ("secret_hash: \"plain\"", "secret_hash"),
        ("expiration: tomorrow", "expiration"),
        ("client_id: \"a:b\"", "client_id"),
    ];
    for (line, field) in cases {
        let mut text = format!(
            "keys:\n  - id: 1\n    client_id: a_b\n    name: a\n    secret_hash: \"{good_hash}\"\n    roles: [r]\n"
        );
        let key = line.split(':').next().unwrap();
        if text.contains(&format!("    {key}:")) {
            let start = text.find(&format!("    {key}:")).unwrap();
            let end = start + text[start..].find('\n').unwrap();
            text.replace_range(start..end, &format!("    {line}"));
        } else {
            text.push_str(&format!("    {line}\n"));
        }
        std::fs::write(&path, &text).unwrap();
        let errors = file::read(&path).unwrap_err();
        assert!(
            errors
                .0
                .iter()
                .any(|e| e.field.starts_with("keys[0]") && e.field.ends_with(field)),
            "{line}: {errors}"
        );
    }
    std::fs::write(&path, "keys:\n  - id: 1\n    client_id: x\n    nam: x\n").unwrap();
    let errors = file::read(&path).unwrap_err();
    assert!(
        errors.to_string().contains("unknown field `nam`"),
        "{errors}"
    );
}

#[tokio::test]
async fn fixed_credential_accepts_exactly_one_credential() {
    let store = KeyStore::fixed_credential("bench", "Secret-123", vec!["r".into()]);
    let now = SystemTime::now();
    let ok = store
        .authenticate(Some(&basic("bench", "Secret-123")), LOCAL, now)
        .await
        .unwrap();
    assert_eq!(ok.roles, ["r"]);
    for (id, secret) in [
        ("bench", "Secret-124"),
        ("bench2", "Secret-123"),
        ("bench", ""),
    ] {
        assert!(store
            .authenticate(Some(&basic(id, secret)), LOCAL, now)
            .await
            .is_err());
    }
}

#[test]
fn two_client_ids_with_one_suffix_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("keys.yaml");
    let hash = hash_secret("Secret-123").unwrap();
    let text = format!(
        "keys:\n  - id: 1\n    client_id: scanner_abc\n    name: scanner\n    secret_hash: \"{hash}\"\n  - id: 2\n    client_id: reader_abc\n    name: reader\n    secret_hash: \"{hash}\"\n"
    );
    std::fs::write(&path, text).unwrap();
    let errors = file::read(&path).unwrap_err();
    assert!(
        errors
            .0
            .iter()
            .any(|e| e.field == "keys[1] (client_id `reader_abc`).client_id"
                && e.message.contains("suffix")),
        "{errors}"
    );
}

#[tokio::test]
async fn a_verification_is_remembered_across_reloads_for_the_same_hash_only() {
    let id = new_client_id("steady");
    let secret = new_secret(&id);
    let verifier: Arc<Verifier> = Arc::default();
    let first = key(&id, &secret);
    let header = basic(&id, &secret);
    let now = SystemTime::now();
    let store = KeyStore::new(
        vec![first.clone()],
        Duration::from_secs(300),
        Arc::clone(&verifier),
    );
    store.authenticate(Some(&header), LOCAL, now).await.unwrap();
    assert_eq!(verifier.runs(), 1);
    // A reload: a new store, same key. Served from memory, no argon2.
    let reloaded = KeyStore::new(
        vec![first.clone()],
        Duration::from_secs(300),
        Arc::clone(&verifier),
    );
    reloaded
        .authenticate(Some(&header), LOCAL, now)
        .await
        .unwrap();
    assert_eq!(verifier.runs(), 1, "no re-hash after a reload");
    // Regenerated with another secret: the old credential is not served from
    // memory, it is verified (and refused).
    let mut regenerated = first.clone();
    regenerated.secret_hash = hash_secret(&new_secret(&id)).unwrap();
    let after = KeyStore::new(
        vec![regenerated],
        Duration::from_secs(300),
        Arc::clone(&verifier),
    );
    let refused = after.authenticate(Some(&header), LOCAL, now).await;
    assert_eq!(
        refused.map(|_| ()).unwrap_err().error,
        AuthError::WrongSecret
    );
    assert_eq!(verifier.runs(), 2);
    // Revoked: refused whatever is remembered.
    let mut revoked = first;
    revoked.is_valid = false;
    let gone = KeyStore::new(vec![revoked], Duration::from_secs(300), verifier);
    let refused = gone.authenticate(Some(&header), LOCAL, now).await;
    assert_eq!(refused.map(|_| ()).unwrap_err().error, AuthError::Revoked);
}

#[tokio::test]
async fn an_old_verification_is_served_at_once_and_redone_in_the_background() {
    let id = new_client_id("idle");
    let secret = new_secret(&id);
    let verifier: Arc<Verifier> = Arc::default();
    let header = basic(&id, &secret);
    let store = KeyStore::new(
        vec![key(&id, &secret)],
        Duration::from_millis(1),
        Arc::clone(&verifier),
    );
    store
        .authenticate(Some(&header), LOCAL, SystemTime::now())
        .await
        .unwrap();
    assert_eq!(verifier.runs(), 1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The cache entry idled out and the verification is older than the ttl:
    // the request is answered from memory, and argon2 runs once more behind it.
    store
        .authenticate(Some(&header), LOCAL, SystemTime::now())
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while verifier.runs() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no background re-verification"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
