//! The one test kit, shared by the end-to-end tests and the benchmarks:
//! - `Setup`: one config template, and the knobs tests turn;
//! - `Harness`: the Confluence stand-in and keygate in-process, both on
//!   127.0.0.1:0;
//! - `process`: the `keygate` binary as users run it (`run` as a child process,
//!   and the other subcommands);
//! - `load`: concurrent clients whose panics fail the test;
//! - `check`: assertions used across areas (never forwarded, no secret);
//! - `client`: real HTTP clients (h1, h2c, raw sockets, raw HTTP/2 frames).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod check;
pub mod client;
pub mod load;
pub mod pki;
pub mod postgres;
pub mod process;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use keygate::dev::confluence_standin::{Recorded, Standin, StandinState};
use keygate::dev::DemoKey;
use keygate::{App, Control};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const ADMIN_EMAIL: &str = "admin@standin.example";
pub const ADMIN_TOKEN: &str = "standin-admin-api-token";
pub const OPS_TOKEN: &str = "ops-admin-token-for-tests";

/// What a test can change about the setup; `yaml` renders the one template.
#[derive(Clone)]
pub struct Setup {
    pub routes: String,
    /// Extra top-level YAML appended to the config; by default it turns the
    /// per-client rate limit off, so tests about other things can send bursts.
    pub extra: String,
    /// Replaces the `confluence:` section's base_url.
    pub base_url: Option<String>,
    pub confluence_extra: String,
    /// Extra lines of the `listen:` section (`public_url`, ...).
    pub listen_extra: String,
    pub listen_tls: Option<(PathBuf, PathBuf)>,
    /// Enables the key API on the ops listener.
    pub admin_token: Option<String>,
    /// The whole `audit:` section.
    pub audit: String,
    /// The whole `clients:` section.
    pub clients: String,
    /// The `admin_key:` section, if any.
    pub admin_key: String,
    /// The listener address (`127.0.0.1:0` by default).
    pub listen: String,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            routes: keygate::dev::DEV_ROUTES.to_owned(),
            extra: "limits:\n  per_client_rps: 0\n".to_owned(),
            base_url: None,
            confluence_extra: String::new(),
            listen_extra: String::new(),
            listen_tls: None,
            admin_token: None,
            audit: "audit:\n  path: audit.jsonl\n".to_owned(),
            clients: "clients:\n  keys_file: keys.yaml\n".to_owned(),
            admin_key: String::new(),
            listen: "127.0.0.1:0".to_owned(),
        }
    }
}

impl Setup {
    /// The config file's text in front of `standin`.
    pub fn yaml(&self, standin: &str) -> String {
        let tls = match &self.listen_tls {
            Some((cert, key)) => format!(
                "  tls:\n    cert: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ),
            None => String::new(),
        };
        let base_url = self.base_url.clone().unwrap_or_else(|| standin.to_owned());
        let admin_token = match &self.admin_token {
            Some(t) => format!("  admin_token: {t}\n"),
            None => String::new(),
        };
        format!(
            "listen:\n  address: {}\n{tls}{}ops:\n  address: 127.0.0.1:0\n{admin_token}confluence:\n  base_url: {base_url}\n  allow_http: true\n  email: {ADMIN_EMAIL}\n  api_token: {ADMIN_TOKEN}\n{}{}{}{}{}{}",
            self.listen,
            self.listen_extra,
            self.confluence_extra,
            self.admin_key,
            self.clients,
            self.routes,
            self.audit,
            self.extra
        )
    }

    /// Writes the config and the demo keys into `dir`; returns the config path
    /// and the keys (scanner, reader).
    pub fn write(&self, dir: &std::path::Path, standin: &str) -> (PathBuf, DemoKey, DemoKey) {
        let mut keys = keygate::dev::write_demo_keys(&dir.join("keys.yaml")).unwrap();
        let reader = keys.pop().unwrap();
        let scanner = keys.pop().unwrap();
        let file = dir.join("keygate.yaml");
        std::fs::write(&file, self.yaml(standin)).unwrap();
        (file, scanner, reader)
    }
}

/// A temporary directory, removed when dropped.
pub fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("keygate-test-{tag}-"))
        .tempdir()
        .unwrap()
}

pub struct Harness {
    pub standin: Standin,
    pub addr: SocketAddr,
    pub ops_addr: Option<SocketAddr>,
    pub control: Control,
    pub dir: PathBuf,
    pub scanner: DemoKey,
    pub reader: DemoKey,
    _dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(Setup::default()).await
    }

    pub async fn start_with(setup: Setup) -> Harness {
        let state = Arc::new(StandinState::new(ADMIN_EMAIL, ADMIN_TOKEN));
        let standin = Standin::start_with(state).await.unwrap();
        Self::start_in_front_of(standin, setup).await
    }

    pub async fn start_in_front_of(standin: Standin, setup: Setup) -> Harness {
        let tmp = temp_dir("harness");
        let dir = tmp.path().to_path_buf();
        let (file, scanner, reader) = setup.write(&dir, &standin.base_url());
        let config = keygate::config::load(&file).unwrap_or_else(|e| panic!("{e}"));
        let app = App::bind(config).await.unwrap();
        let addr = app.local_addr();
        let ops_addr = app.ops_addr();
        let control = app.control();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run(async move {
            let _ = stopped.await;
        }));
        Harness {
            standin,
            addr,
            ops_addr,
            control,
            dir,
            scanner,
            reader,
            _dir: tmp,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn ops_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ops_addr.unwrap())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.standin.state.requests()
    }

    /// Requests the stand-in received on paths other than the admin-key API.
    pub fn forwarded(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path() != "/wiki/api/v2/admin-key")
            .collect()
    }

    /// Stops keygate and waits for it, so a panic in it fails the test; returns
    /// its directory, removed when the caller drops it.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
        self._dir
    }
}

pub fn basic(id: &str, secret: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    )
}

impl DemoKeyExt for DemoKey {
    fn basic(&self) -> String {
        basic(&self.client_id, &self.secret)
    }
    fn bearer(&self) -> String {
        format!("Bearer {}", self.secret)
    }
}

pub trait DemoKeyExt {
    fn basic(&self) -> String;
    fn bearer(&self) -> String;
}

pub fn admin_basic() -> String {
    basic(ADMIN_EMAIL, ADMIN_TOKEN)
}
