//! keygate killed with SIGKILL under load: every request that reached Confluence
//! with the bypass header has its `phase: "start"` record in the trail, the trail
//! verifies, and neither the trail nor the logs hold a secret.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keygate::dev::confluence_standin::{Standin, StandinState};
use rand::Rng as _;
use support::check::assert_no_secret;
use support::process::Process;
use support::{admin_basic, DemoKeyExt as _, Setup, ADMIN_EMAIL, ADMIN_TOKEN};

const RESTRICTED: &str = "/wiki/api/v2/pages/2001";
const CLIENTS: usize = 32;
const REQUESTS: usize = 2000;

/// keygate running as its own process in front of an in-process stand-in.
struct Running {
    process: Process,
    dir: tempfile::TempDir,
    scanner: keygate::dev::DemoKey,
    state: Arc<StandinState>,
    _standin: Standin,
}

/// Starts `keygate run` with the given `audit:` section; stdout as given.
async fn spawn_keygate(tag: &str, audit: &str, stdout: Stdio) -> Running {
    let state = Arc::new(StandinState::new(ADMIN_EMAIL, ADMIN_TOKEN));
    let standin = Standin::start_with(Arc::clone(&state)).await.unwrap();
    let dir = support::temp_dir(tag);
    let setup = Setup {
        audit: audit.to_owned(),
        ..Setup::default()
    };
    let (config, scanner, _) = setup.write(dir.path(), &standin.base_url());
    let process = tokio::task::spawn_blocking(move || {
        Process::spawn(&config, stdout, &[("RUST_LOG", "debug")])
    })
    .await
    .unwrap();
    Running {
        process,
        dir,
        scanner,
        state,
        _standin: standin,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_leaves_a_start_record_for_every_bypass_that_left() {
    let Running {
        mut process,
        dir,
        scanner,
        state,
        _standin,
    } = spawn_keygate("crash", "audit:\n  path: audit.jsonl\n", Stdio::null()).await;
    let dir = dir.path();
    let url = process.url(RESTRICTED);
    let auth = scanner.basic();
    let done = Arc::new(AtomicUsize::new(0));
    let kill_at = rand::thread_rng().gen_range(100..REQUESTS - 100);
    let client = support::load::http();
    let load = support::load::concurrently(CLIENTS, |_| {
        let (client, url, auth, done) =
            (client.clone(), url.clone(), auth.clone(), Arc::clone(&done));
        async move {
            while done.load(Ordering::Relaxed) < REQUESTS {
                let Some(status) = support::load::get_status(&client, &url, &auth).await else {
                    return;
                };
                assert_eq!(status, 200);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let killer = async {
        while done.load(Ordering::Relaxed) < kill_at {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        process.signal("KILL");
        let _ = process.child.wait();
    };
    tokio::join!(load, killer);

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

    let trail_path = dir.join("audit.jsonl");
    let verify = support::process::cli(
        &["audit", "verify", trail_path.to_str().unwrap()],
        None,
        &[],
    );
    assert_eq!(verify.code, 0, "{}{}", verify.stdout, verify.stderr);
    assert!(verify.stdout.starts_with("ok: "), "{}", verify.stdout);

    let logs = process.log_text();
    assert!(logs.contains("keygate listening"), "logs were captured");
    let b64 = |s: String| s.trim_start_matches("Basic ").to_owned();
    let secrets = [
        scanner.secret.clone(),
        b64(scanner.basic()),
        ADMIN_TOKEN.into(),
        b64(admin_basic()),
        "standin-admin-session".into(),
    ];
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert_no_secret(&trail, &secrets, "the audit trail");
    assert_no_secret(&logs, &secrets, "the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_to_standard_output_is_a_verifiable_chain() {
    let Running {
        mut process,
        dir,
        scanner,
        ..
    } = spawn_keygate("stdout", "audit:\n  path: \"-\"\n", Stdio::piped()).await;
    let reply = support::client::get(
        &process.url(RESTRICTED),
        &[("Authorization", &scanner.basic())],
    )
    .await;
    assert_eq!(reply.status, 200);
    let mut stdout = process.child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut text).unwrap();
        text
    });
    process.signal("TERM");
    let code = tokio::task::spawn_blocking(move || process.wait(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "SIGTERM ends keygate with 0");
    let text = reader.join().unwrap();
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
    let file = dir.path().join("captured.jsonl");
    std::fs::write(&file, &text).unwrap();
    assert!(keygate::audit::verify::verify(&[file]).is_ok());
}
