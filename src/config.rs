//! Configuration: YAML is parsed into raw serde structs (`config/raw.rs`), then
//! validated into typed values with no loose strings, collecting every error before
//! returning. Each error names the file, the field path, line:column where YAML
//! gives them, and what was expected.
//!
//! Invariant: a `Config` value is always valid; nothing downstream re-checks it.

mod interp;
pub mod raw;
pub mod units;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use serde::de::DeserializeOwned;

use crate::route::{PathPattern, RoleRule, Route, RouteTable, KNOWN_METHODS};
use raw::RawConfig;
pub use units::{format_duration, parse_duration, parse_size};

/// Where `${env:NAME}` looks names up: the process environment, or a table in
/// tests.
pub type Env = dyn Fn(&str) -> Option<String> + Sync;

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// A secret string: never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A secret as the config writes it (`${env:…}`, `${file:…}` or literal),
/// resolved only by the commands that use it: `explain` and `keys` run without
/// the admin's secrets in the environment.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretRef {
    field: &'static str,
    text: String,
    base_dir: PathBuf,
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretRef({})", self.field)
    }
}

impl SecretRef {
    /// Resolves the reference; the error names the field.
    pub fn resolve(&self, file: &Path, env: &Env) -> Result<Secret, ConfigError> {
        let error = |message: String| ConfigError {
            file: file.display().to_string(),
            field: self.field.to_owned(),
            location: None,
            message,
        };
        let value = interp::interpolate(&self.text, &self.base_dir, env).map_err(error)?;
        if value.trim().is_empty() {
            return Err(error("expected a secret, got an empty string".into()));
        }
        Ok(Secret(value))
    }
}

/// The secrets of a config, resolved (by `run` and `check`).
#[derive(Debug, Clone)]
pub struct Secrets {
    pub api_token: Secret,
    pub admin_token: Option<Secret>,
    pub postgres_url: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from, for messages and reloads.
    pub file: PathBuf,
    pub listen: Listen,
    pub ops: Option<Ops>,
    pub confluence: Confluence,
    pub admin_key: AdminKeyPolicy,
    pub clients: Clients,
    pub routes: RouteTable,
    pub audit: Option<AuditSettings>,
    pub limits: Limits,
    /// Shared state of a cluster; `None`: files, one node.
    pub state: Option<StateSettings>,
}

/// `state:`: where a cluster of replicas keeps what they share.
#[derive(Debug, Clone)]
pub struct StateSettings {
    /// This replica's name in audit records and metrics (default: the host name).
    pub replica: String,
    pub postgres: Option<PostgresSettings>,
}

/// `state.postgres`: the database replicas share.
#[derive(Debug, Clone)]
pub struct PostgresSettings {
    /// `postgres://user:password@host:port/db?sslmode=require`.
    pub url: SecretRef,
    /// Extra PEM CA bundle for the database's certificate.
    pub ca_file: Option<PathBuf>,
    pub pool_size: u32,
    pub statement_timeout: Duration,
    /// Apply missing schema migrations at start (else refuse to start until
    /// `keygate db migrate` has run).
    pub apply_migrations: bool,
}

#[derive(Debug, Clone)]
pub struct Listen {
    pub address: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// What clients use to reach keygate (`https://keygate.example.com`), for
    /// rewriting the site's URLs; `None`: the scheme and authority a request
    /// arrived with.
    pub public_url: Option<Origin>,
}

/// A scheme and authority: `https://keygate.example.com:8443`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub scheme: Scheme,
    pub authority: Authority,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Ops {
    pub address: SocketAddr,
    pub admin_token: Option<SecretRef>,
}

#[derive(Debug, Clone)]
pub struct Confluence {
    pub scheme: Scheme,
    pub authority: Authority,
    pub email: String,
    pub api_token: SecretRef,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub ca_file: Option<PathBuf>,
    /// Rewrite the site's URLs inside JSON bodies (`_links.base` and the like).
    pub rewrite_json: bool,
}

