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
