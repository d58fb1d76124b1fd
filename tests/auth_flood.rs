//! Authentication as a denial of service: wrong secrets for a known client_id
//! (client_ids are not secret) must not make keygate hash without bound, and a
//! legitimate client with a cached credential goes on being served.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use support::client::get;
use support::{basic, DemoKeyExt as _, Harness};

const PAGE: &str = "/wiki/api/v2/pages/1001";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_flood_is_bounded_and_a_cached_client_goes_on() {
    let h = Harness::start().await;
    let reader = h.reader.basic();
    // The legitimate client's credential is verified and cached first.
    assert_eq!(
        get(&h.url(PAGE), &[("Authorization", &reader)])
            .await
            .status,
        200
    );
    let runs_before = h.control.argon2_runs();

    let stop = Arc::new(AtomicBool::new(false));
    let url = h.url(PAGE);
    let victim = h.scanner.client_id.clone();
    let flood = support::load::concurrently(50, |i| {
        let (url, victim, stop) = (url.clone(), victim.clone(), Arc::clone(&stop));
        async move {
            let mut statuses = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 40 {
                // A different wrong secret every time: nothing to remember.
                let auth = basic(&victim, &format!("Wrong-Secret-{i}-{n}"));
                statuses.push(get(&url, &[("Authorization", &auth)]).await.status.as_u16());
                n += 1;
            }
            statuses
        }
    });
    let legit = async {
        let mut statuses = Vec::new();
        for _ in 0..100 {
            statuses.push(
                get(&url, &[("Authorization", &reader)])
                    .await
                    .status
                    .as_u16(),
            );
        }
        stop.store(true, Ordering::Relaxed);
        statuses
    };
    let (flood, legit) = tokio::join!(flood, legit);
    assert!(
        legit.iter().all(|s| *s == 200),
        "legitimate client: {legit:?}"
    );
    let flood: Vec<u16> = flood.into_iter().flatten().collect();
    let runs = h.control.argon2_runs() - runs_before;
    let throttled = flood.iter().filter(|s| **s == 429).count();
    eprintln!(
        "{} wrong-secret requests: {} argon2 runs, {throttled} answered 429",
        flood.len(),
        runs
    );
    assert!(flood.iter().all(|s| *s == 401 || *s == 429), "{flood:?}");
    // The client's budget (10, then 2/s) and the queue bound the hashing, not the
    // number of requests.
    assert!(
        runs <= 40,
        "{runs} argon2 runs for {} requests",
        flood.len()
    );
    assert!(
        throttled > flood.len() / 2,
        "most were refused without hashing"
    );
    let metrics = get(&h.ops_url("/metrics"), &[]).await.text();
    assert!(
        metrics.contains("keygate_auth_failures_total{reason=\"throttled\"}")
            || metrics.contains("keygate_auth_failures_total{reason=\"busy\"}"),
        "{metrics}"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_repeated_wrong_secret_is_refused_without_hashing_again() {
    let h = Harness::start().await;
    let wrong = basic(&h.scanner.client_id, "Wrong-Secret-1");
    for _ in 0..5 {
        assert_eq!(
            get(&h.url(PAGE), &[("Authorization", &wrong)]).await.status,
            401
        );
    }
    assert_eq!(h.control.argon2_runs(), 1, "remembered as wrong");
    // The right secret still works at once.
    let right = h.scanner.basic();
    assert_eq!(
        get(&h.url(PAGE), &[("Authorization", &right)]).await.status,
        200
    );
    h.stop().await;
}

#[tokio::test]
async fn an_e_mail_shaped_username_authenticates_as_its_client_id() {
    let h = Harness::start().await;
    let auth = basic(
        &format!("{}@tools.example.com", h.reader.client_id),
        &h.reader.secret,
    );
    let reply = get(&h.url(PAGE), &[("Authorization", &auth)]).await;
    assert_eq!(reply.status, 200);
    // The domain names no identity: a different one is the same key.
    let other = basic(
        &format!("{}@evil.example", h.reader.client_id),
        &h.reader.secret,
    );
    assert_eq!(
        get(&h.url(PAGE), &[("Authorization", &other)]).await.status,
        200
    );
    h.stop().await;
}