impl Confluence {
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminKeyPolicy {
    /// Whole minutes, 1..=60.
    pub duration_minutes: u32,
    pub refresh_before: Duration,
    /// `None` for "never".
    pub idle_disable_after: Option<Duration>,
    pub disable_on_shutdown: bool,
}

#[derive(Debug, Clone)]
pub struct Clients {
    pub keys_file: PathBuf,
    pub verify_cache_ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    File(PathBuf),
    Stdout,
    /// The `keygate_audit` table of `state.postgres`.
    Database,
}

#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub sink: AuditSink,
    pub rotate_size: u64,
    pub keep: u32,
    pub record_passthrough: bool,
    /// A durable write slower than this fails (bypass: 503), so a hung disk does
    /// not hang requests.
    pub write_timeout: Duration,
    /// Rotation never deletes a file with bypass records younger than this.
    pub bypass_retention: Duration,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: u32,
    pub per_client_rps: u32,
    pub upstream_backoff: bool,
    pub header_read_timeout: Duration,
    pub max_header_bytes: u64,
    /// A connection with no request in flight and no bytes moving is closed.
    pub idle_timeout: Duration,
    /// A request or response body that sends nothing for this long fails.
    pub body_idle_timeout: Duration,
}

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// Dotted field path like `routes[2].path`; empty for the file as a whole.
    pub field: String,
    pub location: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((line, column)) = self.location {
            write!(f, ":{line}:{column}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every error found in a file, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ConfigErrors {
    pub fn single(file: &Path, field: &str, message: impl Into<String>) -> Self {
        ConfigErrors(vec![ConfigError {
            file: file.display().to_string(),
            field: field.to_owned(),
            location: None,
            message: message.into(),
        }])
    }
}

/// The one place YAML text is deserialised (serde_yaml is archived upstream; a swap
/// to a maintained fork should touch only this function).
pub fn from_yaml<T: DeserializeOwned>(text: &str, file: &Path) -> Result<T, ConfigErrors> {
    serde_yaml::from_str(text).map_err(|e| {
        let location = e.location().map(|l| (l.line(), l.column()));
        let mut message = e.to_string();
        if let Some(at) = message.rfind(" at line ") {
            message.truncate(at);
        }
        ConfigErrors(vec![ConfigError {
            file: file.display().to_string(),
            field: String::new(),
            location,
            message,
        }])
    })
}

/// The largest configuration file read.
pub const MAX_CONFIG_FILE: u64 = 4 << 20;
/// The largest `${file:…}` secret read.
pub const MAX_SECRET_FILE: u64 = 64 << 10;

pub use crate::files::read_capped;

/// Reads, parses and validates a configuration file. Secrets stay unresolved
/// (`Config::secrets` resolves them).
pub fn load(file: &Path) -> Result<Config, ConfigErrors> {
    load_with(file, &process_env)
}

/// `load`, looking `${env:…}` up in `env`.
pub fn load_with(file: &Path, env: &Env) -> Result<Config, ConfigErrors> {
    let text = read_capped(file, MAX_CONFIG_FILE)
        .map_err(|e| ConfigErrors::single(file, "", format!("cannot read the file: {e}")))?;
    from_text(&text, file, env)
}

/// Parses and validates a configuration's text as if read from `file`.
pub fn from_text(text: &str, file: &Path, env: &Env) -> Result<Config, ConfigErrors> {
    let raw: RawConfig = from_yaml(text, file)?;
    validate(raw, file, env)
}

impl Config {
    /// Resolves every secret the config names from the process environment and
    /// files; all errors at once.
    pub fn secrets(&self) -> Result<Secrets, ConfigErrors> {
        self.secrets_with(&process_env)
    }

    /// `secrets`, looking `${env:…}` up in `env`.
    pub fn secrets_with(&self, env: &Env) -> Result<Secrets, ConfigErrors> {
        let mut errors = Vec::new();
        let api_token = self
            .confluence
            .api_token
            .resolve(&self.file, env)
            .map_err(|e| errors.push(e))
            .ok();
        let admin_token = self
            .ops
            .as_ref()
            .and_then(|o| o.admin_token.as_ref())
            .and_then(|t| match t.resolve(&self.file, env) {
                Ok(token) if token.expose().len() >= 16 => Some(token),
                Ok(_) => {
                    errors.push(ConfigError {
                        file: self.file.display().to_string(),
                        field: "ops.admin_token".into(),
                        location: None,
                        message: "expected a token of at least 16 characters".into(),
                    });
                    None
                }
                Err(e) => {
                    errors.push(e);
                    None
                }
            });
        let postgres_url = self
            .state
            .as_ref()
            .and_then(|s| s.postgres.as_ref())
            .and_then(|p| {
                p.url
                    .resolve(&self.file, env)
                    .map_err(|e| errors.push(e))
                    .ok()
            });
        match api_token {
            Some(api_token) if errors.is_empty() => Ok(Secrets {
                api_token,
                admin_token,
                postgres_url,
            }),
            _ => Err(ConfigErrors(errors)),
        }
    }
}

/// Collects errors while validating, with the context to name them.
struct Check<'a> {
    file: &'a Path,
    base_dir: PathBuf,
    errors: Vec<ConfigError>,
    env: &'a Env,
}

