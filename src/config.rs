//! Configuration: YAML is parsed into raw serde structs (`config/raw.rs`), then
//! validated into typed values with no loose strings, collecting every error before
//! returning. Each error names the file, the field path, line:column where YAML
//! gives them, and what was expected.
//!
//! Invariant: a `Config` value is always valid; nothing downstream re-checks it.

mod interp;
pub mod raw;
pub mod reload;
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
}

#[derive(Debug, Clone)]
pub struct Listen {
    pub address: SocketAddr,
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Ops {
    pub address: SocketAddr,
    pub admin_token: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct Confluence {
    pub scheme: Scheme,
    pub authority: Authority,
    pub email: String,
    pub api_token: Secret,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub ca_file: Option<PathBuf>,
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
}

#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub sink: AuditSink,
    pub rotate_size: u64,
    pub keep: u32,
    pub record_passthrough: bool,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: u32,
    pub per_client_rps: u32,
    pub upstream_backoff: bool,
    pub header_read_timeout: Duration,
    pub max_header_bytes: u64,
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

/// Reads, parses and validates a configuration file.
pub fn load(file: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| ConfigErrors::single(file, "", format!("cannot read the file: {e}")))?;
    let raw: RawConfig = from_yaml(&text, file)?;
    validate(raw, file)
}

/// Collects errors while validating, with the context to name them.
struct Check<'a> {
    file: &'a Path,
    base_dir: PathBuf,
    errors: Vec<ConfigError>,
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
        interp::interpolate(value, &self.base_dir)
            .map_err(|m| self.error(field, m))
            .ok()
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
pub fn validate(raw: RawConfig, file: &Path) -> Result<Config, ConfigErrors> {
    let base_dir = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut c = Check {
        file,
        base_dir,
        errors: Vec::new(),
    };

    let listen = validate_listen(&mut c, &raw.listen);
    let ops = raw.ops.as_ref().map(|ops| Ops {
        address: c
            .socket_addr("ops.address", &ops.address)
            .unwrap_or(PLACEHOLDER_ADDR),
        admin_token: ops.admin_token.as_ref().and_then(|t| {
            c.non_empty("ops.admin_token", t, "a token of at least 16 characters")
                .and_then(|t| {
                    if t.len() < 16 {
                        c.error(
                            "ops.admin_token",
                            "expected a token of at least 16 characters",
                        );
                        None
                    } else {
                        Some(Secret(t))
                    }
                })
        }),
    });
    let confluence = validate_confluence(&mut c, &raw.confluence);
    let admin_key = validate_admin_key(&mut c, &raw.admin_key);
    let clients = Clients {
        keys_file: match &raw.clients.keys_file {
            Some(p) => c.path("clients.keys_file", p).unwrap_or_default(),
            None => c.base_dir.join("keys.yaml"),
        },
        verify_cache_ttl: c.duration(
            "clients.verify_cache_ttl",
            raw.clients.verify_cache_ttl.as_deref(),
            Duration::from_secs(300),
        ),
    };
    let routes = validate_routes(&mut c, &raw.routes);
    let audit = raw.audit.as_ref().map(|a| validate_audit(&mut c, a));
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
    })
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
    Listen { address, tls }
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
    let api_token = c
        .non_empty(
            "confluence.api_token",
            &raw.api_token,
            "the admin's API token",
        )
        .map(Secret)
        .unwrap_or_else(|| Secret(String::new()));
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

fn validate_audit(c: &mut Check<'_>, raw: &raw::RawAudit) -> AuditSettings {
    let sink = match c.non_empty("audit.path", &raw.path, "a file path or \"-\"") {
        Some(p) if p == "-" => AuditSink::Stdout,
        Some(p) => AuditSink::File(c.base_dir.join(p)),
        None => AuditSink::Stdout,
    };
    let rotate_size = c.size("audit.rotate_size", raw.rotate_size.as_deref(), 100 << 20);
    if rotate_size < 4096 {
        c.error("audit.rotate_size", "expected at least 4KiB");
    }
    AuditSettings {
        sink,
        rotate_size,
        keep: raw.keep.unwrap_or(10),
        record_passthrough: raw.record_passthrough.unwrap_or(true),
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
    Limits {
        max_connections,
        per_client_rps: raw.per_client_rps.unwrap_or(50),
        upstream_backoff: raw.upstream_backoff.unwrap_or(true),
        header_read_timeout,
        max_header_bytes,
    }
}

#[cfg(test)]
mod tests;
