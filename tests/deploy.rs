//! The deployment material stays true to the code: the Kubernetes config is valid
//! and safe for several replicas, and the dashboard only queries metrics keygate
//! exports.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;

use serde::Deserialize as _;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn kubernetes_manifests_hold_every_object_and_a_valid_multi_replica_config() {
    let text = std::fs::read_to_string(root().join("deploy/kubernetes/keygate.yaml")).unwrap();
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for kind in [
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing");
    }
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() > 1);

    // The ConfigMap's config, with the mounted files stood in for, is valid.
    let config_map = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let yaml = config_map["data"]["keygate.yaml"].as_str().unwrap();
    let tmp = support::temp_dir("deploy");
    let dir = tmp.path();
    let (cert, key) = {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(dir.join("tls.crt"), c.cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), c.signing_key.serialize_pem()).unwrap();
        (dir.join("tls.crt"), dir.join("tls.key"))
    };
    std::fs::write(dir.join("confluence-api-token"), "token\n").unwrap();
    std::fs::write(dir.join("ops-admin-token"), "an-ops-admin-token\n").unwrap();
    std::fs::write(
        dir.join("postgres-url"),
        "postgres://keygate:pw@db.example:5432/keygate?sslmode=require\n",
    )
    .unwrap();
    let local = yaml
        .replace("/etc/keygate/tls/tls.crt", cert.to_str().unwrap())
        .replace("/etc/keygate/tls/tls.key", key.to_str().unwrap())
        .replace("/etc/keygate/secrets/", &format!("{}/", dir.display()));
    std::fs::write(dir.join("keygate.yaml"), local).unwrap();
    let config = keygate::config::load(&dir.join("keygate.yaml")).unwrap_or_else(|e| panic!("{e}"));
    config.secrets().unwrap_or_else(|e| panic!("{e}"));
    // Cluster mode: keys and trail in the database, the key API on, and one
    // admin-key window that replicas disable together when idle.
    let state = config.state.as_ref().unwrap();
    assert!(state.postgres.is_some());
    assert_eq!(
        config.admin_key.idle_disable_after,
        Some(std::time::Duration::from_secs(15 * 60))
    );
    assert!(config.admin_key.disable_on_shutdown);
    assert_eq!(
        config.audit.unwrap().sink,
        keygate::config::AuditSink::Database
    );
    assert!(
        config.ops.unwrap().admin_token.is_some(),
        "the key API is on"
    );
    assert!(config.listen.tls.is_some());
}

/// The manifests against the Kubernetes API schemas, offline, with
/// `kubernetes-validate` (PyPI); CI installs it (KEYGATE_REQUIRE_TOOLS=1).
#[test]
fn kubernetes_manifests_pass_the_schema_validator() {
    let file = root().join("deploy/kubernetes/keygate.yaml");
    let run = std::process::Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .arg(&file)
        .output();
    match run {
        Ok(out) => assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) if std::env::var("KEYGATE_REQUIRE_TOOLS").is_ok_and(|v| v == "1") => {
            panic!("KEYGATE_REQUIRE_TOOLS=1 but kubernetes-validate is not installed (pip install kubernetes-validate)")
        }
        Err(_) => eprintln!(
            "\n*** SKIPPED: kubernetes-validate is not installed (pip install kubernetes-validate) ***\n"
        ),
    }
}

#[test]
fn the_dashboard_queries_only_exported_metrics() {
    let text =
        std::fs::read_to_string(root().join("deploy/grafana/keygate-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let exported = keygate::metrics::FAMILIES;
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("keygate_"))
            {
                let base = name.trim_end_matches("_bucket");
                assert!(
                    exported.contains(&base),
                    "{name} in {:?} is not exported",
                    panel["title"]
                );
            }
        }
    }
}

#[test]
fn the_systemd_unit_runs_a_command_that_exists_and_reloads_with_sighup() {
    let unit = std::fs::read_to_string(root().join("deploy/systemd/keygate.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    let args: Vec<&str> = exec.split_whitespace().skip(1).collect();
    let mut help = args[..args.len() - 2].to_vec();
    help.push("--help");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(&help)
        .output()
        .unwrap()
        .status;
    assert!(status.success(), "{help:?}");
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    assert!(unit.contains("NoNewPrivileges=yes"));
}