impl Check<'_> {
    fn error(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.display().to_string(),
            field: field.to_owned(),
            location: None,
            message: message.into(),
        });
    }

    /// The string after `${env:…}`/`${file:…}` interpolation.
    fn string(&mut self, field: &str, value: &str) -> Option<String> {
        interp::interpolate(value, &self.base_dir, self.env)
            .map_err(|m| self.error(field, m))
            .ok()
    }

    /// A secret, resolved later by the commands that need it.
    fn secret(&mut self, field: &'static str, value: &str) -> SecretRef {
        SecretRef {
            field,
            text: value.to_owned(),
            base_dir: self.base_dir.clone(),
        }
    }

    fn non_empty(&mut self, field: &str, value: &str, what: &str) -> Option<String> {
        let s = self.string(field, value)?;
        if s.trim().is_empty() {
            self.error(field, format!("expected {what}, got an empty string"));
            return None;
        }
        Some(s)
    }

    fn path(&mut self, field: &str, value: &str) -> Option<PathBuf> {
        let s = self.non_empty(field, value, "a file path")?;
        Some(self.base_dir.join(s))
    }

    fn duration(&mut self, field: &str, value: Option<&str>, default: Duration) -> Duration {
        let Some(value) = value else { return default };
        self.string(field, value)
            .and_then(|s| parse_duration(&s).map_err(|m| self.error(field, m)).ok())
            .unwrap_or(default)
    }

    fn size(&mut self, field: &str, value: Option<&str>, default: u64) -> u64 {
        let Some(value) = value else { return default };
        self.string(field, value)
            .and_then(|s| parse_size(&s).map_err(|m| self.error(field, m)).ok())
            .unwrap_or(default)
    }

    fn socket_addr(&mut self, field: &str, value: &str) -> Option<SocketAddr> {
        let s = self.string(field, value)?;
        s.trim()
            .parse()
            .map_err(|_| {
                self.error(
                    field,
                    format!("expected IP:port like `0.0.0.0:8443` or `[::]:8443`, got `{s}`"),
                )
            })
            .ok()
    }
}

const PLACEHOLDER_ADDR: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::UNSPECIFIED,
    0,
));

