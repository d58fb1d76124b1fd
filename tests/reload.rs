//! Reload: a valid change applies to new requests; an invalid one keeps the old
//! configuration in force.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::client::get;
use support::{DemoKeyExt as _, Harness};

#[tokio::test]
async fn invalid_reload_keeps_the_old_config_and_valid_reload_applies() {
    let h = Harness::start().await;
    let auth = h.reader.basic();
    let page = h.url("/wiki/api/v2/pages/1001");
    assert_eq!(get(&page, &[("Authorization", &auth)]).await.status, 200);

    let config = h.dir.join("keygate.yaml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        good.replace("methods: [GET, HEAD]", "methods: [GTE]"),
    )
    .unwrap();
    let errors = h.control.reload("test").await.unwrap_err();
    assert!(
        errors.to_string().contains("routes[2].methods[0]"),
        "{errors}"
    );
    assert_eq!(
        get(&page, &[("Authorization", &auth)]).await.status,
        200,
        "old config still in force"
    );

    // Valid: the plain-read route now needs a role the reader lacks.
    std::fs::write(&config, good.replace("roles: [\"*\"]", "roles: [auditor]")).unwrap();
    h.control.reload("test").await.unwrap();
    assert_eq!(get(&page, &[("Authorization", &auth)]).await.status, 403);

    // Revoking a key in the keys file takes effect at the next reload.
    std::fs::write(&config, &good).unwrap();
    let keys = h.dir.join("keys.yaml");
    let text = std::fs::read_to_string(&keys).unwrap();
    let revoked = text.replacen("is_valid: true", "is_valid: false", 2);
    std::fs::write(&keys, revoked).unwrap();
    h.control.reload("test").await.unwrap();
    let reply = get(&page, &[("Authorization", &auth)]).await;
    assert_eq!(reply.status, 401);
    h.stop().await;
}

#[tokio::test]
async fn a_changed_file_is_picked_up_without_a_signal() {
    let h = Harness::start().await;
    let auth = h.reader.basic();
    let page = h.url("/wiki/api/v2/pages/1001");
    let config = h.dir.join("keygate.yaml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace("roles: [\"*\"]", "roles: [auditor]")).unwrap();
    // The watcher polls every 2 s; wait for the generation to change, bounded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let routes = h.control.generation().config.routes.routes()[2]
            .role_names
            .clone();
        if routes == ["auditor"] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "file change not picked up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(get(&page, &[("Authorization", &auth)]).await.status, 403);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_fifos_and_huge_files_are_refused_at_once_and_requests_go_on() {
    let h = Harness::start().await;
    let auth = h.reader.basic();
    let page = h.url("/wiki/api/v2/pages/1001");
    let config = h.dir.join("keygate.yaml");
    let good = std::fs::read_to_string(&config).unwrap();
    let keys = h.dir.join("keys.yaml");
    let keys_text = std::fs::read_to_string(&keys).unwrap();

    type Case<'a> = (&'a str, Box<dyn Fn() + 'a>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "a secret from /dev/zero",
            Box::new(|| {
                std::fs::write(
                    &config,
                    good.replace(
                        &format!("api_token: {}", support::ADMIN_TOKEN),
                        "api_token: ${file:/dev/zero}",
                    ),
                )
                .unwrap()
            }),
            "regular file",
        ),
        (
            "a keys file that is a FIFO",
            Box::new(|| {
                std::fs::remove_file(&keys).unwrap();
                let made = std::process::Command::new("mkfifo")
                    .arg(&keys)
                    .status()
                    .unwrap();
                assert!(made.success());
            }),
            "regular file",
        ),
        (
            "a 5 MiB config",
            Box::new(|| {
                let _ = std::fs::remove_file(&keys);
                std::fs::write(&keys, &keys_text).unwrap();
                let padding = format!("# {}\n", "x".repeat(5 << 20));
                std::fs::write(&config, format!("{good}{padding}")).unwrap();
            }),
            "at most",
        ),
    ];
    for (what, break_it, expected) in cases {
        break_it();
        let started = std::time::Instant::now();
        let (reload, served) = tokio::join!(h.control.reload("test"), async {
            get(&page, &[("Authorization", &auth)]).await.status
        });
        let errors = reload.expect_err(what);
        assert!(errors.to_string().contains(expected), "{what}: {errors}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{what} stalled the reload"
        );
        assert_eq!(
            served, 200,
            "{what}: requests go on with the old configuration"
        );
        std::fs::write(&config, &good).unwrap();
    }
    h.control.reload("test").await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn audit_settings_apply_on_reload() {
    let h = Harness::start().await;
    let auth = h.reader.basic();
    let page = h.url("/wiki/api/v2/pages/1001");
    let config = h.dir.join("keygate.yaml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        good.replace(
            "audit:\n  path: audit.jsonl\n",
            "audit:\n  path: audit.jsonl\n  record_passthrough: false\n",
        ),
    )
    .unwrap();
    h.control.reload("test").await.unwrap();
    let reply = get(&page, &[("Authorization", &auth)]).await;
    assert_eq!(reply.status, 200);
    let id = reply.headers["x-request-id"].to_str().unwrap().to_owned();
    let trail = h.dir.join("audit.jsonl");
    let _dir = h.stop().await;
    let text = std::fs::read_to_string(trail).unwrap();
    assert!(text.contains("\"event\":\"config_reload\""));
    assert!(
        !text.contains(&id),
        "a passthrough request was recorded after record_passthrough: false"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_while_a_reload_runs_is_not_lost() {
    let h = Harness::start().await;
    let config = h.dir.join("keygate.yaml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace("roles: [\"*\"]", "roles: [first]")).unwrap();
    let reload = h.control.reload("test");
    let change = async {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        std::fs::write(&config, good.replace("roles: [\"*\"]", "roles: [second]")).unwrap();
    };
    let (result, ()) = tokio::join!(reload, change);
    result.unwrap();
    // Whatever the reload read, the watcher brings the last change in (bounded).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let roles = h.control.generation().config.routes.routes()[2]
            .role_names
            .clone();
        if roles == ["second"] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the last change was lost: {roles:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    h.stop().await;
}
