//! The keys file: its YAML shape, validation into `ApiKey`s, and atomic rewriting.

use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Deserializer, Serialize};

use crate::config::{from_yaml, ConfigError, ConfigErrors};

/// The file as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    #[serde(default)]
    pub keys: Vec<KeyEntry>,
}

/// One key as written in the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    #[serde(deserialize_with = "string_or_number")]
    pub id: String,
    pub client_id: String,
    pub name: String,
    pub secret_hash: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration: Option<String>,
    #[serde(default = "yes")]
    pub is_valid: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

fn yes() -> bool {
    true
}

/// Hand-edited files may write `id: 1003` without quotes.
fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        S(String),
        N(u64),
    }
    Ok(match Id::deserialize(d)? {
        Id::S(s) => s,
        Id::N(n) => n.to_string(),
    })
}

/// A validated key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub client_id: String,
    pub name: String,
    pub secret_hash: String,
    pub roles: Vec<String>,
    pub expiration: Option<SystemTime>,
    pub is_valid: bool,
}

/// The largest keys file read (about 20,000 keys).
pub const MAX_KEYS_FILE: u64 = 16 << 20;

/// Reads and validates a keys file; every error names file, entry and field.
pub fn read(path: &Path) -> Result<(KeysFile, Vec<ApiKey>), ConfigErrors> {
    let text = crate::config::read_capped(path, MAX_KEYS_FILE)
        .map_err(|e| ConfigErrors::single(path, "", format!("cannot read the keys file: {e}")))?;
    let file: KeysFile = from_yaml(&text, path)?;
    let keys = validate(&file, path)?;
    Ok((file, keys))
}

pub fn validate(file: &KeysFile, path: &Path) -> Result<Vec<ApiKey>, ConfigErrors> {
    let mut errors = Vec::new();
    let mut keys: Vec<ApiKey> = Vec::with_capacity(file.keys.len());
    for (i, e) in file.keys.iter().enumerate() {
        let mut error = |field: &str, message: String| {
            errors.push(ConfigError {
                file: path.display().to_string(),
                field: format!("keys[{i}] (client_id `{}`).{field}", e.client_id),
                location: None,
                message,
            })
        };
        if e.id.trim().is_empty() {
            error("id", "expected a non-empty id".into());
        }
        if e.client_id.is_empty()
            || !e
                .client_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            error(
                "client_id",
                "expected letters, digits, `_`, `-` or `.` (no `:`), like `scanner_l2j4391xlw0k2ipwx5ejmdor8`".into(),
            );
        }
        if keys.iter().any(|k| k.client_id == e.client_id) {
            error(
                "client_id",
                "expected a unique client_id; it appears twice".into(),
            );
        }
        if let Some(suffix) = super::client_id_suffix(&e.client_id) {
            if let Some(other) = keys
                .iter()
                .position(|k| super::client_id_suffix(&k.client_id) == Some(suffix))
            {
                error(
                    "client_id",
                    format!("expected a unique suffix after the last `_`; `{suffix}` is also the suffix of keys[{other}], and Bearer tokens find their key by it"),
                );
            }
        }
        if keys.iter().any(|k| k.id == e.id) {
            error(
                "id",
                format!("expected a unique id; `{}` appears twice", e.id),
            );
        }
        match argon2::PasswordHash::new(&e.secret_hash) {
            Ok(h) if h.algorithm.as_str() == "argon2id" => {
                let memory = argon2::Params::try_from(&h).map(|p| p.m_cost());
                if memory.is_ok_and(|m| m > super::verify::MAX_MEMORY_KIB) {
                    error(
                        "secret_hash",
                        format!("expected argon2 memory of at most {} KiB (m=...)", super::verify::MAX_MEMORY_KIB),
                    );
                }
            }
            _ => error(
                "secret_hash",
                "expected an argon2id PHC string (`$argon2id$v=19$...`), as `keygate keys create` writes".into(),
            ),
        }
        if e.roles.iter().any(|r| r.trim().is_empty()) {
            error("roles", "expected non-empty role names".into());
        }
        let expiration = match &e.expiration {
            None => None,
            Some(text) => match crate::rfc3339::parse(text) {
                Ok(t) => Some(t),
                Err(m) => {
                    error("expiration", m);
                    None
                }
            },
        };
        keys.push(ApiKey {
            id: e.id.clone(),
            client_id: e.client_id.clone(),
            name: e.name.clone(),
            secret_hash: e.secret_hash.clone(),
            roles: e.roles.clone(),
            expiration,
            is_valid: e.is_valid,
        });
    }
    if errors.is_empty() {
        Ok(keys)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// A key as listed: never a secret or a hash.
pub fn listing(e: &KeyEntry) -> serde_json::Value {
    serde_json::json!({
        "type": "api_access",
        "id": e.id,
        "client_id": e.client_id,
        "name": e.name,
        "roles": e.roles,
        "expiration": e.expiration,
        "is_valid": e.is_valid,
        "created": e.created,
    })
}
