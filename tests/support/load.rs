//! Concurrent clients whose panics fail the test: an assertion inside a task
//! that nobody joins could never fail.

use std::future::Future;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};

/// A keep-alive HTTP/1.1 client for load.
pub type Http = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

pub fn http() -> Http {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>()
}

/// One GET with `auth`, its body read to the end: the status, or `None` when
/// the connection failed (a server killed under load, say).
pub async fn get_status(http: &Http, url: &str, auth: &str) -> Option<u16> {
    let request = http::Request::get(url)
        .header("authorization", auth)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = http.request(request).await.ok()?;
    let status = response.status().as_u16();
    response.into_body().collect().await.ok()?;
    Some(status)
}

/// Runs a benchmark's `main` future on a multi-threaded runtime.
pub fn block_on<F: Future>(main: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(main)
}

/// Runs `f(i)` for `i` in `0..n` concurrently; returns the outputs in order, and
/// re-raises the first panic of any task.
pub async fn concurrently<F, Fut, T>(n: usize, f: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let fut = f(i);
        tasks.spawn(async move { (i, fut.await) });
    }
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((i, v)) => out[i] = Some(v),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("a load task was cancelled: {e}"),
        }
    }
    out.into_iter().flatten().collect()
}

/// Sends `total` GETs with `auth` over `concurrency` keep-alive connections, each
/// expected to succeed; returns requests/s.
pub async fn throughput(url: &str, auth: &str, total: usize, concurrency: usize) -> f64 {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build_http::<Full<Bytes>>();
    let per_task = total / concurrency;
    let started = std::time::Instant::now();
    concurrently(concurrency, |_| {
        let (client, url, auth) = (client.clone(), url.to_owned(), auth.to_owned());
        async move {
            for _ in 0..per_task {
                let status = get_status(&client, &url, &auth)
                    .await
                    .expect("request failed");
                assert!((200..300).contains(&status), "status {status}");
            }
        }
    })
    .await;
    (per_task * concurrency) as f64 / started.elapsed().as_secs_f64()
}

/// The median of a sample.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A number from the environment, for benchmark knobs.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
