//! Requests/s through keygate with a cached key (argon2 once, then the verification
//! cache) against a fixed credential compared directly (no hashing, no cache). Same
//! process, same route, interleaved rounds (A B B A …) to cancel drift. The cache
//! must keep the difference under 5 %.
//!
//!   cargo bench --bench auth_cache        (ROUNDS=6 REQUESTS=20000 CONCURRENCY=32)
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use support::load::{env_or, median, throughput};
use support::{DemoKeyExt as _, Harness, Setup};

use keygate::client_keys::KeyStore;

const ROUTES: &str =
    "routes:\n  - name: read\n    methods: [GET]\n    path: /wiki/**\n    roles: [\"*\"]\n";

fn main() {
    support::load::block_on(run());
}

async fn run() {
    let rounds = env_or("ROUNDS", 6);
    let total = env_or("REQUESTS", 20_000);
    let concurrency = env_or("CONCURRENCY", 32);
    let b = Harness::start_with(Setup {
        routes: ROUTES.into(),
        audit: String::new(),
        ..Setup::default()
    })
    .await;
    let url = format!("http://{}/wiki/api/v2/pages/1001", b.addr);
    let auth = b.reader.basic();
    let runs_before = b.control.argon2_runs();
    let (mut cached, mut fixed) = (Vec::new(), Vec::new());
    println!("auth_cache: {total} requests per run, {concurrency} connections, {rounds} rounds");
    for round in 0..rounds {
        let order: [bool; 2] = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for use_cache in order {
            if use_cache {
                // A fresh generation: empty cache, argon2 once in the warm-up.
                b.control.reload("bench").await.unwrap();
            } else {
                b.control.set_key_store(KeyStore::fixed_credential(
                    &b.reader.client_id,
                    &b.reader.secret,
                    vec![b.reader.role.to_owned()],
                ));
            }
            throughput(&url, &auth, 500, concurrency).await;
            let rps = throughput(&url, &auth, total, concurrency).await;
            let name = if use_cache {
                "cached key"
            } else {
                "fixed credential"
            };
            println!("  round {round}  {name:<17} {rps:>9.0} req/s");
            if use_cache {
                cached.push(rps)
            } else {
                fixed.push(rps)
            }
        }
    }
    let (c, f) = (median(&mut cached), median(&mut fixed));
    let diff = (f - c) / f * 100.0;
    println!("median: cached key {c:.0} req/s, fixed credential {f:.0} req/s");
    println!(
        "difference: {diff:+.2} % (target: under 5 %) -> {}",
        if diff.abs() < 5.0 { "PASS" } else { "FAIL" }
    );
    println!(
        "argon2 verifications: {} (one per cached round)",
        b.control.argon2_runs() - runs_before
    );
}
