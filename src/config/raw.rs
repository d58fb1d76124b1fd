//! The YAML as written: serde structs that reject unknown fields everywhere, since a
//! typo must never silently disable a rule. Validation into typed values is in
//! `config.rs`.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: RawListen,
    pub ops: Option<RawOps>,
    pub confluence: RawConfluence,
    #[serde(default)]
    pub admin_key: RawAdminKey,
    #[serde(default)]
    pub clients: RawClients,
    pub routes: Vec<RawRoute>,
    pub audit: Option<RawAudit>,
    #[serde(default)]
    pub limits: RawLimits,
    pub state: Option<RawState>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub replica: Option<String>,
    pub postgres: Option<RawPostgres>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostgres {
    pub url: String,
    pub ca_file: Option<String>,
    pub pool_size: Option<u32>,
    pub statement_timeout: Option<String>,
    pub apply_migrations: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub address: String,
    pub tls: Option<RawTls>,
    pub public_url: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOps {
    pub address: String,
    pub admin_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfluence {
    pub base_url: String,
    #[serde(default)]
    pub allow_http: bool,
    pub email: String,
    pub api_token: String,
    pub connect_timeout: Option<String>,
    pub request_timeout: Option<String>,
    /// Extra PEM CA bundle trusted besides the web PKI roots (private CAs, tests).
    pub ca_file: Option<String>,
    pub rewrite_json: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdminKey {
    pub duration: Option<String>,
    pub refresh_before: Option<String>,
    pub idle_disable_after: Option<String>,
    pub disable_on_shutdown: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClients {
    pub keys_file: Option<String>,
    pub verify_cache_ttl: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    pub methods: Vec<String>,
    pub path: String,
    pub roles: Vec<String>,
    #[serde(default)]
    pub admin_key: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub path: Option<String>,
    pub rotate_size: Option<String>,
    pub keep: Option<u32>,
    pub record_passthrough: Option<bool>,
    pub write_timeout: Option<String>,
    pub bypass_retention: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_connections: Option<u32>,
    pub per_client_rps: Option<u32>,
    pub upstream_backoff: Option<bool>,
    pub header_read_timeout: Option<String>,
    pub max_header_bytes: Option<String>,
    pub idle_timeout: Option<String>,
    pub body_idle_timeout: Option<String>,
}
