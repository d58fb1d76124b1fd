//! The audit trail end to end: every event kind with its fields, fail-closed bypass
//! when the trail cannot be written, and no secret anywhere in it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;

use bytes::Bytes;
use serde_json::Value;
use support::client::{get, send};
use support::{admin_basic, DemoKeyExt as _, Harness, Setup, ADMIN_TOKEN};

const RESTRICTED: &str = "/wiki/api/v2/pages/2001";
const PAGE: &str = "/wiki/api/v2/pages/1001";

fn records(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn every_event_kind_carries_its_fields() {
    let ops_token = "ops-token-for-the-audit-test";
    let h = Harness::start_with(Setup {
        admin_token: Some(ops_token.into()),
        ..Default::default()
    })
    .await;
    let scanner = h.scanner.basic();
    let reader = h.reader.basic();
    let reply = get(
        &h.url(&format!("{RESTRICTED}?expand=body")),
        &[("Authorization", &scanner), ("User-Agent", "scanner/1.0")],
    )
    .await;
    assert_eq!(reply.status, 200);
    let bypass_id = reply.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(
        get(&h.url(PAGE), &[("Authorization", &reader)])
            .await
            .status,
        200
    );
    assert_eq!(
        get(&h.url(PAGE), &[("Authorization", "Basic d3Jvbmc6d3Jvbmc=")])
            .await
            .status,
        401
    );
    let body = r#"{"data":[{"name":"audited","roles":[]}]}"#;
    let api = h.ops_url("/api/api_accesses");
    let reply = send(
        "POST",
        &api,
        &[("Authorization", &format!("Bearer {ops_token}"))],
        Bytes::from(body),
    )
    .await;
    assert_eq!(reply.status, 201);
    let config = h.dir.join("keygate.yaml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        good.replace("methods: [GET, HEAD]", "methods: [NOPE]"),
    )
    .unwrap();
    assert!(h.control.reload("test").await.is_err());
    std::fs::write(&config, &good).unwrap();
    let path = h.dir.join("audit.jsonl");
    let standin = std::sync::Arc::clone(&h.standin.state);
    let _dir = h.stop().await;

    let all = records(&path);
    let by_event = |e: &str| all.iter().filter(|r| r["event"] == e).collect::<Vec<_>>();
    for r in &all {
        for f in ["ts", "seq", "event", "prev", "hash"] {
            assert!(r.get(f).is_some(), "{f} missing: {r}");
        }
        let ts = r["ts"].as_str().unwrap();
        assert!(ts.ends_with('Z') && ts.len() == 24, "ts {ts}");
    }
    let request_fields = [
        "request_id",
        "client_id",
        "key_name",
        "remote_addr",
        "method",
        "path",
        "query",
        "route",
        "admin_key",
        "admin_account",
        "admin_key_expires",
        "status",
        "upstream_status",
        "bytes_in",
        "bytes_out",
        "duration_ms",
        "user_agent",
        "phase",
    ];
    let bypass: Vec<_> = by_event("request")
        .into_iter()
        .filter(|r| r["request_id"] == bypass_id.as_str())
        .cloned()
        .collect();
    assert_eq!(bypass.len(), 2, "start and end");
    let (start, end) = (&bypass[0], &bypass[1]);
    for r in [start, end] {
        for f in request_fields {
            assert!(r.get(f).is_some(), "request field {f} missing: {r}");
        }
        assert_eq!(r["admin_key"], true);
        assert_eq!(r["admin_account"], "557058:standin-admin");
        assert!(r["admin_key_expires"].as_str().unwrap().ends_with('Z'));
        assert_eq!(r["client_id"], h_client(&all, "scanner"));
        assert_eq!(r["query"], "expand=body");
        assert_eq!(r["user_agent"], "scanner/1.0");
        assert_eq!(r["route"], "scan-restricted-pages");
    }
    assert_eq!(start["phase"], "start");
    assert_eq!(start["status"], Value::Null);
    assert_eq!(end["phase"], "end");
    assert_eq!(end["status"], 200);
    assert_eq!(end["upstream_status"], 200);
    assert!(end["bytes_out"].as_u64().unwrap() > 50);
    assert!(start["seq"].as_u64() < end["seq"].as_u64());
    // The request id in the trail is the one Confluence received.
    let upstream_ids: Vec<String> = standin
        .requests()
        .iter()
        .filter(|r| r.path() == RESTRICTED)
        .flat_map(|r| r.header_values("x-request-id"))
        .collect();
    assert_eq!(upstream_ids, std::slice::from_ref(&bypass_id));

    let passthrough: Vec<_> = by_event("request")
        .into_iter()
        .filter(|r| r["route"] == "read-anything-normally")
        .collect();
    assert_eq!(passthrough.len(), 1);
    assert_eq!(passthrough[0]["phase"], "end");
    assert_eq!(passthrough[0]["admin_key"], false);
    assert_eq!(passthrough[0]["admin_account"], Value::Null);

    let failures = by_event("auth_failure");
    assert_eq!(failures.len(), 1);
    for f in [
        "request_id",
        "client_id",
        "reason",
        "remote_addr",
        "method",
        "path",
    ] {
        assert!(failures[0].get(f).is_some(), "auth_failure {f}");
    }
    assert_eq!(failures[0]["client_id"], "wrong");
    assert_eq!(failures[0]["reason"], "unknown_client");

    let actions: Vec<&str> = by_event("admin_key")
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["enabled", "disabled"]);
    for r in by_event("admin_key") {
        for f in ["action", "expires", "reason"] {
            assert!(r.get(f).is_some(), "admin_key {f}");
        }
    }
    let reloads: Vec<&Value> = by_event("config_reload");
    let results: Vec<&str> = reloads
        .iter()
        .map(|r| r["result"].as_str().unwrap())
        .collect();
    assert!(
        results.contains(&"ok") && results.contains(&"error"),
        "{results:?}"
    );
    let error = reloads.iter().find(|r| r["result"] == "error").unwrap();
    assert!(
        error["errors"].to_string().contains("routes[2].methods[0]"),
        "{error}"
    );

    let keys = by_event("key_management");
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0]["action"], "create");
    assert!(keys[0]["client_id"]
        .as_str()
        .unwrap()
        .starts_with("audited_"));
    assert!(keys[0]["principal"].as_str().unwrap().contains("key API"));
    assert_eq!(by_event("startup").len(), 1);
    assert_eq!(by_event("shutdown").len(), 1);
    assert_eq!(all.first().unwrap()["event"], "startup");
    assert_eq!(all.last().unwrap()["event"], "shutdown");

    let report = keygate::audit::verify::verify(&[path]).unwrap();
    assert_eq!(report.records as usize, all.len());
    let _ = ADMIN_TOKEN;
}

