//! Concurrent clients whose panics fail the test: an assertion inside a task
//! that nobody joins could never fail.

use std::future::Future;

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
