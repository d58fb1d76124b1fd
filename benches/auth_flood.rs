//! A legitimate client's latency with and without a flood of wrong secrets for a
//! known client_id (client_ids are not secret) from 50 concurrent connections,
//! and keygate's memory meanwhile. keygate runs as its own process (the release
//! binary) in front of the in-process stand-in.
//!
//!   cargo bench --bench auth_flood        (REQUESTS=2000 FLOOD=50)
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate::dev::confluence_standin::{Standin, StandinState};
use support::{basic, DemoKeyExt as _, Setup};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Sequential requests on one keep-alive connection; their latencies, sorted.
async fn legit(url: &str, auth: &str, n: usize) -> Vec<Duration> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let request = http::Request::get(url)
            .header("authorization", auth)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let started = Instant::now();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap();
        out.push(started.elapsed());
    }
    out.sort();
    out
}

fn main() {
    support::load::block_on(run());
}

async fn run() {
    let requests = env_or("REQUESTS", 2000);
    let flood = env_or("FLOOD", 50);
    let state = Arc::new(StandinState::new(
        support::ADMIN_EMAIL,
        support::ADMIN_TOKEN,
    ));
    let standin = Standin::start_with(state).await.unwrap();
    let dir = support::temp_dir("auth-flood");
    let setup = Setup {
        audit: "audit:\n  path: audit.jsonl\n  record_passthrough: false\n".into(),
        ..Setup::default()
    };
    let (config, scanner, reader) = setup.write(dir.path(), &standin.base_url());
    let process = support::process::Process::spawn(&config, std::process::Stdio::null(), &[]);
    let url = process.url("/wiki/api/v2/pages/1001");
    let auth = reader.basic();
    legit(&url, &auth, 200).await; // warm-up: the credential is verified and cached
    let rss_idle = process.rss_kib();
    let quiet = legit(&url, &auth, requests).await;

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut flooders = tokio::task::JoinSet::new();
    for i in 0..flood {
        let (url, victim, stop, sent) = (
            url.clone(),
            scanner.client_id.clone(),
            Arc::clone(&stop),
            Arc::clone(&sent),
        );
        flooders.spawn(async move {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<http_body_util::Full<bytes::Bytes>>();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let request = http::Request::get(&url)
                    .header("authorization", basic(&victim, &format!("Wrong-{i}-{n}")))
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                if let Ok(response) = client.request(request).await {
                    let status = response.status().as_u16();
                    assert!(status == 401 || status == 429, "{status}");
                    let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                }
                n += 1;
                sent.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // the flood at full strength
    let rss_peak = Arc::new(AtomicU64::new(process.rss_kib()));
    let pid = process.child.id();
    let sampler = {
        let (peak, stop) = (Arc::clone(&rss_peak), Arc::clone(&stop));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(support::process::rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let flood_started = Instant::now();
    let sent_before = sent.load(Ordering::Relaxed);
    let loaded = legit(&url, &auth, requests).await;
    let flood_secs = flood_started.elapsed().as_secs_f64();
    let flood_sent = sent.load(Ordering::Relaxed) - sent_before;
    stop.store(true, Ordering::Relaxed);
    while let Some(r) = flooders.join_next().await {
        if let Err(e) = r {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
    sampler.await.unwrap();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "legitimate client, {requests} sequential requests, cached key:\n  quiet:  p50 {:.3} ms  p99 {:.3} ms\n  flood:  p50 {:.3} ms  p99 {:.3} ms  ({flood} connections, {:.0} wrong secrets/s)\n  p99 ratio {:.2}\n  keygate RSS: idle {} KiB, peak during the flood {} KiB",
        ms(percentile(&quiet, 0.5)),
        ms(percentile(&quiet, 0.99)),
        ms(percentile(&loaded, 0.5)),
        ms(percentile(&loaded, 0.99)),
        flood_sent as f64 / flood_secs,
        ms(percentile(&loaded, 0.99)) / ms(percentile(&quiet, 0.99)),
        rss_idle,
        rss_peak.load(Ordering::Relaxed)
    );
}
