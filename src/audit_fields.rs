//! The fields of the audit events that are not about one request: startup,
//! shutdown, admin_key, config_reload and key_management.

use std::collections::HashMap;

use serde_json::Value;

use crate::admin_key::AdminKeyEvent;
use crate::audit::writer::Recovery;
use crate::client_keys::KeyStore;
use crate::config::{Config, ConfigErrors};

type Fields = Vec<(&'static str, Value)>;

pub fn startup(config: &Config, recovery: &Recovery) -> Fields {
    vec![
        ("version", Value::from(env!("CARGO_PKG_VERSION"))),
        ("pid", Value::from(std::process::id())),
        ("config", Value::from(config.file.display().to_string())),
        ("upstream", Value::from(config.confluence.base_url())),
        (
            "admin_account_email",
            Value::from(config.confluence.email.as_str()),
        ),
        ("torn_line_cut_bytes", Value::from(recovery.torn_bytes)),
    ]
}

pub fn shutdown() -> Fields {
    vec![("pid", Value::from(std::process::id()))]
}

pub fn admin_key(e: &AdminKeyEvent) -> Fields {
    vec![
        ("action", Value::from(e.action)),
        (
            "expires",
            Value::from(e.expires.map(crate::rfc3339::format_seconds)),
        ),
        ("account_id", Value::from(e.account_id.clone())),
        ("reason", Value::from(e.reason.as_str())),
    ]
}

pub fn reload_ok(trigger: &str) -> Fields {
    vec![
        ("result", Value::from("ok")),
        ("trigger", Value::from(trigger)),
    ]
}

/// Names the fields in error, not the messages: a message may quote a value.
pub fn reload_error(trigger: &str, errors: &ConfigErrors) -> Fields {
    let fields: Vec<Value> = errors
        .0
        .iter()
        .map(|e| Value::from(format!("{}: {}", e.file, e.field)))
        .collect();
    vec![
        ("result", Value::from("error")),
        ("trigger", Value::from(trigger)),
        ("errors", Value::from(fields)),
    ]
}

/// Keys created, revoked, regenerated (new hash), re-validated or removed between
/// two generations, with who acted: the key API says so in its trigger; anything
/// else came through the keys file (`keygate keys` or an edit).
pub fn key_changes(old: &KeyStore, new: &KeyStore, trigger: &str) -> Vec<Fields> {
    let principal = if trigger.starts_with("key API") {
        trigger.to_owned()
    } else {
        format!("keys file (keygate keys or an edit), noticed on {trigger}")
    };
    let before: HashMap<&str, _> = old.keys().map(|k| (k.client_id.as_str(), k)).collect();
    let mut changes = Vec::new();
    let mut push = |action: &str, client_id: &str, id: &str| {
        changes.push(vec![
            ("action", Value::from(action)),
            ("client_id", Value::from(client_id)),
            ("key_id", Value::from(id)),
            ("principal", Value::from(principal.as_str())),
        ]);
    };
    for k in new.keys() {
        match before.get(k.client_id.as_str()) {
            None => push("create", &k.client_id, &k.id),
            Some(o) if o.secret_hash != k.secret_hash => push("regenerate", &k.client_id, &k.id),
            Some(o) if o.is_valid && !k.is_valid => push("revoke", &k.client_id, &k.id),
            Some(o) if !o.is_valid && k.is_valid => push("validate", &k.client_id, &k.id),
            Some(_) => {}
        }
    }
    for k in old.keys() {
        if new.get(&k.client_id).is_none() {
            push("delete", &k.client_id, &k.id);
        }
    }
    changes
}