/// Validates a raw configuration; `file` is where it came from.
pub fn validate(raw: RawConfig, file: &Path, env: &Env) -> Result<Config, ConfigErrors> {
    let base_dir = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut c = Check {
        file,
        base_dir,
        errors: Vec::new(),
        env,
    };

    let listen = validate_listen(&mut c, &raw.listen);
    let ops = raw.ops.as_ref().map(|ops| Ops {
        address: c
            .socket_addr("ops.address", &ops.address)
            .unwrap_or(PLACEHOLDER_ADDR),
        admin_token: ops
            .admin_token
            .as_ref()
            .map(|t| c.secret("ops.admin_token", t)),
    });
    let confluence = validate_confluence(&mut c, &raw.confluence);
    let admin_key = validate_admin_key(&mut c, &raw.admin_key);
    let state = raw.state.as_ref().map(|st| validate_state(&mut c, st));
    let database = state.as_ref().is_some_and(|s| s.postgres.is_some());
    if database && raw.clients.keys_file.is_some() {
        c.error(
            "clients.keys_file",
            "expected no keys file with state.postgres: keys live in the database (move a file in with `keygate keys import FILE`)",
        );
    }
    let clients = Clients {
        keys_file: match &raw.clients.keys_file {
            Some(p) => c.path("clients.keys_file", p).unwrap_or_default(),
            None if database => PathBuf::new(),
            None => c.base_dir.join("keys.yaml"),
        },
        verify_cache_ttl: c.duration(
            "clients.verify_cache_ttl",
            raw.clients.verify_cache_ttl.as_deref(),
            Duration::from_secs(300),
        ),
    };
    let routes = validate_routes(&mut c, &raw.routes);
    let audit = match (&raw.audit, database) {
        (Some(a), _) => Some(validate_audit(&mut c, a, database)),
        // With the database, the trail is always kept.
        (None, true) => Some(validate_audit(&mut c, &raw::RawAudit::default(), true)),
        (None, false) => None,
    };
    if audit.is_none() && routes.any_bypass() {
        c.error(
            "audit",
            "expected an `audit` section: routes with `admin_key: true` need the audit trail",
        );
    }
    let limits = validate_limits(&mut c, &raw.limits);

    if !c.errors.is_empty() {
        return Err(ConfigErrors(c.errors));
    }
    Ok(Config {
        file: file.to_path_buf(),
        listen,
        ops,
        confluence,
        admin_key,
        clients,
        routes,
        audit,
        limits,
        state,
    })
}

fn validate_state(c: &mut Check<'_>, raw: &raw::RawState) -> StateSettings {
    let replica = match &raw.replica {
        Some(name) => c
            .non_empty("state.replica", name, "a replica name")
            .unwrap_or_default(),
        None => host_name(),
    };
    if !replica
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        || replica.len() > 64
    {
        c.error(
            "state.replica",
            format!("expected up to 64 letters, digits, `-`, `_` or `.`, got `{replica}`"),
        );
    }
    let postgres = raw.postgres.as_ref().map(|pg| {
        let pool_size = pg.pool_size.unwrap_or(8);
        if !(2..=256).contains(&pool_size) {
            c.error("state.postgres.pool_size", "expected 2 to 256");
        }
        let statement_timeout = c.duration(
            "state.postgres.statement_timeout",
            pg.statement_timeout.as_deref(),
            Duration::from_secs(5),
        );
        if statement_timeout.is_zero() {
            c.error(
                "state.postgres.statement_timeout",
                "expected a duration above zero",
            );
        }
        let ca_file = pg
            .ca_file
            .as_ref()
            .and_then(|p| c.path("state.postgres.ca_file", p));
        if let Some(path) = &ca_file {
            if let Err(e) = crate::tls::read_ca_bundle(path) {
                c.error("state.postgres.ca_file", e.to_string());
            }
        }
        PostgresSettings {
            url: c.secret("state.postgres.url", &pg.url),
            ca_file,
            pool_size,
            statement_timeout,
            apply_migrations: pg.apply_migrations.unwrap_or(true),
        }
    });
    StateSettings { replica, postgres }
}

/// This machine's host name (a pod's name on Kubernetes), for replica names.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "keygate".into())
}

