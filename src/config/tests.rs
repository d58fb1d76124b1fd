use super::*;

/// A minimal valid config; `{extra}` lines are replaced per case.
const BASE: &str = r#"listen:
  address: 127.0.0.1:8080
confluence:
  base_url: https://example.atlassian.net
  email: admin@example.com
  api_token: token
routes:
  - name: read
    methods: [GET]
    path: /wiki/**
    roles: ["*"]
"#;

fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("keygate-config-{tag}-"))
        .tempdir()
        .unwrap()
}

fn load_text(tag: &str, text: &str) -> Result<Config, ConfigErrors> {
    let tmp = temp_dir(tag);
    let dir = tmp.path();
    let file = dir.join("keygate.yaml");
    std::fs::write(&file, text).unwrap();
    let env = |_: &str| None;
    load_with(&file, &env).and_then(|c| c.secrets_with(&env).map(|_| c))
}

#[test]
fn minimal_config_gets_the_documented_defaults() {
    let c = load_text("minimal", BASE).unwrap();
    assert_eq!(c.admin_key.duration_minutes, 60);
    assert_eq!(c.admin_key.refresh_before, Duration::from_secs(300));
    assert_eq!(
        c.admin_key.idle_disable_after,
        Some(Duration::from_secs(900))
    );
    assert!(c.admin_key.disable_on_shutdown);
    assert_eq!(c.confluence.connect_timeout, Duration::from_secs(5));
    assert_eq!(c.confluence.request_timeout, Duration::from_secs(60));
    assert_eq!(c.clients.verify_cache_ttl, Duration::from_secs(300));
    assert!(c.clients.keys_file.ends_with("keys.yaml"));
    assert_eq!(c.limits.max_connections, 4096);
    assert_eq!(c.limits.per_client_rps, 50);
    assert_eq!(c.limits.max_header_bytes, 32 * 1024);
    assert!(c.ops.is_none());
    assert!(c.audit.is_none());
}

#[test]
fn example_config_is_valid() {
    let env = |name: &str| match name {
        "KEYGATE_ADMIN_TOKEN" => Some("an-admin-token-of-enough-length".to_owned()),
        "CONFLUENCE_API_TOKEN" => Some("confluence-token".to_owned()),
        _ => None,
    };
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/keygate.example.yaml");
    let c = load_with(&file, &env).unwrap_or_else(|e| panic!("{e}"));
    c.secrets_with(&env).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.routes.any_bypass());
    assert!(c.audit.is_some());
}

/// Each case: a replacement applied to BASE, the field the error must name, and a
/// fragment of the message.
#[test]
fn broken_configs_name_the_field() {
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "127.0.0.1:8080",
            "localhost",
            "listen.address",
            "expected IP:port",
        ),
        (
            "https://example",
            "http://example",
            "confluence.base_url",
            "https",
        ),
        (
            "https://example.atlassian.net",
            "https://example.atlassian.net/wiki",
            "confluence.base_url",
            "without a path",
        ),
        (
            "https://example.atlassian.net",
            "ftp://x",
            "confluence.base_url",
            "https",
        ),
        (
            "api_token: token",
            "api_token: \"\"",
            "confluence.api_token",
            "empty",
        ),
        (
            "api_token: token",
            "api_token: ${env:KEYGATE_TEST_SURELY_UNSET}",
            "confluence.api_token",
            "not set",
        ),
        (
            "api_token: token",
            "api_token: ${file:nope.txt}",
            "confluence.api_token",
            "cannot read",
        ),
        (
            "methods: [GET]",
            "methods: [GIT]",
            "routes[0].methods[0]",
            "expected one of",
        ),
        (
            "methods: [GET]",
            "methods: [get]",
            "routes[0].methods[0]",
            "expected one of",
        ),
        (
            "methods: [GET]",
            "methods: []",
            "routes[0].methods",
            "at least one",
        ),
        (
            "methods: [GET]",
            "methods: [GET, GET]",
            "routes[0].methods[1]",
            "twice",
        ),
        (
            "path: /wiki/**",
            "path: /wiki/**/x",
            "routes[0].path",
            "only as the last",
        ),
        (
            "path: /wiki/**",
            "path: wiki",
            "routes[0].path",
            "starting with `/`",
        ),
        (
            "path: /wiki/**",
            "path: /wiki/",
            "routes[0].path",
            "trailing",
        ),
        (
            "path: /wiki/**",
            "path: /wiki/../x",
            "routes[0].path",
            "segment",
        ),
        (
            "path: /wiki/**",
            "path: /wiki/{}",
            "routes[0].path",
            "{name}",
        ),
        (
            "roles: [\"*\"]",
            "roles: []",
            "routes[0].roles",
            "at least one role",
        ),
        (
            "roles: [\"*\"]",
            "roles: [\"\"]",
            "routes[0].roles[0]",
            "non-empty",
        ),
        (
            "    roles: [\"*\"]\n",
            "    roles: [\"*\"]\n    admin_key: true\n",
            "audit",
            "audit trail",
        ),
        ("name: read", "name: \"\"", "routes[0].name", "non-empty"),
    ];
    for (i, (from, to, field, fragment)) in cases.iter().enumerate() {
        assert!(BASE.contains(from), "case {i}: {from:?} not in BASE");
        let text = BASE.replacen(from, to, 1);
        let errors =
            load_text(&format!("broken{i}"), &text).expect_err(&format!("case {i} accepted: {to}"));
        let e = errors
            .0
            .iter()
            .find(|e| e.field == *field)
            .unwrap_or_else(|| panic!("case {i}: no error for {field}; got {errors}"));
        assert!(
            e.message.contains(fragment),
            "case {i}: message {:?} lacks {fragment:?}",
            e.message
        );
        assert!(
            e.to_string().contains("keygate.yaml"),
            "file not named: {e}"
        );
    }
}

