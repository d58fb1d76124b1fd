//! Shared by the benchmarks: keygate in front of the stand-in, in one process, and
//! a closed-loop load generator.
#![allow(
    dead_code,
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keygate::dev::confluence_standin::{Standin, StandinState};
use keygate::dev::DemoKey;
use keygate::Control;

pub struct Bench {
    pub addr: SocketAddr,
    pub control: Control,
    pub scanner: DemoKey,
    pub reader: DemoKey,
    pub dir: std::path::PathBuf,
    pub standin: Standin,
}

/// Runs a benchmark on a multi-threaded runtime.
pub fn block_on(f: impl std::future::Future<Output = ()>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(f);
}

pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Starts the stand-in and keygate with `extra` appended to the config.
pub async fn start(routes: &str, extra: &str) -> Bench {
    let state = Arc::new(StandinState::new("admin@bench", "bench-token"));
    let standin = Standin::start_with(state).await.unwrap();
    let dir = std::env::temp_dir().join(format!("keygate-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut keys = keygate::dev::write_demo_keys(&dir.join("keys.yaml")).unwrap();
    let reader = keys.pop().unwrap();
    let scanner = keys.pop().unwrap();
    let config = format!(
        "listen:\n  address: 127.0.0.1:0\nconfluence:\n  base_url: {}\n  allow_http: true\n  email: admin@bench\n  api_token: bench-token\nadmin_key:\n  idle_disable_after: never\n  disable_on_shutdown: false\nclients:\n  keys_file: keys.yaml\nlimits:\n  max_connections: 4096\n  per_client_rps: 0\n{routes}{extra}",
        standin.base_url()
    );
    let file = dir.join("keygate.yaml");
    std::fs::write(&file, config).unwrap();
    let app = keygate::App::bind(keygate::config::load(&file).unwrap())
        .await
        .unwrap();
    let addr = app.local_addr();
    let control = app.control();
    tokio::spawn(app.run(std::future::pending()));
    Bench {
        addr,
        control,
        scanner,
        reader,
        dir,
        standin,
    }
}

/// Sends `total` GETs over `concurrency` keep-alive connections; returns requests/s.
pub async fn load(url: &str, auth: &str, total: usize, concurrency: usize) -> f64 {
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build_http::<Full<Bytes>>();
    let per_task = total / concurrency;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, url, auth) = (client.clone(), url.to_owned(), auth.to_owned());
        tasks.spawn(async move {
            for _ in 0..per_task {
                let request = http::Request::get(&url)
                    .header("authorization", &auth)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let response = client.request(request).await.unwrap();
                assert!(
                    response.status().is_success(),
                    "status {}",
                    response.status()
                );
                response.into_body().collect().await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    (per_task * concurrency) as f64 / started.elapsed().as_secs_f64()
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn basic(key: &DemoKey) -> String {
    use base64::Engine as _;
    let raw = format!("{}:{}", key.client_id, key.secret);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

pub const SETTLE: Duration = Duration::from_millis(200);
