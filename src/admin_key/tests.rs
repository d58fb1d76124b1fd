//! The lifecycle under tokio's paused clock: hours pass in milliseconds. The API is
//! the stand-in's own admin-key logic called without sockets, so counts and times
//! come from the stand-in.

use super::*;
use crate::dev::confluence_standin::{Fault, StandinState};

struct StandinApi(Arc<StandinState>);

impl AdminKeyApi for StandinApi {
    async fn call(&self, method: Method, minutes: u32) -> Result<ApiReply, String> {
        let body = if method == Method::POST {
            format!("{{\"durationInMinutes\":{minutes}}}")
        } else {
            String::new()
        };
        let (status, retry_after, text) = self.0.admin_key_call(&method, body.as_bytes()).await;
        Ok(ApiReply {
            status: status.as_u16(),
            date: Some(self.0.now()),
            retry_after: retry_after.map(Duration::from_secs),
            body: Bytes::from(text),
        })
    }
}

fn policy(duration_minutes: u32, refresh_before_secs: u64) -> AdminKeyPolicy {
    AdminKeyPolicy {
        duration_minutes,
        refresh_before: Duration::from_secs(refresh_before_secs),
        idle_disable_after: Some(Duration::from_secs(15 * 60)),
        disable_on_shutdown: true,
    }
}

fn setup(policy: AdminKeyPolicy) -> (Arc<StandinState>, AdminKeys, Arc<Readiness>) {
    let standin = Arc::new(StandinState::new("admin@example", "token"));
    let readiness = Arc::new(Readiness::default());
    let keys = AdminKeys::spawn(
        StandinApi(Arc::clone(&standin)),
        policy,
        Duration::from_secs(60),
        Arc::clone(&readiness),
    );
    (standin, keys, readiness)
}

/// Lets spawned admin-key calls run to completion.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn nothing_happens_before_the_first_bypass_request() {
    let (standin, _keys, _) = setup(policy(60, 300));
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(standin.key_calls().is_empty());
}

#[tokio::test(start_paused = true)]
async fn five_hundred_concurrent_first_requests_cause_exactly_one_post() {
    let (standin, keys, _) = setup(policy(60, 300));
    let barrier = Arc::new(tokio::sync::Barrier::new(500));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..500 {
        let (keys, barrier) = (keys.clone(), Arc::clone(&barrier));
        tasks.spawn(async move {
            barrier.wait().await;
            keys.ensure().await
        });
    }
    while let Some(result) = tasks.join_next().await {
        let lease = result.unwrap().expect("every request gets the key");
        assert_eq!(lease.account_id, standin.account_id);
    }
    assert_eq!(standin.key_call_count(&Method::GET), 1);
    assert_eq!(standin.key_call_count(&Method::POST), 1);
}

