//! Bypass requests (durable write-ahead audit record, group commit) against
//! passthrough requests (no write-ahead) in the same run, at 1, 32 and 256
//! concurrent clients, with fsyncs per bypass request.
//!
//!   cargo bench --bench audit          (REQUESTS=4000, ROUNDS=2)
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use support::load::{env_or, median, throughput};
use support::{DemoKeyExt as _, Harness, Setup};

const ROUTES: &str = r#"routes:
  - name: bypass
    methods: [GET]
    path: /wiki/api/v2/pages/{id}
    roles: [compliance-scanner]
    admin_key: true
  - name: passthrough
    methods: [GET]
    path: /wiki/**
    roles: ["*"]
"#;

fn main() {
    support::load::block_on(run());
}

async fn run() {
    let total = env_or("REQUESTS", 4000);
    let rounds = env_or("ROUNDS", 2);
    let b = Harness::start_with(Setup {
        routes: ROUTES.into(),
        audit: "audit:\n  path: audit.jsonl\n  rotate_size: 1GiB\n  record_passthrough: false\n"
            .into(),
        admin_key: "admin_key:\n  idle_disable_after: never\n  disable_on_shutdown: false\n".into(),
        ..Setup::default()
    })
    .await;
    let bypass_url = format!("http://{}/wiki/api/v2/pages/2001", b.addr);
    let plain_url = format!("http://{}/wiki/api/v2/spaces", b.addr);
    let scanner = b.scanner.basic();
    let metrics = b.control.metrics();
    throughput(&bypass_url, &scanner, 200, 8).await;
    println!(
        "audit: {total} requests per run (1 client: {} ), {rounds} rounds; same process, same key",
        total / 8
    );
    println!(
        "{:>8} {:>14} {:>14} {:>8} {:>16}",
        "clients", "bypass req/s", "plain req/s", "ratio", "fsyncs/bypass"
    );
    for clients in [1usize, 32, 256] {
        let n = if clients == 1 { total / 8 } else { total };
        let n = n - n % clients;
        let (mut bypass, mut plain, mut per_request) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let before = metrics.audit_fsyncs.get();
            bypass.push(throughput(&bypass_url, &scanner, n, clients).await);
            let fsyncs = metrics.audit_fsyncs.get() - before;
            per_request.push(fsyncs as f64 / n as f64);
            plain.push(throughput(&plain_url, &scanner, n, clients).await);
        }
        let (bp, pl, fs) = (
            median(&mut bypass),
            median(&mut plain),
            median(&mut per_request),
        );
        println!(
            "{clients:>8} {bp:>14.0} {pl:>14.0} {:>7.2}x {fs:>16.3}",
            bp / pl
        );
    }
    let trail = b.dir.join("audit.jsonl");
    let report = keygate::audit::verify::verify(&[trail]).unwrap();
    println!("trail: {report}");
}
