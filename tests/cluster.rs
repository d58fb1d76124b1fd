//! Cluster mode against a real PostgreSQL server (a throw-away cluster per
//! test): several `keygate run` processes share keys and one audit chain.
//! Where PostgreSQL is not installed these tests say so loudly and pass;
//! CI installs it and sets KEYGATE_REQUIRE_POSTGRES=1, which makes a missing
//! server a failure.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use keygate::dev::confluence_standin::{Standin, StandinState};
use support::postgres::Postgres;
use support::process::{cli, Process};
use support::{basic, Setup, ADMIN_EMAIL, ADMIN_TOKEN, OPS_TOKEN};

const RESTRICTED: &str = "/wiki/api/v2/pages/2001";
const NORMAL: &str = "/wiki/api/v2/spaces";

/// A database, a stand-in, and the configs of the replicas in front of it.
struct Cluster {
    pg: Postgres,
    database: String,
    state: Arc<StandinState>,
    standin: Standin,
    dir: tempfile::TempDir,
}

/// A key made with `keygate keys create`.
struct Key {
    id: String,
    client_id: String,
    secret: String,
}

impl Key {
    fn basic(&self) -> String {
        basic(&self.client_id, &self.secret)
    }
}

impl Cluster {
    async fn start(test: &str) -> Option<Cluster> {
        let pg = Postgres::start(test)?;
        let database = "keygate".to_owned();
        pg.create_database(&database);
        let state = Arc::new(StandinState::new(ADMIN_EMAIL, ADMIN_TOKEN));
        let standin = Standin::start_with(Arc::clone(&state)).await.unwrap();
        Some(Cluster {
            pg,
            database,
            state,
            standin,
            dir: support::temp_dir("cluster"),
        })
    }

    /// Writes replica `name`'s config; returns its path.
    fn config(&self, name: &str) -> PathBuf {
        self.config_with(name, "", "")
    }

    /// Replica `name`'s config with an `admin_key:` section and extra lines
    /// of the `confluence:` section.
    fn config_with(&self, name: &str, admin_key: &str, confluence_extra: &str) -> PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let setup = Setup {
            admin_key: admin_key.into(),
            confluence_extra: confluence_extra.into(),
            clients: String::new(),
            audit: "audit:\n  write_timeout: 1s\n".into(),
            admin_token: Some(OPS_TOKEN.into()),
            extra: format!(
                "limits:\n  per_client_rps: 0\nstate:\n  replica: {name}\n  postgres:\n    url: {}\n    statement_timeout: 2s\n",
                self.pg.url(&self.database)
            ),
            ..Setup::default()
        };
        let file = dir.join("keygate.yaml");
        std::fs::write(&file, setup.yaml(&self.standin.base_url())).unwrap();
        file
    }

    async fn replica(&self, name: &str) -> Process {
        self.replica_with(name, "", "").await
    }

    async fn replica_with(&self, name: &str, admin_key: &str, confluence_extra: &str) -> Process {
        let config = self.config_with(name, admin_key, confluence_extra);
        tokio::task::spawn_blocking(move || Process::spawn(&config, Stdio::null(), &[]))
            .await
            .unwrap()
    }

    fn posts(&self) -> Vec<keygate::dev::confluence_standin::KeyCall> {
        self.key_calls(&http::Method::POST)
    }

    fn key_calls(&self, method: &http::Method) -> Vec<keygate::dev::confluence_standin::KeyCall> {
        self.state
            .key_calls()
            .into_iter()
            .filter(|c| c.method == *method)
            .collect()
    }

    fn create_key(&self, config: &std::path::Path, name: &str, role: &str) -> Key {
        let out = cli(
            &[
                "keys",
                "create",
                "--config",
                config.to_str().unwrap(),
                "--name",
                name,
                "--role",
                role,
                "--json",
            ],
            None,
            &[],
        );
        assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        Key {
            id: v["id"].as_str().unwrap().to_owned(),
            client_id: v["client_id"].as_str().unwrap().to_owned(),
            secret: v["client_secret"].as_str().unwrap().to_owned(),
        }
    }

    fn sql(&self, query: &str) -> Vec<String> {
        self.pg.query(&self.database, query)
    }

    /// The request ids of bypass requests that reached the stand-in.
    fn bypasses_received(&self) -> HashSet<String> {
        self.state
            .requests()
            .iter()
            .filter(|r| {
                r.path() == RESTRICTED
                    && r.header_values("atl-confluence-with-admin-key") == ["true"]
            })
            .flat_map(|r| r.header_values("x-request-id"))
            .collect()
    }

    /// The request ids with a committed `start` record.
    fn started(&self) -> HashSet<String> {
        self.sql("SELECT line FROM keygate_audit WHERE event = 'request'")
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["phase"] == "start")
            .map(|r| r["request_id"].as_str().unwrap().to_owned())
            .collect()
    }

    fn assert_every_bypass_has_a_start_record(&self) {
        let reached = self.bypasses_received();
        assert!(!reached.is_empty(), "bypass requests reached the stand-in");
        let started = self.started();
        let missing: Vec<_> = reached.difference(&started).collect();
        assert!(
            missing.is_empty(),
            "{} bypass requests reached Confluence without a committed start record: {missing:?}",
            missing.len()
        );
    }

    /// `keygate audit verify --postgres` passes; the trail's seq is 1..=n
    /// without a gap. Returns n.
    fn assert_one_gap_free_chain(&self, config: &std::path::Path) -> u64 {
        let verify = cli(
            &[
                "audit",
                "verify",
                "--postgres",
                "--config",
                config.to_str().unwrap(),
            ],
            None,
            &[],
        );
        assert_eq!(verify.code, 0, "{}{}", verify.stdout, verify.stderr);
        assert!(verify.stdout.starts_with("ok: "), "{}", verify.stdout);
        let row = self.sql("SELECT count(*), min(seq), max(seq) FROM keygate_audit");
        let parts: Vec<u64> = row[0].split('|').map(|p| p.parse().unwrap()).collect();
        assert_eq!(parts[1], 1, "the chain starts at 1");
        assert_eq!(parts[0], parts[2], "seq has no gap: {row:?}");
        parts[0]
    }
}