fn h_client(all: &[Value], name: &str) -> Value {
    all.iter()
        .find(|r| r["key_name"] == name)
        .map(|r| r["client_id"].clone())
        .unwrap()
}

#[tokio::test]
async fn bypass_fails_closed_while_the_trail_cannot_be_written_and_recovers_by_itself() {
    let tmp = support::temp_dir("trail");
    let trail = tmp.path().join("trail");
    std::fs::create_dir_all(&trail).unwrap();
    let h = Harness::start_with(Setup {
        audit: format!("audit:\n  path: {}/audit.jsonl\n", trail.display()),
        ..Default::default()
    })
    .await;
    let scanner = h.scanner.basic();
    let reader = h.reader.basic();
    assert_eq!(
        get(&h.url(RESTRICTED), &[("Authorization", &scanner)])
            .await
            .status,
        200
    );
    let forwarded = |h: &Harness| {
        h.forwarded()
            .iter()
            .filter(|r| r.path() == RESTRICTED)
            .count()
    };
    assert_eq!(forwarded(&h), 1);

    std::fs::remove_dir_all(&trail).unwrap();
    for _ in 0..3 {
        let reply = get(&h.url(RESTRICTED), &[("Authorization", &scanner)]).await;
        assert_eq!(reply.status, 503);
        assert_eq!(reply.json()["error"], "audit_unavailable");
        assert!(reply.headers.contains_key("retry-after"));
    }
    assert_eq!(
        forwarded(&h),
        1,
        "a bypass request left without its audit record"
    );
    assert_eq!(
        get(&h.url(PAGE), &[("Authorization", &reader)])
            .await
            .status,
        200,
        "passthrough goes on"
    );
    let ready = get(&h.ops_url("/readyz"), &[]).await;
    assert_eq!(ready.status, 503);
    assert!(
        ready.text().contains("audit trail cannot be written"),
        "{}",
        ready.text()
    );
    let metrics = get(&h.ops_url("/metrics"), &[]).await.text();
    assert!(metrics.contains("keygate_audit_errors_total "), "{metrics}");

    // Writable again: the next bypass request goes through, readiness recovers.
    std::fs::create_dir_all(&trail).unwrap();
    assert_eq!(
        get(&h.url(RESTRICTED), &[("Authorization", &scanner)])
            .await
            .status,
        200
    );
    assert_eq!(forwarded(&h), 2);
    assert_eq!(get(&h.ops_url("/readyz"), &[]).await.status, 200);

    // A write error on the open file (immutable as root) fails closed the same way.
    let file = trail.join("audit.jsonl");
    let immutable = std::process::Command::new("chattr")
        .arg("+i")
        .arg(&file)
        .status()
        .is_ok_and(|s| s.success());
    if immutable {
        let reply = get(&h.url(RESTRICTED), &[("Authorization", &scanner)]).await;
        assert_eq!(reply.status, 503);
        assert_eq!(forwarded(&h), 2);
        std::process::Command::new("chattr")
            .arg("-i")
            .arg(&file)
            .status()
            .unwrap();
        assert_eq!(
            get(&h.url(RESTRICTED), &[("Authorization", &scanner)])
                .await
                .status,
            200
        );
        assert_eq!(forwarded(&h), 3);
    }
    h.stop().await;
    assert!(keygate::audit::verify::verify(&[file]).is_ok());
}

