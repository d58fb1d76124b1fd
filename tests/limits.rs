//! Request limits: per-client token bucket, and Confluence's own 429 honoured for
//! every client without spending the shared account's budget.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::client::get;
use support::{DemoKeyExt as _, Harness, Setup};

const PAGE: &str = "/wiki/api/v2/pages/1001";

#[tokio::test]
async fn a_client_over_its_rate_gets_429_and_others_do_not() {
    let h = Harness::start_with(Setup {
        extra: "limits:\n  per_client_rps: 3\n".into(),
        ..Default::default()
    })
    .await;
    let reader = h.reader.basic();
    let scanner = h.scanner.basic();
    // A burst of 3, then 3 per second: however slow this machine, no more than
    // 3 + 3 × elapsed seconds may pass.
    let started = std::time::Instant::now();
    let mut passed = 0;
    let mut refused = None;
    for _ in 0..12 {
        let reply = get(&h.url(PAGE), &[("Authorization", &reader)]).await;
        match reply.status.as_u16() {
            200 => passed += 1,
            429 => refused = Some(reply),
            other => panic!("status {other}"),
        }
    }
    let allowed = 3 + (started.elapsed().as_secs_f64() * 3.0).ceil() as usize;
    assert!(
        passed >= 3 && passed <= allowed,
        "{passed} passed, {allowed} allowed"
    );
    let refused = refused.expect("some requests were over the rate");
    assert_eq!(refused.json()["error"], "rate_limited");
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(
        get(&h.url(PAGE), &[("Authorization", &scanner)])
            .await
            .status,
        200,
        "another key is not limited"
    );
    assert_eq!(
        h.forwarded().len(),
        passed + 1,
        "refused requests never reached Confluence"
    );
    h.stop().await;
}

#[tokio::test]
async fn confluence_429_with_retry_after_holds_every_client() {
    let h = Harness::start().await;
    let reader = h.reader.basic();
    let scanner = h.scanner.basic();
    let reply = get(
        &h.url("/wiki/rate-limited?after=30"),
        &[("Authorization", &reader)],
    )
    .await;
    assert_eq!(reply.status, 429, "Confluence's answer goes back as is");
    assert_eq!(reply.headers["retry-after"], "30");
    let before = h.forwarded().len();
    for auth in [&reader, &scanner] {
        let reply = get(&h.url(PAGE), &[("Authorization", auth)]).await;
        assert_eq!(reply.status, 429);
        assert_eq!(reply.json()["error"], "upstream_backoff");
        let after: u64 = reply.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((28..=30).contains(&after), "{after}");
    }
    assert_eq!(
        h.forwarded().len(),
        before,
        "nothing spent of the account's budget"
    );
    h.stop().await;

    let h = Harness::start_with(Setup {
        extra: "limits:\n  per_client_rps: 0\n  upstream_backoff: false\n".into(),
        ..Default::default()
    })
    .await;
    let reader = h.reader.basic();
    get(
        &h.url("/wiki/rate-limited?after=30"),
        &[("Authorization", &reader)],
    )
    .await;
    assert_eq!(
        get(&h.url(PAGE), &[("Authorization", &reader)])
            .await
            .status,
        200,
        "off: forwarded"
    );
    h.stop().await;
}