fn term(mut process: Process) {
    process.signal("TERM");
    assert_eq!(
        process.wait(Duration::from_secs(30)),
        Some(0),
        "{}",
        process.log_text()
    );
}

/// Sends `total` GETs of `path` over `clients` connections spread across
/// `urls`; returns the statuses seen and how often.
async fn load(
    urls: &[String],
    path: &str,
    auth: &str,
    total: usize,
    clients: usize,
) -> HashMap<u16, usize> {
    let sent = Arc::new(AtomicUsize::new(0));
    let http = support::load::http();
    let results = support::load::concurrently(clients, |i| {
        let url = format!("{}{path}", urls[i % urls.len()]);
        let (sent, auth, http) = (Arc::clone(&sent), auth.to_owned(), http.clone());
        async move {
            let mut seen: HashMap<u16, usize> = HashMap::new();
            while sent.fetch_add(1, Ordering::Relaxed) < total {
                let status = support::load::get_status(&http, &url, &auth)
                    .await
                    .expect("request failed");
                *seen.entry(status).or_default() += 1;
            }
            seen
        }
    })
    .await;
    let mut all = HashMap::new();
    for seen in results {
        for (status, n) in seen {
            *all.entry(status).or_default() += n;
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_write_one_gap_free_chain() {
    let Some(cluster) = Cluster::start("three_replicas_write_one_gap_free_chain").await else {
        return;
    };
    let config = cluster.config("r1");
    let scanner = cluster.create_key(&config, "scanner", "compliance-scanner");
    let replicas = vec![
        cluster.replica("r1").await,
        cluster.replica("r2").await,
        cluster.replica("r3").await,
    ];
    let urls: Vec<String> = replicas.iter().map(|p| p.url("")).collect();
    let auth = scanner.basic();
    let (bypass, normal) = tokio::join!(
        load(&urls, RESTRICTED, &auth, 600, 24),
        load(&urls, NORMAL, &auth, 150, 6),
    );
    assert_eq!(bypass, HashMap::from([(200, 600)]));
    assert_eq!(normal, HashMap::from([(200, 150)]));
    for p in replicas {
        term(p);
    }

    let records = cluster.assert_one_gap_free_chain(&config);
    cluster.assert_every_bypass_has_a_start_record();
    // Every replica wrote into the one chain, and each record names its writer.
    let by_replica = cluster.sql(
        "SELECT replica, count(*) FROM keygate_audit WHERE event = 'request' GROUP BY replica ORDER BY replica",
    );
    let names: Vec<&str> = by_replica
        .iter()
        .map(|r| r.split('|').next().unwrap())
        .collect();
    assert_eq!(names, ["r1", "r2", "r3"], "{by_replica:?}");
    let lines = cluster.sql("SELECT line FROM keygate_audit ORDER BY seq");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["replica"].is_string(), "{line}");
    }
    // The CLI's key creation is on record too.
    assert!(lines
        .iter()
        .any(|l| l.contains("\"event\":\"key_management\"")
            && l.contains("keygate keys (command line)")));

    // The export is the chain, byte for byte, and the file verifier accepts it.
    let exported = cluster.dir.path().join("export.jsonl");
    let out = cli(
        &[
            "audit",
            "export",
            "--config",
            config.to_str().unwrap(),
            "--out",
            exported.to_str().unwrap(),
        ],
        None,
        &[],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let text = std::fs::read_to_string(&exported).unwrap();
    assert_eq!(
        text,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>()
    );
    let report = keygate::audit::verify::verify(&[exported]).unwrap();
    assert_eq!(report.records, records);

    // Search answers "which bypass requests did this client make".
    let out = cli(
        &[
            "audit",
            "search",
            "--config",
            config.to_str().unwrap(),
            "--client",
            &scanner.client_id,
            "--bypass",
            "--event",
            "request",
            "--limit",
            "100000",
            "--json",
        ],
        None,
        &[],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let found: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // A start and an end record per bypass request.
    assert_eq!(found.len(), 1200, "{}", out.stderr);
    assert!(found
        .iter()
        .all(|r| r["admin_key"] == true && r["client_id"] == scanner.client_id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_through_one_replica_is_refused_by_the_others() {
    let Some(cluster) = Cluster::start("a_key_revoked_through_one_replica").await else {
        return;
    };
    let config = cluster.config("r1");
    let key = cluster.create_key(&config, "tool", "reader");
    let (r1, r2) = (cluster.replica("r1").await, cluster.replica("r2").await);
    let on_r2 = |k: &Key| {
        let (url, auth) = (r2.url(NORMAL), k.basic());
        async move {
            support::client::get(&url, &[("Authorization", &auth)])
                .await
                .status
        }
    };
    assert_eq!(on_r2(&key).await, 200);

    // The key API works in cluster mode: revoke on r1...
    let bearer = format!("Bearer {OPS_TOKEN}");
    let revoked = support::client::send(
        "PUT",
        &r1.ops_url(&format!("/api/api_accesses/{}", key.id)),
        &[
            ("Authorization", &bearer),
            ("Content-Type", "application/json"),
        ],
        Bytes::from_static(br#"{"is_valid": false}"#),
    )
    .await;
    assert_eq!(revoked.status, 200, "{}", revoked.text());
    let at = Instant::now();
    // ...and r2 refuses it within the stated bound (one poll, one reload).
    while on_r2(&key).await != 401 {
        assert!(
            at.elapsed() < Duration::from_secs(10),
            "r2 still accepts the revoked key after {:?}",
            at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("revocation reached the other replica in {:?}", at.elapsed());

    // A key made through r2's API works on r1.
    let created = support::client::send(
        "POST",
        &r2.ops_url("/api/api_accesses"),
        &[
            ("Authorization", &bearer),
            ("Content-Type", "application/json"),
        ],
        Bytes::from_static(br#"{"data":[{"name":"later","roles":["reader"]}]}"#),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let item = &created.json()["data"][0];
    let later = Key {
        id: item["id"].as_str().unwrap().to_owned(),
        client_id: item["client_id"].as_str().unwrap().to_owned(),
        secret: item["client_secret"].as_str().unwrap().to_owned(),
    };
    let at = Instant::now();
    loop {
        let reply =
            support::client::get(&r1.url(NORMAL), &[("Authorization", &later.basic())]).await;
        if reply.status == 200 {
            break;
        }
        assert!(
            at.elapsed() < Duration::from_secs(10),
            "r1 never accepted the new key"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    term(r1);
    term(r2);
    let changes = cluster
        .sql("SELECT replica, line FROM keygate_audit WHERE event = 'key_management' ORDER BY seq");
    assert_eq!(changes.len(), 3, "{changes:?}");
    assert!(changes[1].starts_with("r1|") && changes[1].contains("\"action\":\"revoke\""));
    assert!(changes[2].starts_with("r2|") && changes[2].contains("\"action\":\"create\""));
    cluster.assert_one_gap_free_chain(&config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_fails_bypass_closed_and_recovers() {
    let Some(mut cluster) = Cluster::start("database_down_fails_bypass_closed").await else {
        return;
    };
    let config = cluster.config("r1");
    let scanner = cluster.create_key(&config, "scanner", "compliance-scanner");
    let r1 = cluster.replica("r1").await;
    let urls = vec![r1.url("")];
    let auth = scanner.basic();
    assert_eq!(
        load(&urls, RESTRICTED, &auth, 50, 4).await,
        HashMap::from([(200, 50)])
    );

    // Load runs while the database goes away.
    let stop = Arc::new(AtomicBool::new(false));
    let background = {
        let (urls, auth, stop) = (urls.clone(), auth.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut seen = HashMap::new();
            while !stop.load(Ordering::Relaxed) {
                for (status, n) in load(&urls, RESTRICTED, &auth, 20, 4).await {
                    *seen.entry(status).or_insert(0) += n;
                }
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.pg.stop();

    // Bypass fails closed with 503 audit_unavailable; passthrough goes on.
    let at = Instant::now();
    loop {
        let reply = support::client::get(&r1.url(RESTRICTED), &[("Authorization", &auth)]).await;
        if reply.status == 503 {
            assert_eq!(reply.json()["error"], "audit_unavailable");
            break;
        }
        assert!(
            at.elapsed() < Duration::from_secs(15),
            "bypass still {}",
            reply.status
        );
    }
    let normal = support::client::get(&r1.url(NORMAL), &[("Authorization", &auth)]).await;
    assert_eq!(
        normal.status, 200,
        "passthrough goes on without the database"
    );
    let ready = support::client::get(&r1.ops_url("/readyz"), &[]).await;
    assert_eq!(ready.status, 503);
    assert!(ready.text().contains("audit"), "{}", ready.text());

    // Back on its own once the database is.
    cluster.pg.resume();
    let at = Instant::now();
    loop {
        let reply = support::client::get(&r1.url(RESTRICTED), &[("Authorization", &auth)]).await;
        if reply.status == 200 {
            break;
        }
        assert!(
            at.elapsed() < Duration::from_secs(30),
            "bypass did not recover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let seen = background.await.unwrap();
    assert!(seen.keys().all(|s| *s == 200 || *s == 503), "{seen:?}");
    let at = Instant::now();
    while support::client::get(&r1.ops_url("/readyz"), &[])
        .await
        .status
        != 200
    {
        assert!(at.elapsed() < Duration::from_secs(10), "never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    term(r1);
    cluster.assert_every_bypass_has_a_start_record();
    cluster.assert_one_gap_free_chain(&config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_replica_leaves_a_start_record_for_every_bypass_that_left() {
    let Some(cluster) = Cluster::start("sigkill_of_a_replica").await else {
        return;
    };
    let config = cluster.config("r1");
    let scanner = cluster.create_key(&config, "scanner", "compliance-scanner");
    let (mut r1, r2) = (cluster.replica("r1").await, cluster.replica("r2").await);
    let victim = r1.url("");
    let survivor = vec![r2.url("")];
    let auth = scanner.basic();
    let done = Arc::new(AtomicUsize::new(0));
    let on_victim = {
        let (auth, done) = (auth.clone(), Arc::clone(&done));
        let http = support::load::http();
        support::load::concurrently(16, move |_| {
            let (url, auth, done, http) = (
                format!("{victim}{RESTRICTED}"),
                auth.clone(),
                Arc::clone(&done),
                http.clone(),
            );
            async move {
                while support::load::get_status(&http, &url, &auth)
                    .await
                    .is_some()
                {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let killer = async {
        while done.load(Ordering::Relaxed) < 300 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        r1.signal("KILL");
        let _ = r1.child.wait();
    };
    let (_, _, on_survivor) = tokio::join!(
        on_victim,
        killer,
        load(&survivor, RESTRICTED, &auth, 400, 8)
    );
    assert_eq!(on_survivor, HashMap::from([(200, 400)]));
    term(r2);
    cluster.assert_every_bypass_has_a_start_record();
    cluster.assert_one_gap_free_chain(&config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_import_schema_commands_and_the_probe() {
    let Some(cluster) = Cluster::start("keys_import_schema_commands").await else {
        return;
    };
    let config = cluster.config("r1");
    let config_arg = config.to_str().unwrap();
    // Before any migration: status says what to do.
    let status = cli(&["db", "status", "--config", config_arg], None, &[]);
    assert_eq!(status.code, 1);
    assert!(
        status.stderr.contains("keygate db migrate"),
        "{}",
        status.stderr
    );
    let migrate = cli(&["db", "migrate", "--config", config_arg], None, &[]);
    assert_eq!(migrate.code, 0, "{}", migrate.stderr);
    assert!(
        migrate.stdout.contains("applied migration 1"),
        "{}",
        migrate.stdout
    );
    let again = cli(&["db", "migrate", "--config", config_arg], None, &[]);
    assert!(
        again.stdout.contains("the schema is current"),
        "{}",
        again.stdout
    );

    // A keys file moves in whole, once.
    let file = cluster.dir.path().join("keys.yaml");
    let demo = keygate::dev::write_demo_keys(&file).unwrap();
    let import = cli(
        &[
            "keys",
            "import",
            file.to_str().unwrap(),
            "--config",
            config_arg,
        ],
        None,
        &[],
    );
    assert_eq!(import.code, 0, "{}", import.stderr);
    assert!(
        import.stdout.contains("imported 2 key(s)"),
        "{}",
        import.stdout
    );
    let twice = cli(
        &[
            "keys",
            "import",
            file.to_str().unwrap(),
            "--config",
            config_arg,
        ],
        None,
        &[],
    );
    assert_eq!(twice.code, 1);
    assert!(
        twice.stderr.contains("already in the database"),
        "{}",
        twice.stderr
    );
    let list = cli(
        &["keys", "list", "--config", config_arg, "--json"],
        None,
        &[],
    );
    let listed: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);

    // The imported keys authenticate on a replica.
    let r1 = cluster.replica("r1").await;
    let reply = support::client::get(
        &r1.url(RESTRICTED),
        &[("Authorization", &basic(&demo[0].client_id, &demo[0].secret))],
    )
    .await;
    assert_eq!(reply.status, 200, "{}\n{}", reply.text(), r1.log_text());
    term(r1);

    let probe = cli(&["check", "--probe", "--config", config_arg], None, &[]);
    assert!(
        probe
            .stdout
            .contains("database: reachable, schema version 2 (current), 2 key(s)"),
        "{}{}",
        probe.stdout,
        probe.stderr
    );
    // A schema from a newer keygate is refused, never altered.
    cluster.sql("INSERT INTO keygate_schema (version, description) VALUES (99, 'future')");
    let refused = cli(&["keys", "list", "--config", config_arg], None, &[]);
    assert_eq!(refused.code, 1);
    assert!(
        refused.stderr.contains("upgrade keygate"),
        "{}",
        refused.stderr
    );
}

// One admin-key window for the cluster.

/// A cluster with a key (`name`, `role`) and three replicas with `admin_key`
/// and a 2 s request timeout (so the call lease lasts 2 × 2 s + 5 s = 9 s);
/// also their URLs. `None` where PostgreSQL is missing.
async fn three(
    test: &str,
    admin_key: &str,
    (name, role): (&str, &str),
) -> Option<(Cluster, Key, Vec<Process>, Vec<String>)> {
    let cluster = Cluster::start(test).await?;
    let key = cluster.create_key(&cluster.config("r1"), name, role);
    let mut replicas = Vec::new();
    for name in ["r1", "r2", "r3"] {
        replicas.push(
            cluster
                .replica_with(name, admin_key, "  request_timeout: 2s\n")
                .await,
        );
    }
    let urls = replicas.iter().map(|p| p.url("")).collect();
    Some((cluster, key, replicas, urls))
}

const SCANNER: (&str, &str) = ("scanner", "compliance-scanner");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_first_bypass_requests_over_three_replicas_make_one_post() {
    let Some((cluster, scanner, replicas, urls)) =
        three("five_hundred_first_bypass_requests", "", SCANNER).await
    else {
        return;
    };
    let seen = load(&urls, RESTRICTED, &scanner.basic(), 500, 500).await;
    assert_eq!(seen, HashMap::from([(200, 500)]));
    assert_eq!(cluster.posts().len(), 1, "{:?}", cluster.state.key_calls());
    assert_eq!(cluster.key_calls(&http::Method::GET).len(), 1);
    for p in replicas {
        term(p);
    }
    // Which replica made the call is on record; the others adopted its key.
    let events = cluster
        .sql("SELECT replica, line FROM keygate_audit WHERE event = 'admin_key' ORDER BY seq");
    let enabled: Vec<_> = events
        .iter()
        .filter(|l| l.contains("\"action\":\"enabled\""))
        .collect();
    assert_eq!(enabled.len(), 1, "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_expiring_under_traffic_over_three_replicas_is_refreshed_once_per_window() {
    let admin_key = "admin_key:\n  refresh_before: 6s\n  idle_disable_after: never\n";
    let Some((cluster, scanner, replicas, urls)) =
        three("a_key_expiring_under_traffic", admin_key, SCANNER).await
    else {
        return;
    };
    // Keys live 14 s on the stand-in; refresh 6 s before: a window every 8 s
    // (a key is used until 5 s before its end: SAFETY_MARGIN).
    cluster
        .state
        .set_key_lifetime(Some(Duration::from_secs(14)));
    let started = Instant::now();
    let mut seen = HashMap::new();
    while started.elapsed() < Duration::from_secs(20) {
        for (status, n) in load(&urls, RESTRICTED, &scanner.basic(), 30, 6).await {
            *seen.entry(status).or_insert(0) += n;
        }
        assert!(cluster.state.admin_key_active(), "the key lapsed");
    }
    assert_eq!(seen.keys().collect::<Vec<_>>(), [&200], "{seen:?}");
    let posts = cluster.posts();
    let at: Vec<_> = posts.iter().map(|c| c.at).collect();
    for pair in at.windows(2) {
        let gap = pair[1].duration_since(pair[0]).unwrap();
        assert!(
            gap >= Duration::from_secs(6),
            "two POSTs in one window ({gap:?} apart): {posts:?}"
        );
    }
    // 20 s of traffic: the first POST and one refresh per 8 s window.
    assert!((2..=4).contains(&posts.len()), "{posts:?}");
    for p in replicas {
        term(p);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_disable_waits_for_the_last_replica_with_bypass_traffic() {
    let Some((cluster, scanner, replicas, urls)) = three(
        "idle_disable_waits_for_the_last",
        "admin_key:\n  idle_disable_after: 2s\n",
        SCANNER,
    )
    .await
    else {
        return;
    };
    let auth = scanner.basic();
    assert_eq!(
        load(&urls, RESTRICTED, &auth, 30, 3).await,
        HashMap::from([(200, 30)])
    );
    // Traffic goes on through r3 only, for twice idle_disable_after.
    let third = vec![urls[2].clone()];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        assert_eq!(
            load(&third, RESTRICTED, &auth, 5, 1).await,
            HashMap::from([(200, 5)])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deletes = || cluster.key_calls(&http::Method::DELETE).len();
    assert_eq!(deletes(), 0, "the key was disabled under r3's traffic");
    assert!(cluster.state.admin_key_active());
    // Traffic stops everywhere: one DELETE, after idle_disable_after.
    let stopped = Instant::now();
    while deletes() == 0 {
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "never disabled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = stopped.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "disabled too early: {took:?}"
    );
    // Another idle period passes: still exactly one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(deletes(), 1, "{:?}", cluster.state.key_calls());
    assert!(!cluster.state.admin_key_active());
    for p in replicas {
        term(p);
    }
    eprintln!("disabled {took:?} after the last bypass request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_while_calling_is_taken_over_when_its_lease_ends() {
    let Some((cluster, scanner, mut replicas, _urls)) =
        three("a_replica_killed_while_calling", "", SCANNER).await
    else {
        return;
    };
    // r1's POST hangs; r1 dies while it waits.
    cluster.state.inject(
        keygate::dev::confluence_standin::Fault::slow(Duration::from_secs(60))
            .only(http::Method::POST),
        1,
    );
    let auth = scanner.basic();
    let first = {
        let (url, auth) = (replicas[0].url(RESTRICTED), auth.clone());
        tokio::spawn(async move { support::client::get(&url, &[("Authorization", &auth)]).await })
    };
    let at = Instant::now();
    while !cluster
        .state
        .requests()
        .iter()
        .any(|r| r.method == http::Method::POST && r.path() == "/wiki/api/v2/admin-key")
    {
        assert!(at.elapsed() < Duration::from_secs(10), "r1 never called");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    replicas[0].signal("KILL");
    let _ = replicas[0].child.wait();
    let _ = first.await;
    let killed = Instant::now();
    // r2 answers 503 while the dead replica's lease runs, then takes over.
    loop {
        let reply =
            support::client::get(&replicas[1].url(RESTRICTED), &[("Authorization", &auth)]).await;
        if reply.status == 200 {
            break;
        }
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "no takeover after {:?}",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = killed.elapsed();
    eprintln!("took over {took:?} after the kill (lease: 9 s)");
    assert!(took <= Duration::from_secs(12), "{took:?}");
    for p in replicas.drain(1..) {
        term(p);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_seen_by_one_replica_holds_them_all() {
    let Some((cluster, reader, replicas, urls)) =
        three("a_retry_after_seen_by_one", "", ("reader", "reader")).await
    else {
        return;
    };
    let auth = reader.basic();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (urls, auth, stop) = (urls.clone(), auth.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                load(&urls, NORMAL, &auth, 30, 6).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let limited = support::client::get(
        &replicas[1].url("/wiki/rate-limited?after=5"),
        &[("Authorization", &auth)],
    )
    .await;
    assert_eq!(limited.status, 429);
    tokio::time::sleep(Duration::from_secs(7)).await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    let requests = cluster.state.requests();
    let t0 = requests
        .iter()
        .find(|r| r.path() == "/wiki/rate-limited")
        .unwrap()
        .received;
    // Within SHARE_EVERY (250 ms) plus requests already under way, every
    // replica holds; nothing reaches Confluence until the 5 s are over.
    let during: Vec<_> = requests
        .iter()
        .filter(|r| r.received > t0 + Duration::from_millis(700))
        .filter(|r| r.received < t0 + Duration::from_millis(4900))
        .map(|r| r.target.clone())
        .collect();
    assert!(
        during.is_empty(),
        "{} requests reached Confluence during the hold: {during:?}",
        during.len()
    );
    let late = requests
        .iter()
        .filter(|r| r.received > t0 + Duration::from_millis(700))
        .count();
    let early = requests
        .iter()
        .filter(|r| r.received <= t0 && r.path() == NORMAL)
        .count();
    assert!(
        early > 0 && late > 0,
        "traffic flowed before and after the hold"
    );
    for p in replicas {
        term(p);
    }
}