#[tokio::test]
async fn no_secret_authorization_or_cookie_reaches_the_trail() {
    let h = Harness::start().await;
    let scanner = h.scanner.basic();
    let bearer = h.reader.bearer();
    let wrong = support::basic(&h.reader.client_id, "Wrong-Secret-99");
    for (auth, path) in [(&scanner, RESTRICTED), (&bearer, PAGE), (&wrong, PAGE)] {
        get(
            &h.url(path),
            &[
                ("Authorization", auth),
                ("Cookie", "JSESSIONID=client-cookie-value"),
            ],
        )
        .await;
    }
    let path = h.dir.join("audit.jsonl");
    let secrets: HashMap<&str, String> = HashMap::from([
        ("scanner secret", h.scanner.secret.clone()),
        ("reader secret", h.reader.secret.clone()),
        ("scanner Authorization", scanner.clone()),
        ("reader Authorization", bearer.clone()),
        ("wrong secret", "Wrong-Secret-99".into()),
        ("admin token", ADMIN_TOKEN.into()),
        ("admin Authorization", admin_basic()),
        ("client cookie", "client-cookie-value".into()),
        ("Confluence session cookie", "standin-admin-session".into()),
    ]);
    let _dir = h.stop().await;
    let trail = std::fs::read_to_string(&path).unwrap();
    assert!(trail.lines().count() >= 5);
    for (what, secret) in &secrets {
        assert!(
            !trail.contains(secret.as_str()),
            "{what} found in the audit trail"
        );
        let b64 = secret.strip_prefix("Basic ").unwrap_or(secret);
        assert!(
            !trail.contains(b64),
            "{what} (encoded) found in the audit trail"
        );
    }
}