fn validate_listen(c: &mut Check<'_>, raw: &raw::RawListen) -> Listen {
    let address = c
        .socket_addr("listen.address", &raw.address)
        .unwrap_or(PLACEHOLDER_ADDR);
    let tls = raw.tls.as_ref().and_then(|t| {
        let cert = c.path("listen.tls.cert", &t.cert)?;
        let key = c.path("listen.tls.key", &t.key)?;
        if let Err(e) = crate::tls::server_config(&cert, &key) {
            c.error(&e.field("listen.tls"), e.to_string());
        }
        Some(TlsFiles { cert, key })
    });
    let public_url = raw.public_url.as_ref().and_then(|u| {
        let url = c.non_empty(
            "listen.public_url",
            u,
            "a URL like `https://keygate.example.com`",
        )?;
        match parse_origin(&url) {
            Ok(origin) => Some(origin),
            Err(m) => {
                c.error("listen.public_url", m);
                None
            }
        }
    });
    Listen {
        address,
        tls,
        public_url,
    }
}

/// An origin URL (`https://host[:port]`, no path), as `listen.public_url` takes it.
fn parse_origin(url: &str) -> Result<Origin, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| format!("expected a URL like `https://keygate.example.com`, got `{url}`"))?;
    let scheme = uri
        .scheme()
        .cloned()
        .filter(|s| *s == Scheme::HTTP || *s == Scheme::HTTPS)
        .ok_or_else(|| format!("expected an http or https URL, got `{url}`"))?;
    let authority = uri
        .authority()
        .cloned()
        .filter(|a| !a.as_str().contains('@'))
        .ok_or_else(|| format!("expected a host and no user name in `{url}`"))?;
    if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
        return Err(format!(
            "expected only scheme and host, like `{scheme}://{authority}` (keygate serves the site's paths as they are)"
        ));
    }
    Ok(Origin { scheme, authority })
}

fn validate_confluence(c: &mut Check<'_>, raw: &raw::RawConfluence) -> Confluence {
    let mut scheme = Scheme::HTTPS;
    let mut authority = Authority::from_static("invalid.invalid");
    if let Some(url) = c.non_empty("confluence.base_url", &raw.base_url, "an https URL") {
        match parse_base_url(&url, raw.allow_http) {
            Ok((s, a)) => (scheme, authority) = (s, a),
            Err(m) => c.error("confluence.base_url", m),
        }
    }
    let email = c
        .non_empty("confluence.email", &raw.email, "the admin account's email")
        .unwrap_or_default();
    let api_token = c.secret("confluence.api_token", &raw.api_token);
    let connect_timeout = c.duration(
        "confluence.connect_timeout",
        raw.connect_timeout.as_deref(),
        Duration::from_secs(5),
    );
    let request_timeout = c.duration(
        "confluence.request_timeout",
        raw.request_timeout.as_deref(),
        Duration::from_secs(60),
    );
    for (field, d) in [
        ("confluence.connect_timeout", connect_timeout),
        ("confluence.request_timeout", request_timeout),
    ] {
        if d.is_zero() {
            c.error(field, "expected a duration above zero");
        }
    }
    let ca_file = raw
        .ca_file
        .as_ref()
        .and_then(|p| c.path("confluence.ca_file", p));
    if let Some(path) = &ca_file {
        if let Err(e) = crate::tls::read_ca_bundle(path) {
            c.error("confluence.ca_file", e.to_string());
        }
    }
    Confluence {
        scheme,
        authority,
        email,
        api_token,
        connect_timeout,
        request_timeout,
        ca_file,
        rewrite_json: raw.rewrite_json.unwrap_or(true),
    }
}

/// Scheme and authority of the site root; anything more is refused with a hint.
fn parse_base_url(url: &str, allow_http: bool) -> Result<(Scheme, Authority), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| format!("expected a URL like `https://example.atlassian.net`, got `{url}`"))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| format!("expected a URL with a scheme, like `https://{url}`"))?;
    if scheme == Scheme::HTTP && !allow_http {
        return Err(
            "expected an https URL (set `confluence.allow_http: true` only for tests)".into(),
        );
    }
    if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
        return Err(format!("expected an https URL, got scheme `{scheme}`"));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("expected a host in `{url}`"))?;
    if authority.as_str().contains('@') {
        return Err(
            "expected no user name or password in the URL; use `email` and `api_token`".into(),
        );
    }
    if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
        return Err(format!(
            "expected the site root like `{scheme}://{authority}` without a path: clients send `/wiki/...` paths themselves"
        ));
    }
    Ok((scheme, authority))
}