#[test]
fn sections_with_later_behaviour_are_validated_too() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "admin_key:\n  duration: 90m\n",
            "admin_key.duration",
            "1m to 60m",
        ),
        (
            "admin_key:\n  duration: 90s\n",
            "admin_key.duration",
            "whole minutes",
        ),
        (
            "admin_key:\n  duration: 10m\n  refresh_before: 10m\n",
            "admin_key.refresh_before",
            "less than",
        ),
        (
            "admin_key:\n  refresh_before: 0s\n",
            "admin_key.refresh_before",
            "at least 1s",
        ),
        (
            "admin_key:\n  idle_disable_after: sometimes\n",
            "admin_key.idle_disable_after",
            "never",
        ),
        (
            "clients:\n  verify_cache_ttl: 5 minutes\n",
            "clients.verify_cache_ttl",
            "duration",
        ),
        (
            "audit:\n  path: a.jsonl\n  rotate_size: 1TB\n",
            "audit.rotate_size",
            "size",
        ),
        (
            "audit:\n  path: a.jsonl\n  rotate_size: 1KiB\n",
            "audit.rotate_size",
            "at least",
        ),
        (
            "limits:\n  max_header_bytes: 1KiB\n",
            "limits.max_header_bytes",
            "8KiB",
        ),
        (
            "limits:\n  max_connections: 0\n",
            "limits.max_connections",
            "at least 1",
        ),
        (
            "limits:\n  header_read_timeout: 0s\n",
            "limits.header_read_timeout",
            "above zero",
        ),
        (
            "ops:\n  address: 127.0.0.1:9090\n  admin_token: short\n",
            "ops.admin_token",
            "16",
        ),
        ("listen2: {}\n", "", "unknown field `listen2`"),
        (
            "limits:\n  max_conections: 5\n",
            "",
            "unknown field `max_conections`",
        ),
    ];
    for (i, (extra, field, fragment)) in cases.iter().enumerate() {
        let text = format!("{BASE}{extra}");
        let errors =
            load_text(&format!("later{i}"), &text).expect_err(&format!("case {i} accepted"));
        let found = errors
            .0
            .iter()
            .any(|e| e.field == *field && e.message.contains(fragment));
        assert!(
            found,
            "case {i}: want {field:?} with {fragment:?}, got {errors}"
        );
    }
}

#[test]
fn yaml_errors_carry_line_and_column() {
    let text = BASE.replace(
        "    roles: [\"*\"]",
        "    roles: [\"*\"]\n    admin_keys: true",
    );
    let errors = load_text("yamlpos", &text).unwrap_err();
    let e = &errors.0[0];
    assert_eq!(e.location.map(|l| l.0), Some(12), "{e}");
    assert!(e.message.contains("unknown field `admin_keys`"), "{e}");
    assert!(e.to_string().contains("keygate.yaml:12:"), "{e}");
}

#[test]
fn all_errors_are_collected_at_once() {
    let text = BASE
        .replace("127.0.0.1:8080", "nowhere")
        .replace("methods: [GET]", "methods: [FETCH]");
    let errors = load_text("many", &text).unwrap_err();
    assert!(errors.0.len() >= 2, "{errors}");
}

#[test]
fn interpolation_reads_env_and_files_relative_to_the_config() {
    let tmp = temp_dir("interp");
    let dir = tmp.path();
    std::fs::write(dir.join("token.txt"), "from-file\n").unwrap();
    let env = |name: &str| (name == "KEYGATE_TEST_EMAIL").then(|| "env@example.com".to_owned());
    let text = BASE
        .replace("api_token: token", "api_token: ${file:token.txt}")
        .replace("admin@example.com", "${env:KEYGATE_TEST_EMAIL}");
    let file = dir.join("keygate.yaml");
    std::fs::write(&file, text).unwrap();
    let c = load_with(&file, &env).unwrap();
    let secrets = c.secrets_with(&env).unwrap();
    assert_eq!(secrets.api_token.expose(), "from-file");
    assert_eq!(c.confluence.email, "env@example.com");
    assert!(
        !format!("{:?}", c.confluence).contains("from-file"),
        "secret in Debug"
    );
}
