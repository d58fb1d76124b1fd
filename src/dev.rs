//! `keygate dev`: the whole thing on loopback with no set-up — the Confluence
//! stand-in, keygate in front of it with example routes and two demo keys, and
//! ready-to-paste curl commands.

pub mod confluence_standin;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::client_keys::{self, KeyEntry, KeysFile};
use confluence_standin::Standin;

/// A demo key created for this run.
pub struct DemoKey {
    pub name: &'static str,
    pub role: &'static str,
    pub client_id: String,
    pub secret: String,
}

/// The example routes `keygate dev` runs with, as YAML.
pub const DEV_ROUTES: &str = r#"routes:
  - name: scan-restricted-pages
    methods: [GET]
    path: /wiki/api/v2/pages/{id}
    roles: [compliance-scanner]
    admin_key: true
  - name: scan-page-details
    methods: [GET]
    path: /wiki/api/v2/pages/{id}/**
    roles: [compliance-scanner]
    admin_key: true
  - name: read-anything-normally
    methods: [GET, HEAD]
    path: /wiki/**
    roles: ["*"]
    admin_key: false
"#;

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the Confluence stand-in: {0}")]
    Standin(std::io::Error),
    #[error("{0}")]
    Start(#[from] crate::app::StartError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigErrors),
    #[error("cannot hash the demo secret: {0}")]
    Hash(String),
}

fn write(path: &Path, text: &str) -> Result<(), DevError> {
    std::fs::write(path, text).map_err(|source| DevError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a keys file with the demo keys and returns them with their secrets.
pub fn write_demo_keys(path: &Path) -> Result<Vec<DemoKey>, DevError> {
    let specs = [("scanner", "compliance-scanner"), ("reader", "reader")];
    let mut file = KeysFile::default();
    let mut demo = Vec::new();
    for (i, (name, role)) in specs.into_iter().enumerate() {
        let client_id = client_keys::new_client_id(name);
        let secret = client_keys::new_secret(&client_id);
        let secret_hash =
            client_keys::hash_secret(&secret).map_err(|e| DevError::Hash(e.to_string()))?;
        file.keys.push(KeyEntry {
            id: (1001 + i).to_string(),
            client_id: client_id.clone(),
            name: name.to_owned(),
            secret_hash,
            roles: vec![role.to_owned()],
            expiration: None,
            is_valid: true,
            created: Some(crate::rfc3339::format_seconds(std::time::SystemTime::now())),
        });
        demo.push(DemoKey {
            name,
            role,
            client_id,
            secret,
        });
    }
    let text = serde_yaml::to_string(&file).map_err(|e| DevError::Hash(e.to_string()))?;
    write(path, &text)?;
    Ok(demo)
}

/// Runs `keygate dev` until Ctrl-C.
pub async fn run() -> Result<(), DevError> {
    let dir = std::env::temp_dir().join(format!("keygate-dev-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| DevError::Io {
        path: dir.clone(),
        source,
    })?;
    let admin_email = "admin@standin.example";
    let admin_token = client_keys::new_secret("standin_token");
    let standin = Standin::start(admin_email, &admin_token)
        .await
        .map_err(DevError::Standin)?;

    let keys = write_demo_keys(&dir.join("keys.yaml"))?;
    std::fs::write(dir.join("confluence-token"), &admin_token).map_err(|source| DevError::Io {
        path: dir.join("confluence-token"),
        source,
    })?;
    let config_path = dir.join("keygate.yaml");
    let config_text = format!(
        r#"# written by `keygate dev`; the stand-in plays Confluence
listen:
  address: 127.0.0.1:0
ops:
  address: 127.0.0.1:0
confluence:
  base_url: {base}
  allow_http: true
  email: {admin_email}
  api_token: ${{file:confluence-token}}
admin_key:
  duration: 60m
  refresh_before: 5m
  idle_disable_after: 15m
  disable_on_shutdown: true
clients:
  keys_file: keys.yaml
  verify_cache_ttl: 5m
{DEV_ROUTES}audit:
  path: audit.jsonl
  record_passthrough: true
"#,
        base = standin.base_url(),
    );
    write(&config_path, &config_text)?;
    let config = crate::config::load(&config_path)?;
    let app = crate::app::App::bind(config).await?;
    print!(
        "{}",
        banner(
            &standin,
            app.local_addr(),
            app.ops_addr(),
            &config_path,
            &keys
        )
    );
    app.run(crate::app::termination_signal()).await;
    Ok(())
}

fn banner(
    standin: &Standin,
    addr: std::net::SocketAddr,
    ops: Option<std::net::SocketAddr>,
    config: &Path,
    keys: &[DemoKey],
) -> String {
    let mut s = String::new();
    let url = format!("http://{addr}");
    let _ = writeln!(s, "keygate dev: everything on loopback; Ctrl-C stops it.\n");
    let _ = writeln!(
        s,
        "  Confluence stand-in  {}  (restricted pages: 1003, 2001)",
        standin.base_url()
    );
    let _ = writeln!(s, "  keygate              {url}");
    if let Some(ops) = ops {
        let _ = writeln!(
            s,
            "  ops                  http://{ops}  (/healthz, /readyz, /metrics)"
        );
    }
    let _ = writeln!(s, "  config               {}", config.display());
    let _ = writeln!(
        s,
        "\n  Demo API access keys, made for this run (the secrets are shown only here):"
    );
    for k in keys {
        let _ = writeln!(
            s,
            "    {:<8} role {:<19} client_id {}",
            k.name, k.role, k.client_id
        );
        let _ = writeln!(s, "    {:<8} {:<24} secret    {}", "", "", k.secret);
    }
    let scanner = &keys[0];
    let reader = &keys[1];
    let _ = writeln!(s, "\nTry:");
    let _ = writeln!(
        s,
        "  # a normal read on a passthrough route (no bypass header):"
    );
    let _ = writeln!(
        s,
        "  curl -s -u '{}:{}' {url}/wiki/api/v2/pages/1001",
        reader.client_id, reader.secret
    );
    let _ = writeln!(
        s,
        "  # a restricted page through the bypass route (scanner role):"
    );
    let _ = writeln!(
        s,
        "  curl -s -u '{}:{}' {url}/wiki/api/v2/pages/2001",
        scanner.client_id, scanner.secret
    );
    let _ = writeln!(
        s,
        "  # the same page for the reader, without the bypass: 404 as for anyone:"
    );
    let _ = writeln!(
        s,
        "  curl -s -u '{}:{}' {url}/wiki/api/v2/pages/2001",
        reader.client_id, reader.secret
    );
    let _ = writeln!(s, "  # a route no rule allows: 403, never forwarded:");
    let _ = writeln!(
        s,
        "  curl -s -X DELETE -u '{}:{}' {url}/wiki/api/v2/pages/1001",
        scanner.client_id, scanner.secret
    );
    let _ = writeln!(s, "  # Bearer works with generated secrets too:");
    let _ = writeln!(
        s,
        "  curl -s -H 'Authorization: Bearer {}' {url}/wiki/api/v2/spaces\n",
        reader.secret
    );
    s
}