fn validate_admin_key(c: &mut Check<'_>, raw: &raw::RawAdminKey) -> AdminKeyPolicy {
    let duration = c.duration(
        "admin_key.duration",
        raw.duration.as_deref(),
        Duration::from_secs(3600),
    );
    let secs = duration.as_secs();
    let whole_minutes = duration.subsec_nanos() == 0 && secs.is_multiple_of(60);
    if !whole_minutes || !(60..=3600).contains(&secs) {
        c.error(
            "admin_key.duration",
            format!(
                "expected whole minutes from 1m to 60m (Confluence caps admin keys at 60 minutes), got {}",
                format_duration(duration)
            ),
        );
    }
    let refresh_before = c.duration(
        "admin_key.refresh_before",
        raw.refresh_before.as_deref(),
        Duration::from_secs(300),
    );
    if refresh_before < Duration::from_secs(1) || refresh_before >= duration {
        c.error(
            "admin_key.refresh_before",
            format!(
                "expected at least 1s and less than admin_key.duration ({}), got {}",
                format_duration(duration),
                format_duration(refresh_before)
            ),
        );
    }
    let idle_disable_after = match raw.idle_disable_after.as_deref() {
        None => Some(Duration::from_secs(900)),
        Some(text) => match c.string("admin_key.idle_disable_after", text) {
            Some(s) if s.trim() == "never" => None,
            Some(s) => match parse_duration(&s) {
                Ok(d) if !d.is_zero() => Some(d),
                Ok(_) => {
                    c.error(
                        "admin_key.idle_disable_after",
                        "expected a duration above zero or `never`",
                    );
                    None
                }
                Err(m) => {
                    c.error("admin_key.idle_disable_after", format!("{m}, or `never`"));
                    None
                }
            },
            None => None,
        },
    };
    AdminKeyPolicy {
        duration_minutes: u32::try_from(secs / 60).unwrap_or(60),
        refresh_before,
        idle_disable_after,
        disable_on_shutdown: raw.disable_on_shutdown.unwrap_or(true),
    }
}

fn validate_routes(c: &mut Check<'_>, raw: &[raw::RawRoute]) -> RouteTable {
    if raw.is_empty() {
        c.error(
            "routes",
            "expected at least one route (everything else is denied)",
        );
    }
    let mut routes = Vec::with_capacity(raw.len());
    let mut names: Vec<&str> = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let field = |f: &str| format!("routes[{i}].{f}");
        if r.name.trim().is_empty() {
            c.error(&field("name"), "expected a non-empty name");
        } else if names.contains(&r.name.as_str()) {
            c.error(
                &field("name"),
                format!("expected a unique name; `{}` is used twice", r.name),
            );
        }
        names.push(&r.name);
        let mut methods = Vec::new();
        if r.methods.is_empty() {
            c.error(
                &field("methods"),
                format!("expected at least one of {}", KNOWN_METHODS.join(", ")),
            );
        }
        for (j, m) in r.methods.iter().enumerate() {
            if !KNOWN_METHODS.contains(&m.as_str()) {
                c.error(
                    &format!("routes[{i}].methods[{j}]"),
                    format!("expected one of {}, got `{m}`", KNOWN_METHODS.join(", ")),
                );
            } else if let Ok(method) = m.parse::<http::Method>() {
                if methods.contains(&method) {
                    c.error(
                        &format!("routes[{i}].methods[{j}]"),
                        format!("`{m}` is listed twice"),
                    );
                }
                methods.push(method);
            }
        }
        let pattern = PathPattern::parse(&r.path)
            .map_err(|m| c.error(&field("path"), format!("{m} (got `{}`)", r.path)))
            .ok();
        if r.roles.is_empty() {
            c.error(
                &field("roles"),
                "expected at least one role, or \"*\" for any valid key",
            );
        }
        for (j, role) in r.roles.iter().enumerate() {
            if role.trim().is_empty() {
                c.error(
                    &format!("routes[{i}].roles[{j}]"),
                    "expected a non-empty role name",
                );
            }
        }
        if let Some(pattern) = pattern {
            routes.push(Route {
                name: r.name.clone(),
                shared_name: r.name.as_str().into(),
                methods,
                pattern,
                roles: RoleRule::from_names(&r.roles),
                role_names: r.roles.clone(),
                admin_key: r.admin_key,
            });
        }
    }
    RouteTable::new(routes)
}