fn events(h: &Harness) -> Vec<Value> {
    records(&h.dir.join("audit.jsonl"))
}

#[tokio::test]
async fn a_client_without_a_key_cannot_make_keygate_write_large_records() {
    let h = Harness::start().await;
    let ua = "u".repeat(20_000);
    let path = format!("/wiki/{}", "p".repeat(3_000));
    let query = "q=".to_owned() + &"x".repeat(8_000);
    let reply = get(
        &h.url(&format!("{path}?{query}")),
        &[
            ("User-Agent", &ua),
            ("Authorization", "Basic d3Jvbmc6d3Jvbmc="),
        ],
    )
    .await;
    assert_eq!(reply.status, 401);
    let trail_path = h.dir.join("audit.jsonl");
    let _dir = h.stop().await;
    let trail = std::fs::read_to_string(trail_path).unwrap();
    let line = trail
        .lines()
        .find(|l| l.contains("\"event\":\"auth_failure\""))
        .unwrap();
    assert!(
        line.len() < 2_500,
        "an auth_failure record of {} bytes",
        line.len()
    );
    let record: Value = serde_json::from_str(line).unwrap();
    assert_eq!(record["truncated"]["user_agent"], 20_000);
    assert_eq!(record["truncated"]["path"], path.len());
    assert_eq!(record["user_agent"].as_str().unwrap().len(), 256);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_failure_flood_is_summarised_not_written_record_by_record() {
    let h = Harness::start().await;
    let url = h.url(PAGE);
    let started = std::time::Instant::now();
    let statuses = support::load::concurrently(8, |i| {
        let url = url.clone();
        async move {
            let mut out = Vec::new();
            for n in 0..40 {
                let auth = format!("Basic {}", n + i * 100);
                out.push(get(&url, &[("Authorization", &auth)]).await.status.as_u16());
            }
            out
        }
    })
    .await;
    assert!(statuses.iter().flatten().all(|s| *s == 401));
    let elapsed = started.elapsed().as_secs_f64();
    let written = events(&h)
        .iter()
        .filter(|r| r["event"] == "auth_failure")
        .count();
    assert!(
        (written as f64) <= 20.0 + 2.0 * elapsed.ceil() + 1.0,
        "{written} auth_failure records for 320 failures in {elapsed:.1}s"
    );
    // The rest is counted into a summary within a few seconds (bounded wait).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let summary = loop {
        if let Some(s) = events(&h)
            .into_iter()
            .find(|r| r["event"] == "auth_failure_summary")
        {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "no summary record");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(summary["remote_addr"], "127.0.0.1");
    let suppressed = summary["suppressed"].as_u64().unwrap() as usize;
    assert_eq!(written + suppressed, 320, "every failure is accounted for");
    h.stop().await;
}

#[tokio::test]
async fn the_startup_record_comes_before_any_request_is_served() {
    let tmp = support::temp_dir("startup");
    let state = std::sync::Arc::new(keygate::dev::confluence_standin::StandinState::new(
        support::ADMIN_EMAIL,
        ADMIN_TOKEN,
    ));
    let standin = keygate::dev::confluence_standin::Standin::start_with(state)
        .await
        .unwrap();
    let (file, _, reader) = Setup::default().write(tmp.path(), &standin.base_url());
    let app = keygate::App::bind(keygate::config::load(&file).unwrap())
        .await
        .unwrap();
    let url = format!("http://{}{PAGE}", app.local_addr());
    // The request is sent (and queued by the kernel) before keygate runs.
    let auth = reader.basic();
    let request = tokio::spawn(async move { get(&url, &[("Authorization", &auth)]).await });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(app.run(async move {
        let _ = stopped.await;
    }));
    assert_eq!(request.await.unwrap().status, 200);
    let _ = stop.send(());
    running.await.unwrap();
    let all = records(&tmp.path().join("audit.jsonl"));
    assert_eq!(all[0]["event"], "startup", "{:?}", all[0]);
}
