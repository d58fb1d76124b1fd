//! API access keys end to end: created by the CLI or the key API, used with Basic
//! and Bearer from curl and a stock HTTP client, revoked, regenerated, expired.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::process::Command;

use bytes::Bytes;
use support::client::{get, send};
use support::{basic, DemoKeyExt as _, Harness, Setup};

const PAGE: &str = "/wiki/api/v2/pages/1001";
const ADMIN_TOKEN: &str = "ops-admin-token-for-tests";

/// Runs the binary with the harness's config; returns (exit code, stdout, stderr).
fn keygate(h: &Harness, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let config = h.dir.join("keygate.yaml");
    let mut all = args.to_vec();
    all.extend(["--config", config.to_str().unwrap()]);
    let out = support::process::cli(&all, stdin, &[]);
    (out.code, out.stdout, out.stderr)
}

fn field(out: &str, name: &str) -> String {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("no {name} in {out}"))
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(args)
        .output();
    let out = out.expect("curl is installed (.ci/run installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_created_by_the_cli_works_with_basic_and_bearer_from_curl_and_a_stock_client() {
    let h = Harness::start().await;
    let (code, out, err) = keygate(
        &h,
        &["keys", "create", "--name", "tool", "--role", "reader"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let client_id = field(&out, "client_id");
    let secret = field(&out, "client_secret");
    assert!(
        client_id.starts_with("tool_") && client_id.len() == "tool_".len() + 25,
        "{client_id}"
    );
    assert!(secret.starts_with("kgs_"));
    let keys_text = std::fs::read_to_string(h.dir.join("keys.yaml")).unwrap();
    assert!(!keys_text.contains(&secret), "the secret is never stored");
    h.control.reload("test").await.unwrap();

    let url = h.url(PAGE);
    let (u, b) = (
        format!("{client_id}:{secret}"),
        format!("Authorization: Bearer {secret}"),
    );
    let results =
        tokio::task::spawn_blocking(move || (curl(&["-u", &u, &url]), curl(&["-H", &b, &url])))
            .await
            .unwrap();
    assert_eq!(results, ("200".to_owned(), "200".to_owned()));
    let reply = get(
        &h.url(PAGE),
        &[("Authorization", &basic(&client_id, &secret))],
    )
    .await;
    assert_eq!(reply.status, 200);

    // A chosen secret through --secret-stdin; a weak one is refused with the rule.
    let (code, _, err) = keygate(
        &h,
        &["keys", "create", "--name", "weak", "--secret-stdin"],
        Some("password\n"),
    );
    assert_eq!(code, 1);
    assert!(err.contains("10 to 30 characters"), "{err}");
    let (code, out, err) = keygate(
        &h,
        &[
            "keys",
            "create",
            "--name",
            "bench",
            "--role",
            "reader",
            "--secret-stdin",
        ],
        Some("Bench-Secret-42\n"),
    );
    assert_eq!(code, 0, "{err}");
    let chosen_id = field(&out, "client_id");
    h.control.reload("test").await.unwrap();
    let reply = get(
        &h.url(PAGE),
        &[("Authorization", &basic(&chosen_id, "Bench-Secret-42"))],
    )
    .await;
    assert_eq!(reply.status, 200);

    let (code, out, _) = keygate(&h, &["keys", "list", "--json"], None);
    assert_eq!(code, 0);
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 4);
    assert!(!out.contains("argon2") && !out.contains(&secret), "{out}");
    h.stop().await;
}

#[tokio::test]
async fn revoke_and_regenerate_through_the_cli() {
    let h = Harness::start().await;
    let old = h.reader.basic();
    assert_eq!(status(&h, &old).await, 200);
    let (code, _, err) = keygate(&h, &["keys", "revoke", &h.reader.client_id], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(status(&h, &old).await, 200, "until the reload");
    h.control.reload("test").await.unwrap();
    assert_eq!(status(&h, &old).await, 401);

    let (code, out, err) = keygate(&h, &["keys", "regenerate", &h.reader.client_id], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        field(&out, "client_id"),
        h.reader.client_id,
        "same client_id"
    );
    let new_secret = field(&out, "client_secret");
    h.control.reload("test").await.unwrap();
    assert_eq!(status(&h, &old).await, 401, "old secret dead");
    let new = basic(&h.reader.client_id, &new_secret);
    assert_eq!(status(&h, &new).await, 200);

    let (code, _, err) = keygate(&h, &["keys", "revoke", "nobody_x"], None);
    assert_eq!(code, 1);
    assert!(err.contains("no key with client_id `nobody_x`"), "{err}");
    h.stop().await;
}

#[tokio::test]
async fn an_expired_key_is_refused() {
    let h = Harness::start().await;
    let keys = h.dir.join("keys.yaml");
    let text = std::fs::read_to_string(&keys).unwrap();
    let line = format!("client_id: {}", h.reader.client_id);
    let expired = text.replace(
        &line,
        &format!("{line}\n  expiration: 2020-01-01T00:00:00Z"),
    );
    std::fs::write(&keys, expired).unwrap();
    h.control.reload("test").await.unwrap();
    let reply = get(&h.url(PAGE), &[("Authorization", &h.reader.basic())]).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.headers["www-authenticate"], "Basic realm=\"keygate\"");
    assert!(h.forwarded().is_empty());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argon2_runs_once_for_a_thousand_requests_and_a_wrong_secret_still_fails() {
    let h = Harness::start().await;
    let before = h.control.argon2_runs();
    let auth = h.reader.basic();
    let client = support::load::http();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..25 {
        let (client, auth, url) = (client.clone(), auth.clone(), h.url(PAGE));
        tasks.spawn(async move {
            for _ in 0..40 {
                let status = support::load::get_status(&client, &url, &auth).await;
                assert_eq!(status, Some(200), "worker {worker}");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert_eq!(
        h.control.argon2_runs() - before,
        1,
        "argon2 ran more than once"
    );
    // Right after the right secret was cached, a wrong one for the same client_id fails.
    let wrong = basic(&h.reader.client_id, &format!("{}x", h.reader.secret));
    assert_eq!(status(&h, &wrong).await, 401);
    assert_eq!(h.forwarded().len(), 1000);
    h.stop().await;
}

async fn status(h: &Harness, auth: &str) -> u16 {
    get(&h.url(PAGE), &[("Authorization", auth)])
        .await
        .status
        .as_u16()
}

fn bearer() -> String {
    format!("Bearer {ADMIN_TOKEN}")
}

#[tokio::test]
async fn key_api_creates_lists_revokes_and_regenerates() {
    let h = Harness::start_with(Setup {
        admin_token: Some(ADMIN_TOKEN.into()),
        ..Default::default()
    })
    .await;
    let api = h.ops_url("/api/api_accesses");
    let admin = bearer();
    let json = ("content-type", "application/json");

    // Without the token: 401 with a Bearer challenge.
    let reply = get(&api, &[]).await;
    assert_eq!(reply.status, 401);
    assert!(reply.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    assert_eq!(
        get(&api, &[("Authorization", "Bearer wrong-token")])
            .await
            .status,
        401
    );

    let body = r#"{"data":[{"name":"scanner2","roles":["compliance-scanner"],"expiration":"2099-01-01T00:00:00Z"}]}"#;
    let reply = send(
        "POST",
        &api,
        &[("Authorization", &admin), json],
        Bytes::from(body),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let created = reply.json();
    assert_eq!(created["total_count"], 1);
    let item = &created["data"][0];
    assert_eq!(item["type"], "api_access");
    assert_eq!(item["is_valid"], true);
    let id = item["id"].as_str().unwrap().to_owned();
    let client_id = item["client_id"].as_str().unwrap().to_owned();
    let secret = item["client_secret"].as_str().unwrap().to_owned();
    // Applied at once: the new key works.
    let reply = get(
        &h.url("/wiki/api/v2/pages/2001"),
        &[("Authorization", &basic(&client_id, &secret))],
    )
    .await;
    assert_eq!(reply.status, 200, "scanner role reads the restricted page");

    // A chosen secret is not echoed back.
    let body = r#"{"data":[{"name":"chosen","roles":[],"client_secret":"Chosen-Secret-1"}]}"#;
    let reply = send(
        "POST",
        &api,
        &[("Authorization", &admin), json],
        Bytes::from(body),
    )
    .await;
    assert_eq!(reply.status, 201);
    assert!(reply.json()["data"][0].get("client_secret").is_none());

    let list = get(&api, &[("Authorization", &admin)]).await;
    assert_eq!(list.status, 200);
    assert_eq!(list.json()["total_count"], 4);
    let text = list.text();
    assert!(
        !text.contains("argon2") && !text.contains(&secret) && !text.contains("Chosen-Secret-1"),
        "{text}"
    );
    let one = get(&format!("{api}/{id}"), &[("Authorization", &admin)]).await;
    assert_eq!(one.json()["client_id"], client_id.as_str());
    assert!(!one.text().contains("argon2"));
    assert_eq!(
        get(&format!("{api}/9999"), &[("Authorization", &admin)])
            .await
            .status,
        404
    );

    let reply = send(
        "PUT",
        &format!("{api}/{id}"),
        &[("Authorization", &admin), json],
        Bytes::from(r#"{"is_valid":false}"#),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["is_valid"], false);
    assert_eq!(status(&h, &basic(&client_id, &secret)).await, 401);

    let reply = send(
        "PUT",
        &format!("{api}/{id}"),
        &[("Authorization", &admin), json],
        Bytes::from(r#"{"is_valid":true}"#),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["client_id"], client_id.as_str());
    let new_secret = reply.json()["client_secret"].as_str().unwrap().to_owned();
    assert_eq!(status(&h, &basic(&client_id, &secret)).await, 401);
    assert_eq!(status(&h, &basic(&client_id, &new_secret)).await, 200);

    let bad = send(
        "POST",
        &api,
        &[("Authorization", &admin), json],
        Bytes::from(r#"{"data":[{"nam":"x"}]}"#),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"], "invalid_request");
    h.stop().await;
}

#[tokio::test]
async fn key_api_is_absent_without_an_admin_token_and_409_on_a_read_only_file() {
    let h = Harness::start().await;
    assert_eq!(
        get(
            &h.ops_url("/api/api_accesses"),
            &[("Authorization", &bearer())]
        )
        .await
        .status,
        404
    );
    h.stop().await;

    let h = Harness::start_with(Setup {
        admin_token: Some(ADMIN_TOKEN.into()),
        ..Default::default()
    })
    .await;
    let protected = Command::new("chattr")
        .arg("+i")
        .arg(&h.dir)
        .status()
        .is_ok_and(|s| s.success());
    if !protected {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&h.dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    let body = r#"{"data":[{"name":"x","roles":[]}]}"#;
    let reply = send(
        "POST",
        &h.ops_url("/api/api_accesses"),
        &[("Authorization", &bearer())],
        Bytes::from(body),
    )
    .await;
    let _ = Command::new("chattr").arg("-i").arg(&h.dir).status();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&h.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    assert_eq!(reply.status, 409, "{}", reply.text());
    assert_eq!(reply.json()["error"], "keys_file_read_only");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_creates_and_a_racing_revoke_lose_nothing() {
    let h = Harness::start_with(Setup {
        admin_token: Some(ADMIN_TOKEN.into()),
        ..Default::default()
    })
    .await;
    let api = h.ops_url("/api/api_accesses");
    let reader_id = {
        let listed = get(&api, &[("Authorization", &bearer())]).await.json();
        listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["name"] == "reader")
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (api2, revoke_url) = (api.clone(), format!("{api}/{reader_id}"));
    let creates = support::load::concurrently(20, move |i| {
        let api = api2.clone();
        async move {
            let body = format!(r#"{{"data":[{{"name":"tool{i}","roles":["reader"]}}]}}"#);
            let reply = send(
                "POST",
                &api,
                &[("Authorization", &bearer())],
                Bytes::from(body),
            )
            .await;
            assert_eq!(reply.status, 201, "{}", reply.text());
            let item = reply.json()["data"][0].clone();
            (
                item["client_id"].as_str().unwrap().to_owned(),
                item["client_secret"].as_str().unwrap().to_owned(),
            )
        }
    });
    let revoke = async {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let reply = send(
            "PUT",
            &revoke_url,
            &[("Authorization", &bearer())],
            Bytes::from_static(br#"{"is_valid": false}"#),
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    };
    let (created, ()) = tokio::join!(creates, revoke);
    assert_eq!(created.len(), 20);
    let text = std::fs::read_to_string(h.dir.join("keys.yaml")).unwrap();
    for (client_id, secret) in &created {
        assert!(
            text.contains(client_id.as_str()),
            "{client_id} acknowledged but not in the file"
        );
        // In force at once: no reload, no wait.
        assert_eq!(
            status(&h, &basic(client_id, secret)).await,
            200,
            "{client_id}"
        );
    }
    assert_eq!(
        status(&h, &h.reader.basic()).await,
        401,
        "the revocation is in force"
    );
    let keys = keygate::client_keys::file::read(&h.dir.join("keys.yaml"))
        .unwrap()
        .1;
    assert_eq!(keys.len(), 22);
    assert!(keys.iter().any(|k| k.name == "reader" && !k.is_valid));
    // Every change was recorded as the key API's, none as the keys file's.
    h.control.reload("test").await.unwrap();
    let trail = std::fs::read_to_string(h.dir.join("audit.jsonl")).unwrap();
    let principals: Vec<String> = trail
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["event"] == "key_management")
        .map(|r| r["principal"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(principals.len(), 21, "{principals:?}");
    assert!(
        principals.iter().all(|p| p.starts_with("key API")),
        "{principals:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_refused_batch_creates_nothing() {
    let h = Harness::start_with(Setup {
        admin_token: Some(ADMIN_TOKEN.into()),
        ..Default::default()
    })
    .await;
    let before = std::fs::read_to_string(h.dir.join("keys.yaml")).unwrap();
    let body = r#"{"data":[{"name":"good","roles":["reader"]},{"name":"bad name","roles":[]}]}"#;
    let reply = send(
        "POST",
        &h.ops_url("/api/api_accesses"),
        &[("Authorization", &bearer())],
        Bytes::from(body),
    )
    .await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(reply.text().contains("bad name"), "{}", reply.text());
    let after = std::fs::read_to_string(h.dir.join("keys.yaml")).unwrap();
    assert_eq!(before, after, "nothing of the batch was written");
    h.stop().await;
}