fn validate_audit(c: &mut Check<'_>, raw: &raw::RawAudit, database: bool) -> AuditSettings {
    let sink = match (&raw.path, database) {
        (None, true) => AuditSink::Database,
        (Some(_), true) => {
            c.error(
                "audit.path",
                "expected no path with state.postgres: the trail is kept in the database",
            );
            AuditSink::Database
        }
        (None, false) => {
            c.error("audit.path", "expected a file path or \"-\"");
            AuditSink::Stdout
        }
        (Some(p), false) => match c.non_empty("audit.path", p, "a file path or \"-\"") {
            Some(p) if p == "-" => AuditSink::Stdout,
            Some(p) => AuditSink::File(c.base_dir.join(p)),
            None => AuditSink::Stdout,
        },
    };
    let rotate_size = c.size("audit.rotate_size", raw.rotate_size.as_deref(), 100 << 20);
    if rotate_size < 4096 {
        c.error("audit.rotate_size", "expected at least 4KiB");
    }
    let write_timeout = c.duration(
        "audit.write_timeout",
        raw.write_timeout.as_deref(),
        Duration::from_secs(5),
    );
    if write_timeout < Duration::from_millis(100) {
        c.error("audit.write_timeout", "expected at least 100ms");
    }
    let bypass_retention = c.duration(
        "audit.bypass_retention",
        raw.bypass_retention.as_deref(),
        Duration::from_secs(24 * 3600),
    );
    AuditSettings {
        sink,
        rotate_size,
        keep: raw.keep.unwrap_or(10),
        record_passthrough: raw.record_passthrough.unwrap_or(true),
        write_timeout,
        bypass_retention,
    }
}

fn validate_limits(c: &mut Check<'_>, raw: &raw::RawLimits) -> Limits {
    let max_connections = raw.max_connections.unwrap_or(4096);
    if max_connections == 0 {
        c.error("limits.max_connections", "expected at least 1");
    }
    let header_read_timeout = c.duration(
        "limits.header_read_timeout",
        raw.header_read_timeout.as_deref(),
        Duration::from_secs(10),
    );
    if header_read_timeout.is_zero() {
        c.error(
            "limits.header_read_timeout",
            "expected a duration above zero",
        );
    }
    let max_header_bytes = c.size(
        "limits.max_header_bytes",
        raw.max_header_bytes.as_deref(),
        32 << 10,
    );
    if !(8 << 10..=1 << 20).contains(&max_header_bytes) {
        c.error(
            "limits.max_header_bytes",
            "expected a size from 8KiB to 1MiB",
        );
    }
    let idle_timeout = c.duration(
        "limits.idle_timeout",
        raw.idle_timeout.as_deref(),
        Duration::from_secs(60),
    );
    let body_idle_timeout = c.duration(
        "limits.body_idle_timeout",
        raw.body_idle_timeout.as_deref(),
        Duration::from_secs(60),
    );
    for (field, d) in [
        ("limits.idle_timeout", idle_timeout),
        ("limits.body_idle_timeout", body_idle_timeout),
    ] {
        if d < Duration::from_secs(1) {
            c.error(field, "expected at least 1s");
        }
    }
    Limits {
        max_connections,
        per_client_rps: raw.per_client_rps.unwrap_or(50),
        upstream_backoff: raw.upstream_backoff.unwrap_or(true),
        header_read_timeout,
        max_header_bytes,
        idle_timeout,
        body_idle_timeout,
    }
}

#[cfg(test)]
mod tests;
