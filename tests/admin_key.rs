//! The admin key end to end, over real sockets: what the stand-in received and what
//! clients got. Time-dependent behaviour (refresh, expiry, skew, idle) is covered
//! under a paused clock in `src/admin_key/tests.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;

use http::Method;
use keygate::dev::confluence_standin::{Fault, Standin, StandinState};
use support::client::get;
use support::{DemoKeyExt as _, Harness, Setup};

const RESTRICTED: &str = "/wiki/api/v2/pages/2001";

#[tokio::test]
async fn restricted_page_is_readable_only_through_the_bypass_route() {
    let h = Harness::start().await;
    assert!(h.requests().is_empty(), "no admin-key call at start-up");
    let scanner = h.scanner.basic();
    let reader = h.reader.basic();
    let reply = get(&h.url(RESTRICTED), &[("Authorization", &scanner)]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.text().contains("Salary bands"));
    let reply = get(&h.url(RESTRICTED), &[("Authorization", &reader)]).await;
    assert_eq!(reply.status, 404, "the reader's route has no bypass");
    let state = Arc::clone(&h.standin.state);
    assert_eq!(state.key_call_count(&Method::GET), 1);
    assert_eq!(state.key_call_count(&Method::POST), 1);
    let metrics = get(&format!("http://{}/metrics", h.ops_addr.unwrap()), &[])
        .await
        .text();
    for line in [
        "keygate_admin_key_events_total{action=\"enabled\",result=\"ok\"} 1",
        "keygate_requests_total{route=\"scan-restricted-pages\",status=\"2xx\",bypass=\"true\"} 1",
        "keygate_requests_total{route=\"read-anything-normally\",status=\"4xx\",bypass=\"false\"} 1",
        "keygate_admin_key_seconds_left 3",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    h.stop().await;
    assert_eq!(
        state.key_call_count(&Method::DELETE),
        1,
        "disable_on_shutdown: one DELETE"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_first_bypass_requests_cause_one_post_and_no_failure() {
    let h = Harness::start_with(Setup {
        extra: "limits:\n  max_connections: 1024\n  per_client_rps: 0\n".into(),
        ..Default::default()
    })
    .await;
    let url = h.url(RESTRICTED);
    let auth = h.scanner.basic();
    let barrier = Arc::new(tokio::sync::Barrier::new(500));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..500 {
        let (url, auth, barrier) = (url.clone(), auth.clone(), Arc::clone(&barrier));
        tasks.spawn(async move {
            barrier.wait().await;
            get(&url, &[("Authorization", &auth)]).await.status
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let state = &h.standin.state;
    assert_eq!(state.key_call_count(&Method::POST), 1);
    assert_eq!(state.key_call_count(&Method::GET), 1);
    assert_eq!(h.forwarded().len(), 500);
    h.stop().await;
}

#[tokio::test]
async fn while_confluence_says_429_bypass_gets_503_and_passthrough_keeps_working() {
    let h = Harness::start().await;
    h.standin
        .state
        .inject(Fault::status(429).retry_after(30), 1);
    let scanner = h.scanner.basic();
    let reader = h.reader.basic();
    for _ in 0..3 {
        let reply = get(&h.url(RESTRICTED), &[("Authorization", &scanner)]).await;
        assert_eq!(reply.status, 503);
        assert_eq!(reply.json()["error"], "admin_key_unavailable");
        let after: u64 = reply.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((25..=30).contains(&after), "Retry-After {after}");
    }
    assert!(
        h.forwarded().is_empty(),
        "a bypass request was forwarded without a key"
    );
    assert_eq!(
        h.standin.state.key_calls().len(),
        1,
        "one call, then back-off"
    );
    let reply = get(
        &h.url("/wiki/api/v2/pages/1001"),
        &[("Authorization", &reader)],
    )
    .await;
    assert_eq!(reply.status, 200);
    h.stop().await;
}

#[tokio::test]
async fn readyz_says_why_when_the_admin_credential_is_refused() {
    let h = Harness::start().await;
    let ops = format!("http://{}", h.ops_addr.unwrap());
    assert_eq!(get(&format!("{ops}/readyz"), &[]).await.status, 200);
    assert_eq!(get(&format!("{ops}/healthz"), &[]).await.status, 200);
    h.standin.state.inject(Fault::status(401), 1);
    let scanner = h.scanner.basic();
    let reply = get(&h.url(RESTRICTED), &[("Authorization", &scanner)]).await;
    assert_eq!(reply.status, 503);
    let ready = get(&format!("{ops}/readyz"), &[]).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["ready"], false);
    let reasons = ready.json()["reasons"].to_string();
    assert!(
        reasons.contains("401") && reasons.contains("api_token"),
        "{reasons}"
    );
    h.stop().await;
}

/// Runs `keygate check --probe` against a stand-in, returning exit code and output.
async fn probe(standin: &Standin, token: &str) -> (i32, String) {
    let tmp = support::temp_dir("probe");
    let dir = tmp.path();
    std::fs::write(dir.join("keys.yaml"), "keys: []\n").unwrap();
    let config = format!(
        "listen:\n  address: 127.0.0.1:0\nconfluence:\n  base_url: {}\n  allow_http: true\n  email: {}\n  api_token: {token}\nroutes:\n  - name: r\n    methods: [GET]\n    path: /wiki/**\n    roles: [\"*\"]\n",
        standin.base_url(),
        support::ADMIN_EMAIL
    );
    let file = dir.join("keygate.yaml");
    std::fs::write(&file, config).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        support::process::cli(
            &["check", "--probe", "--config", file.to_str().unwrap()],
            None,
            &[],
        )
    })
    .await
    .unwrap();
    (out.code, format!("{}{}", out.stdout, out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_reports_credential_and_permission() {
    let state = Arc::new(StandinState::new(
        support::ADMIN_EMAIL,
        support::ADMIN_TOKEN,
    ));
    let standin = Standin::start_with(Arc::clone(&state)).await.unwrap();

    let (code, text) = probe(&standin, support::ADMIN_TOKEN).await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("ok   the admin credential is accepted"),
        "{text}"
    );
    assert!(text.contains("may use admin keys"), "{text}");
    assert_eq!(state.key_call_count(&Method::POST), 1);
    assert_eq!(state.key_call_count(&Method::DELETE), 1);
    assert!(!state.admin_key_active(), "the probe leaves no key behind");

    let (code, text) = probe(&standin, "wrong-token").await;
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("FAIL the admin credential was refused (401)"),
        "{text}"
    );

    state.inject(Fault::status(404).only(Method::POST), 1);
    let (code, text) = probe(&standin, support::ADMIN_TOKEN).await;
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("may not use admin keys (POST answered 404)"),
        "{text}"
    );
    assert!(text.contains("Premium or Enterprise"), "{text}");

    // A key another replica holds is left alone.
    state.admin_key_call(&Method::POST, b"").await;
    let posts = state.key_call_count(&Method::POST);
    let (code, text) = probe(&standin, support::ADMIN_TOKEN).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("left untouched"), "{text}");
    assert_eq!(state.key_call_count(&Method::POST), posts);
    assert_eq!(state.key_call_count(&Method::DELETE), 1);
}
