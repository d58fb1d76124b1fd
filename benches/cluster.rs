//! Bypass requests in cluster mode (the audit trail in PostgreSQL, group
//! commit per replica, one chain) beside the file trail, in one run: requests/s
//! and durable commits (or fsyncs) per request at 1, 32 and 256 clients, with
//! one replica and with three.
//!
//!   cargo bench --bench cluster          (REQUESTS=3000; needs PostgreSQL)
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Stdio;
use std::sync::Arc;

use keygate::dev::confluence_standin::{Standin, StandinState};
use support::load::{env_or, throughput};
use support::postgres::Postgres;
use support::process::{cli, Process};
use support::{basic, DemoKeyExt as _, Setup, ADMIN_EMAIL, ADMIN_TOKEN};

const RESTRICTED: &str = "/wiki/api/v2/pages/2001";
const ADMIN_KEY: &str = "admin_key:\n  idle_disable_after: never\n  disable_on_shutdown: false\n";

fn main() {
    support::load::block_on(run());
}

/// Durable commits (cluster) or fsyncs (file) so far, summed over replicas.
async fn durable_writes(replicas: &[Process]) -> f64 {
    let mut sum = 0.0;
    for p in replicas {
        let text = support::client::get(&p.ops_url("/metrics"), &[])
            .await
            .text();
        sum += text
            .lines()
            .find(|l| l.starts_with("keygate_audit_fsyncs_total"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    }
    sum
}

/// Requests/s over `replicas` (clients spread evenly) and durable writes per request.
async fn measure(replicas: &[Process], auth: &str, total: usize, clients: usize) -> (f64, f64) {
    let before = durable_writes(replicas).await;
    let started = std::time::Instant::now();
    let per = clients.div_ceil(replicas.len());
    let n = total / replicas.len();
    let runs: Vec<_> = replicas
        .iter()
        .map(|p| {
            let (url, auth) = (p.url(RESTRICTED), auth.to_owned());
            tokio::spawn(async move { throughput(&url, &auth, n - n % per, per).await })
        })
        .collect();
    for r in runs {
        r.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let sent = replicas.len() * (n - n % per);
    let writes = durable_writes(replicas).await - before;
    (sent as f64 / secs, writes / sent as f64)
}

async fn run() {
    let total = env_or("REQUESTS", 3000);
    let Some(pg) = Postgres::start("the cluster benchmark") else {
        return;
    };
    let url = pg.create_database("bench");
    let state = Arc::new(StandinState::new(ADMIN_EMAIL, ADMIN_TOKEN));
    let standin = Standin::start_with(state).await.unwrap();
    let dir = support::temp_dir("bench-cluster");

    // The file trail, one process.
    let file_dir = dir.path().join("file");
    std::fs::create_dir_all(&file_dir).unwrap();
    let file_setup = Setup {
        admin_key: ADMIN_KEY.into(),
        audit: "audit:\n  path: audit.jsonl\n  rotate_size: 1GiB\n".into(),
        ..Setup::default()
    };
    let (file_config, scanner, _) = file_setup.write(&file_dir, &standin.base_url());
    let file = vec![Process::spawn(&file_config, Stdio::null(), &[])];
    let file_auth = scanner.basic();

    // Cluster mode: three replicas on one database.
    let mut configs = Vec::new();
    for name in ["r1", "r2", "r3"] {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let setup = Setup {
            admin_key: ADMIN_KEY.into(),
            clients: String::new(),
            audit: String::new(),
            extra: format!(
                "limits:\n  per_client_rps: 0\nstate:\n  replica: {name}\n  postgres:\n    url: {url}\n"
            ),
            ..Setup::default()
        };
        let config = d.join("keygate.yaml");
        std::fs::write(&config, setup.yaml(&standin.base_url())).unwrap();
        configs.push(config);
    }
    let created = cli(
        &[
            "keys",
            "create",
            "--config",
            configs[0].to_str().unwrap(),
            "--name",
            "bench",
            "--role",
            "compliance-scanner",
            "--json",
        ],
        None,
        &[],
    );
    assert_eq!(created.code, 0, "{}", created.stderr);
    let key: serde_json::Value = serde_json::from_str(&created.stdout).unwrap();
    let cluster_auth = basic(
        key["client_id"].as_str().unwrap(),
        key["client_secret"].as_str().unwrap(),
    );
    let replicas: Vec<Process> = configs
        .iter()
        .map(|c| Process::spawn(c, Stdio::null(), &[]))
        .collect();

    // Warm up: keys verified and cached, admin key enabled, pools filled.
    for p in file.iter() {
        throughput(&p.url(RESTRICTED), &file_auth, 200, 8).await;
    }
    for p in &replicas {
        throughput(&p.url(RESTRICTED), &cluster_auth, 200, 8).await;
    }
    println!("cluster: bypass requests, {total} per run (1 client: {}); durable writes = fsyncs (file) or synchronous commits (database)", total / 10);
    println!(
        "{:>8} {:>22} {:>22} {:>22}",
        "clients", "file req/s (w/req)", "1 replica req/s (c/req)", "3 replicas req/s (c/req)"
    );
    for clients in [1usize, 32, 256] {
        let n = if clients == 1 { total / 10 } else { total };
        let (f, fw) = measure(&file, &file_auth, n, clients).await;
        let (one, ow) = measure(&replicas[..1], &cluster_auth, n, clients).await;
        let (three, tw) = measure(&replicas, &cluster_auth, n, clients.max(3)).await;
        println!(
            "{clients:>8} {:>14.0} ({fw:>5.2}) {:>14.0} ({ow:>5.2}) {:>14.0} ({tw:>5.2})",
            f, one, three
        );
    }
    let verify = cli(
        &[
            "audit",
            "verify",
            "--postgres",
            "--config",
            configs[0].to_str().unwrap(),
        ],
        None,
        &[],
    );
    println!("audit verify --postgres: {}", verify.stdout.trim());
    drop(replicas);
    drop(file);
    drop(standin);
}