#[tokio::test(start_paused = true)]
async fn an_active_key_with_enough_left_is_adopted_not_replaced() {
    let (standin, keys, _) = setup(policy(60, 300));
    standin
        .admin_key_call(&Method::POST, br#"{"durationInMinutes":30}"#)
        .await;
    let lease = keys.ensure().await.unwrap();
    assert_eq!(
        standin.key_call_count(&Method::POST),
        1,
        "only the one made above"
    );
    let left = lease.expires.duration_since(standin.now()).unwrap();
    assert!(left > Duration::from_secs(29 * 60), "{left:?}");
}

/// Constant traffic for three virtual hours: the key never lapses and every refresh
/// lands inside the refresh window, whatever the skew of Confluence's clock.
async fn three_hours_of_traffic(skew_secs: i64) {
    let (standin, keys, _) = setup(policy(60, 300));
    standin.set_skew(skew_secs);
    let step = Duration::from_secs(10);
    for i in 0..(3 * 3600 / 10) {
        if i > 0 {
            assert!(
                standin.admin_key_active(),
                "key lapsed at step {i} (skew {skew_secs})"
            );
        }
        keys.ensure()
            .await
            .unwrap_or_else(|u| panic!("step {i}: {u:?}"));
        settle().await;
        tokio::time::sleep(step).await;
    }
    let posts: Vec<_> = standin
        .key_calls()
        .into_iter()
        .filter(|c| c.method == Method::POST)
        .collect();
    // One enable, then a refresh per 55 minutes or so.
    assert!((3..=5).contains(&posts.len()), "{} POSTs", posts.len());
    for refresh in &posts[1..] {
        let left = refresh
            .remaining_before
            .expect("refreshed while still active");
        assert!(
            left <= Duration::from_secs(300),
            "refresh too early: {left:?} left"
        );
        assert!(left > SAFETY_MARGIN, "refresh too late: {left:?} left");
    }
    // Drift checks: the state is re-read at least once a minute while traffic flows.
    let calls = standin.key_calls();
    for pair in calls.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at).unwrap_or_default();
        assert!(
            gap <= Duration::from_secs(60),
            "no admin-key call for {gap:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn key_never_lapses_over_three_virtual_hours() {
    three_hours_of_traffic(0).await;
}

#[tokio::test(start_paused = true)]
async fn confluence_clock_ten_minutes_ahead_changes_nothing() {
    three_hours_of_traffic(600).await;
}

#[tokio::test(start_paused = true)]
async fn confluence_clock_ten_minutes_behind_changes_nothing() {
    three_hours_of_traffic(-600).await;
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_and_traffic_recovers_on_its_own() {
    let (standin, keys, readiness) = setup(policy(60, 300));
    standin.inject(Fault::status(429).retry_after(30), 1);
    let refused = keys.ensure().await.unwrap_err();
    assert!(
        refused.retry_after >= Duration::from_secs(29),
        "{refused:?}"
    );
    assert_eq!(standin.key_calls().len(), 1);
    // For 30 virtual seconds: refused at once, with the remaining back-off, no calls.
    for second in 1..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let refused = keys.ensure().await.unwrap_err();
        let expected = Duration::from_secs(30 - second);
        assert!(
            refused.retry_after <= expected
                && refused.retry_after + Duration::from_secs(1) >= expected,
            "at {second}s: {refused:?}"
        );
    }
    assert_eq!(
        standin.key_calls().len(),
        1,
        "no admin-key call during Retry-After"
    );
    assert!(
        readiness.reasons().is_empty(),
        "a 429 is not a readiness problem"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    keys.ensure().await.expect("recovers by itself");
    assert_eq!(standin.key_call_count(&Method::POST), 1);
}

#[tokio::test(start_paused = true)]
async fn server_errors_back_off_exponentially() {
    let (standin, keys, _) = setup(policy(60, 300));
    standin.inject(Fault::status(503), 4);
    let mut attempts = Vec::new();
    let start = Instant::now();
    while keys.ensure().await.is_err() {
        if attempts.last() != Some(&standin.key_calls().len()) {
            attempts.push(standin.key_calls().len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "never recovered"
        );
    }
    let times: Vec<SystemTime> = standin.key_calls().iter().map(|c| c.at).collect();
    let gaps: Vec<Duration> = times
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).unwrap())
        .collect();
    // 4 failures: waits of about 1, 2, 4 and 8 seconds (±20% jitter) between attempts.
    assert!(gaps.len() >= 4, "{gaps:?}");
    for (gap, nominal) in gaps.iter().zip([1.0, 2.0, 4.0, 8.0]) {
        let secs = gap.as_secs_f64();
        assert!(
            secs >= nominal * 0.8 - 0.01 && secs <= nominal * 1.2 + 0.2,
            "{gaps:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn not_allowed_on_post_sets_readiness_without_a_tight_loop() {
    for status in [403, 404] {
        let (standin, keys, readiness) = setup(policy(60, 300));
        standin.inject(Fault::status(status).only(Method::POST), 2);
        assert!(keys.ensure().await.is_err());
        let reasons = readiness.reasons();
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(reasons[0].contains("may not use admin keys"), "{reasons:?}");
        assert!(reasons[0].contains(&status.to_string()), "{reasons:?}");
        let calls = standin.key_calls().len();
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(keys.ensure().await.is_err());
        }
        assert_eq!(
            standin.key_calls().len(),
            calls,
            "retried within 20s of a 'not allowed'"
        );
        // On demand after the back-off: fails once more, then (faults used up) recovers.
        tokio::time::sleep(Duration::from_secs(40)).await;
        assert!(keys.ensure().await.is_err());
        tokio::time::sleep(Duration::from_secs(200)).await;
        keys.ensure().await.expect("recovers once allowed");
        assert!(
            readiness.reasons().is_empty(),
            "readiness recovers on success"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn rejected_credential_sets_readiness() {
    let (standin, keys, readiness) = setup(policy(60, 300));
    standin.inject(Fault::status(401), 1);
    let refused = keys.ensure().await.unwrap_err();
    assert!(
        refused.retry_after >= Duration::from_secs(24),
        "{refused:?}"
    );
    let reasons = readiness.reasons();
    assert!(reasons[0].contains("401"), "{reasons:?}");
    assert!(reasons[0].contains("api_token"), "{reasons:?}");
    assert_eq!(standin.key_calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_key_disabled_elsewhere_is_re_enabled_within_a_minute() {
    let (standin, keys, _) = setup(policy(60, 300));
    keys.ensure().await.unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    standin.disable_externally();
    let disabled_at = standin.now();
    let mut back = None;
    for _ in 0..30 {
        keys.ensure().await.unwrap();
        settle().await;
        if standin.admin_key_active() {
            back = Some(standin.now());
            break;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let back = back.expect("re-enabled");
    let took = back.duration_since(disabled_at).unwrap();
    assert!(took <= Duration::from_secs(60), "took {took:?}");
    assert_eq!(standin.key_call_count(&Method::POST), 2);
}

#[tokio::test(start_paused = true)]
async fn idle_disable_sends_exactly_one_delete() {
    let (standin, keys, _) = setup(policy(60, 300));
    keys.ensure().await.unwrap();
    tokio::time::sleep(Duration::from_secs(14 * 60)).await;
    assert_eq!(
        standin.key_call_count(&Method::DELETE),
        0,
        "not idle long enough yet"
    );
    keys.ensure().await.unwrap();
    tokio::time::sleep(Duration::from_secs(14 * 60)).await;
    assert_eq!(
        standin.key_call_count(&Method::DELETE),
        0,
        "traffic restarted the idle clock"
    );
    tokio::time::sleep(Duration::from_secs(2 * 60)).await;
    assert_eq!(standin.key_call_count(&Method::DELETE), 1);
    assert!(!standin.admin_key_active());
    tokio::time::sleep(Duration::from_secs(3 * 3600)).await;
    assert_eq!(
        standin.key_call_count(&Method::DELETE),
        1,
        "one DELETE only"
    );
    // The next bypass request enables a key again.
    keys.ensure().await.unwrap();
    assert!(standin.admin_key_active());
}

#[tokio::test(start_paused = true)]
async fn shutdown_sends_exactly_one_delete_and_only_when_a_key_is_held() {
    let (standin, keys, _) = setup(policy(60, 300));
    keys.shutdown().await;
    assert_eq!(
        standin.key_call_count(&Method::DELETE),
        0,
        "no key, nothing to disable"
    );
    keys.ensure().await.unwrap();
    keys.shutdown().await;
    assert_eq!(standin.key_call_count(&Method::DELETE), 1);
    assert!(!standin.admin_key_active());

    let mut keep = policy(60, 300);
    keep.disable_on_shutdown = false;
    let (standin, keys, _) = setup(keep);
    keys.ensure().await.unwrap();
    keys.shutdown().await;
    assert_eq!(standin.key_call_count(&Method::DELETE), 0);
}

#[tokio::test(start_paused = true)]
async fn a_slow_call_makes_waiters_wait_not_multiply() {
    let (standin, keys, _) = setup(policy(60, 300));
    standin.inject(
        Fault::status(200)
            .delay(Duration::from_secs(20))
            .only(Method::GET),
        1,
    );
    // The injected 200 has no key in it: unreadable, so the call fails after 20s.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let keys = keys.clone();
        tasks.spawn(async move { keys.ensure().await });
    }
    while let Some(r) = tasks.join_next().await {
        assert!(r.unwrap().is_err());
    }
    assert_eq!(standin.key_calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn events_report_enable_refresh_and_disable() {
    let (_standin, keys, _) = setup(policy(10, 300));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    keys.on_event(move |e| sink.lock().unwrap().push(e.action));
    keys.ensure().await.unwrap();
    tokio::time::sleep(Duration::from_secs(6 * 60)).await;
    keys.ensure().await.unwrap();
    settle().await;
    keys.shutdown().await;
    assert_eq!(*seen.lock().unwrap(), ["enabled", "refreshed", "disabled"]);
}

#[tokio::test(start_paused = true)]
async fn keys_shorter_than_refresh_before_are_refreshed_at_half_life_not_per_request() {
    let (standin, keys, _) = setup(policy(60, 300));
    standin.set_key_lifetime(Some(Duration::from_secs(60)));
    for i in 0..120 {
        if i > 0 {
            assert!(standin.admin_key_active(), "lapsed at step {i}");
        }
        keys.ensure().await.unwrap();
        settle().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    // Ten minutes of 60-second keys refreshed at half life: about 20 POSTs, not 120.
    let posts = standin.key_call_count(&Method::POST);
    assert!((18..=22).contains(&posts), "{posts} POSTs");
}

#[tokio::test(start_paused = true)]
async fn no_request_is_handed_a_lease_while_its_key_is_being_disabled() {
    let (standin, keys, _) = setup(policy(60, 300));
    let first = keys.ensure().await.unwrap();
    // The DELETE takes ten seconds to answer.
    standin.inject(Fault::slow(Duration::from_secs(10)).only(Method::DELETE), 1);
    let disabling = {
        let keys = keys.clone();
        tokio::spawn(async move { keys.disable("test").await })
    };
    settle().await;
    assert_eq!(keys.state(), State::Disabling);
    // A bypass request now waits for the DELETE and then a new key; it never
    // gets the key being disabled.
    let during = {
        let keys = keys.clone();
        tokio::spawn(async move { keys.ensure().await })
    };
    settle().await;
    assert!(
        !during.is_finished(),
        "a lease was handed out during the DELETE"
    );
    disabling.await.unwrap();
    let lease = during.await.unwrap().unwrap();
    assert_eq!(standin.key_call_count(&Method::DELETE), 1);
    assert_eq!(
        standin.key_call_count(&Method::POST),
        2,
        "a new key after the DELETE"
    );
    assert!(standin.admin_key_active());
    let _ = (first, lease);
}

#[tokio::test(start_paused = true)]
async fn a_short_but_usable_key_from_get_serves_requests_when_the_post_fails() {
    let (standin, keys, _) = setup(policy(60, 300));
    // Another tool enabled a key with two minutes left: less than refresh_before.
    standin.set_key_lifetime(Some(Duration::from_secs(120)));
    standin
        .admin_key_call(&Method::POST, br#"{"durationInMinutes":2}"#)
        .await;
    standin.set_key_lifetime(None);
    standin.inject(Fault::status(503).only(Method::POST), 1);
    let lease = keys
        .ensure()
        .await
        .expect("the short key is still good to use");
    let left = lease.expires.duration_since(standin.now()).unwrap();
    assert!(
        left <= Duration::from_secs(120) && left > SAFETY_MARGIN,
        "{left:?}"
    );
    assert_eq!(
        standin.key_call_count(&Method::POST),
        2,
        "the one above and the failed one"
    );
}

#[tokio::test(start_paused = true)]
async fn a_403_to_get_is_reported_as_a_refusal_of_get() {
    let (standin, keys, readiness) = setup(policy(60, 300));
    standin.inject(Fault::status(403).only(Method::GET), 1);
    assert!(keys.ensure().await.is_err());
    let reasons = readiness.reasons();
    assert!(reasons[0].contains("403 to GET"), "{reasons:?}");
    assert!(!reasons[0].contains("POST"), "{reasons:?}");
}

/// One day of bursty bypass traffic, one step per 10 s: `Some(n)` sends a
/// request through replica `n` (modulo the replicas there are).
fn bursty_day() -> Vec<Option<usize>> {
    let mut seed: u64 = 0x5eed_cafe;
    let mut next = move |below: u64| {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        (seed >> 33) % below
    };
    let mut steps = Vec::with_capacity(8640);
    while steps.len() < 8640 {
        // A quiet gap of 5 to 180 minutes, then a burst of 2 to 90 minutes.
        for _ in 0..(30 + next(1050)) {
            steps.push(None);
        }
        for _ in 0..(12 + next(528)) {
            steps.push(Some(next(3) as usize));
        }
    }
    steps.truncate(8640);
    steps
}

#[derive(Debug)]
struct Day {
    calls: usize,
    posts: usize,
    deletes: usize,
    active_minutes: u64,
    traffic_minutes: u64,
}

async fn run_day(replicas: usize, schedule: &[Option<usize>]) -> Day {
    const STEP: Duration = Duration::from_secs(10);
    let idle = Duration::from_secs(15 * 60);
    let standin = Arc::new(StandinState::new("admin@example", "token"));
    let store = Arc::new(MemoryStore::default());
    let mut policy = policy(60, 300);
    policy.idle_disable_after = Some(idle);
    let settings = || Settings {
        policy: policy.clone(),
        wait_bound: Duration::from_secs(60),
    };
    let keys: Vec<AdminKeys> = (0..replicas)
        .map(|i| {
            let api = StandinApi(Arc::clone(&standin));
            let readiness = Arc::new(Readiness::default());
            let name: Arc<str> = Arc::from(format!("r{i}"));
            if replicas == 1 {
                AdminKeys::spawn_with(api, LocalCoordination, settings(), readiness, name)
            } else {
                let cluster =
                    ClusterCoordination::new(Arc::clone(&store), &name, Duration::from_secs(65))
                        .with_poll(Duration::from_secs(5));
                AdminKeys::spawn_with(api, cluster, settings(), readiness, name)
            }
        })
        .collect();
    let mut last_traffic: Option<Instant> = None;
    let (mut active, mut traffic) = (0, 0);
    for (i, who) in schedule.iter().enumerate() {
        let now = Instant::now();
        if let Some(n) = who {
            keys[n % replicas]
                .ensure()
                .await
                .unwrap_or_else(|u| panic!("step {i}: {u:?}"));
            settle().await;
            assert!(
                standin.admin_key_active(),
                "step {i}: the key lapsed under traffic"
            );
            last_traffic = Some(now);
            traffic += 1;
        }
        settle().await;
        if standin.admin_key_active() {
            active += 1;
            // Active only while some replica has traffic, plus idle_disable_after
            // (and the poll and heartbeat lag of a few seconds).
            let since = last_traffic.map(|l| now - l);
            assert!(
                since.is_some_and(|s| s <= idle + Duration::from_secs(30)),
                "step {i}: the key is active {since:?} after the last bypass request"
            );
        }
        tokio::time::sleep(STEP).await;
    }
    let calls = standin.key_calls();
    Day {
        calls: calls.len(),
        posts: standin.key_call_count(&Method::POST),
        deletes: standin.key_call_count(&Method::DELETE),
        active_minutes: active * 10 / 60,
        traffic_minutes: traffic * 10 / 60,
    }
}

#[tokio::test(start_paused = true)]
async fn a_simulated_day_over_three_replicas_costs_no_more_calls_than_one_node() {
    let schedule = bursty_day();
    let single = run_day(1, &schedule).await;
    let cluster = run_day(3, &schedule).await;
    eprintln!("one node:     {single:?}\nthree replicas: {cluster:?}");
    assert!(cluster.calls <= single.calls, "{cluster:?} vs {single:?}");
    assert_eq!(cluster.posts, single.posts);
    assert_eq!(cluster.deletes, single.deletes);
    assert!(
        cluster.deletes > 3,
        "the day has several bursts: {cluster:?}"
    );
    // Active while there is traffic, and not much longer than one node keeps it.
    assert!(cluster.active_minutes >= cluster.traffic_minutes);
    assert!(
        cluster.active_minutes <= single.active_minutes + 5,
        "{cluster:?} vs {single:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn cluster_replicas_share_one_key_and_disable_only_when_all_are_idle() {
    let standin = Arc::new(StandinState::new("admin@example", "token"));
    let store = Arc::new(MemoryStore::default());
    let mut p = policy(60, 300);
    p.idle_disable_after = Some(Duration::from_secs(60));
    let keys: Vec<AdminKeys> = (0..3)
        .map(|i| {
            let name: Arc<str> = Arc::from(format!("r{i}"));
            AdminKeys::spawn_with(
                StandinApi(Arc::clone(&standin)),
                ClusterCoordination::new(Arc::clone(&store), &name, Duration::from_secs(65)),
                Settings {
                    policy: p.clone(),
                    wait_bound: Duration::from_secs(60),
                },
                Arc::new(Readiness::default()),
                name,
            )
        })
        .collect();
    // A slow POST: the others ask for their turn while the first call runs.
    standin.inject(Fault::slow(Duration::from_secs(1)).only(Method::POST), 1);
    let barrier = Arc::new(tokio::sync::Barrier::new(300));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300 {
        let (keys, barrier) = (keys[i % 3].clone(), Arc::clone(&barrier));
        tasks.spawn(async move {
            barrier.wait().await;
            keys.ensure().await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().expect("every request gets the key");
    }
    // One call for the cluster: the others adopt what it published.
    assert_eq!(standin.key_call_count(&Method::POST), 1);
    assert_eq!(standin.key_call_count(&Method::GET), 1);
    // Traffic continues on r2 only: nobody disables.
    for _ in 0..30 {
        keys[2].ensure().await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    assert_eq!(standin.key_call_count(&Method::DELETE), 0);
    // r0 and r1 shut down while r2 has recent traffic: no DELETE either.
    keys[0].shutdown().await;
    keys[1].shutdown().await;
    assert_eq!(standin.key_call_count(&Method::DELETE), 0);
    // Then everyone is idle: one DELETE.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(standin.key_call_count(&Method::DELETE), 1);
    assert!(!standin.admin_key_active());
}
