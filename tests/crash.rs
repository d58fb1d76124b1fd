//! keygate killed with SIGKILL under load: every request that reached Confluence
//! with the bypass header has its `phase: "start"` record in the trail, the trail
//! verifies, and neither the trail nor the logs hold a secret.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use keygate::dev::confluence_standin::{Standin, StandinState};
use rand::Rng as _;
use support::{admin_basic, DemoKeyExt as _, ADMIN_EMAIL, ADMIN_TOKEN};

const RESTRICTED: &str = "/wiki/api/v2/pages/2001";
const CLIENTS: usize = 32;
const REQUESTS: usize = 2000;

/// keygate running as its own process in front of an in-process stand-in.
struct Process {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
    scanner: keygate::dev::DemoKey,
    state: Arc<StandinState>,
    _standin: Standin,
}

/// Starts `keygate run` with the given `audit:` section; stdout/stderr as given.
async fn spawn_keygate(tag: &str, audit: &str, stdout: Stdio, stderr: Stdio) -> Process {
    let state = Arc::new(StandinState::new(ADMIN_EMAIL, ADMIN_TOKEN));
    let standin = Standin::start_with(Arc::clone(&state)).await.unwrap();
    let dir = support::temp_dir(tag);
    let mut keys = keygate::dev::write_demo_keys(&dir.join("keys.yaml")).unwrap();
    keys.pop();
    let scanner = keys.pop().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = format!(
        "listen:\n  address: 127.0.0.1:{port}\nconfluence:\n  base_url: {}\n  allow_http: true\n  email: {ADMIN_EMAIL}\n  api_token: {ADMIN_TOKEN}\nclients:\n  keys_file: keys.yaml\n{}{audit}limits:\n  per_client_rps: 0\n",
        standin.base_url(),
        keygate::dev::DEV_ROUTES
    );
    std::fs::write(dir.join("keygate.yaml"), config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(dir.join("keygate.yaml"))
        .env("RUST_LOG", "debug")
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .unwrap();
    // Ready when it accepts connections (bounded).
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Process {
                child,
                port,
                dir,
                scanner,
                state,
                _standin: standin,
            };
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("keygate did not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_leaves_a_start_record_for_every_bypass_that_left() {
    let log = std::fs::File::create(
        std::env::temp_dir().join(format!("keygate-crash-{}.log", std::process::id())),
    )
    .unwrap();
    let Process {
        mut child,
        port,
        dir,
        scanner,
        state,
        _standin,
    } = spawn_keygate(
        "crash",
        "audit:\n  path: audit.jsonl\n",
        Stdio::null(),
        Stdio::from(log),
    )
    .await;
    let log_path = std::env::temp_dir().join(format!("keygate-crash-{}.log", std::process::id()));
    let url = format!("http://127.0.0.1:{port}{RESTRICTED}");
    let auth = scanner.basic();
    let done = Arc::new(AtomicUsize::new(0));
    let kill_at = rand::thread_rng().gen_range(100..REQUESTS - 100);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let (client, url, auth, done) =
            (client.clone(), url.clone(), auth.clone(), Arc::clone(&done));
        tasks.spawn(async move {
            while done.load(Ordering::Relaxed) < REQUESTS {
                let request = http::Request::get(&url)
                    .header("authorization", &auth)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let Ok(response) = client.request(request).await else {
                    return;
                };
                assert_eq!(response.status(), 200);
                if response.into_body().collect().await.is_err() {
                    return;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while done.load(Ordering::Relaxed) < kill_at {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    while tasks.join_next().await.is_some() {}

    let reached: HashSet<String> = state
        .requests()
        .iter()
        .filter(|r| {
            r.path() == RESTRICTED && r.header_values("atl-confluence-with-admin-key") == ["true"]
        })
        .flat_map(|r| r.header_values("x-request-id"))
        .collect();
    assert!(
        reached.len() >= kill_at,
        "{} reached, killed after {kill_at}",
        reached.len()
    );
    let trail = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    let started: HashSet<String> = trail
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["event"] == "request" && r["phase"] == "start")
        .map(|r| r["request_id"].as_str().unwrap().to_owned())
        .collect();
    let missing: Vec<_> = reached.difference(&started).collect();
    assert!(
        missing.is_empty(),
        "{} bypass requests reached Confluence without a start record: {missing:?}",
        missing.len()
    );

    let verify = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["audit", "verify"])
        .arg(dir.join("audit.jsonl"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(report.starts_with("ok: "), "{report}");

    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(logs.contains("keygate listening"), "logs were captured");
    let b64 = |s: String| s.trim_start_matches("Basic ").to_owned();
    for secret in [
        scanner.secret.clone(),
        b64(scanner.basic()),
        ADMIN_TOKEN.into(),
        b64(admin_basic()),
        "standin-admin-session".into(),
    ] {
        assert!(!trail.contains(&secret), "a secret is in the audit trail");
        assert!(!logs.contains(&secret), "a secret is in the logs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_to_standard_output_is_a_verifiable_chain() {
    let Process {
        child,
        port,
        dir,
        scanner,
        ..
    } = spawn_keygate(
        "stdout",
        "audit:\n  path: \"-\"\n",
        Stdio::piped(),
        Stdio::null(),
    )
    .await;
    let reply = support::client::get(
        &format!("http://127.0.0.1:{port}{RESTRICTED}"),
        &[("Authorization", &scanner.basic())],
    )
    .await;
    assert_eq!(reply.status, 200);
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "SIGTERM ends keygate with 0");
    let text = String::from_utf8(out.stdout).unwrap();
    let events: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(events.first().map(String::as_str), Some("startup"));
    assert_eq!(events.last().map(String::as_str), Some("shutdown"));
    assert!(
        events.iter().filter(|e| *e == "request").count() == 2,
        "{events:?}"
    );
    let file = dir.join("captured.jsonl");
    std::fs::write(&file, &text).unwrap();
    assert!(keygate::audit::verify::verify(&[file]).is_ok());
}
