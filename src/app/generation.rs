//! A configuration generation: the validated config, its secrets, the files it
//! was read from, and the proxy policy built from it. Replaced whole on reload.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::reload::{fingerprint, Fingerprint};
use crate::admin_key;
use crate::audit::{record, Encoded, Recovery};
use crate::client_keys::edit::KeysError;
use crate::client_keys::store::{FileKeys, KeyBackend};
use crate::client_keys::{KeyStore, Verifier};
use crate::config::{Config, ConfigErrors, Secrets};
use crate::confluence::{self, AdminCredential};
use crate::metrics::Metrics;
use crate::proxy::{next_generation, Policy};
use crate::state::keys::PgKeys;
use crate::state::Db;

pub struct Generation {
    pub config: Config,
    pub secrets: Secrets,
    /// Where the keys live: the keys file, or the database in cluster mode.
    keys: Arc<dyn KeyBackend>,
    /// The config, keys and certificate files as they were when this generation
    /// was read.
    pub loaded_files: Fingerprint,
}

/// A key change between two generations.
pub(super) struct KeyChange {
    pub action: &'static str,
    pub client_id: String,
    pub key_id: String,
}

impl Generation {
    /// Validates secrets, reads the keys (from `database` in cluster mode, else
    /// from the keys file) and builds the proxy's policy.
    pub async fn build(
        config: Config,
        verifier: &Arc<Verifier>,
        metrics: &Metrics,
        database: Option<&Arc<Db>>,
    ) -> Result<(Generation, Policy), ConfigErrors> {
        // Taken before anything is read: a change racing the read is seen next poll.
        let loaded_files = fingerprint(&watched_files(&config));
        let secrets = config.secrets()?;
        let keys: Arc<dyn KeyBackend> = match database {
            Some(db) => Arc::new(PgKeys::new(Arc::clone(db))),
            None => Arc::new(FileKeys::new(&config.clients.keys_file)),
        };
        let generation = Generation {
            config,
            secrets,
            keys,
            loaded_files,
        };
        let keys = generation
            .key_backend()
            .load()
            .await
            .map_err(|e| keys_errors(&generation.config, e))?;
        let store = KeyStore::new(
            keys,
            generation.config.clients.verify_cache_ttl,
            Arc::clone(verifier),
        );
        let policy = generation.policy_with_keys(store, metrics);
        Ok((generation, policy))
    }

    /// The proxy policy of this generation with `keys`.
    pub fn policy_with_keys(&self, keys: KeyStore, metrics: &Metrics) -> Policy {
        let c = &self.config;
        let names: Vec<&str> = c.routes.routes().iter().map(|r| r.name.as_str()).collect();
        Policy {
            generation: next_generation(),
            routes: c.routes.clone(),
            keys,
            admin_authorization: self.credential().authorization,
            request_timeout: c.confluence.request_timeout,
            body_idle_timeout: c.limits.body_idle_timeout,
            per_client_rps: c.limits.per_client_rps,
            upstream_backoff: c.limits.upstream_backoff,
            public_origin: c
                .listen
                .public_url
                .as_ref()
                .map(|u| crate::proxy::Replacement::new(u.to_string())),
            rewrite_json: c.confluence.rewrite_json,
            counters: metrics.route_counters(&names),
        }
    }

    /// Where this generation's keys live.
    pub fn key_backend(&self) -> Arc<dyn KeyBackend> {
        Arc::clone(&self.keys)
    }

    pub fn credential(&self) -> AdminCredential {
        AdminCredential {
            authorization: confluence::admin_authorization(
                &self.config.confluence.email,
                self.secrets.api_token.expose(),
            ),
            request_timeout: self.config.confluence.request_timeout,
        }
    }

    pub fn admin_key_settings(&self) -> admin_key::Settings {
        admin_key::Settings {
            policy: self.config.admin_key.clone(),
            wait_bound: self.config.confluence.request_timeout,
        }
    }

    /// This replica's name.
    pub fn replica(&self) -> String {
        self.config
            .state
            .as_ref()
            .map_or_else(crate::config::host_name, |s| s.replica.clone())
    }

    pub fn startup_record(&self, recovery: &Recovery) -> Encoded {
        let c = &self.config;
        record::encode(
            "startup",
            &record::Startup {
                version: env!("CARGO_PKG_VERSION"),
                pid: std::process::id(),
                config: &c.file.display().to_string(),
                upstream: &c.confluence.base_url(),
                admin_account_email: &c.confluence.email,
                torn_line_cut_bytes: recovery.torn_bytes,
                replica: &self.replica(),
            },
        )
    }

    pub fn shutdown_record(&self) -> Encoded {
        record::encode(
            "shutdown",
            &record::Shutdown {
                pid: std::process::id(),
                replica: &self.replica(),
            },
        )
    }
}

/// The files whose changes trigger a reload.
pub(super) fn watched_files(config: &Config) -> Vec<PathBuf> {
    let mut files = vec![config.file.clone()];
    // Empty in cluster mode: the keys are in the database.
    if !config.clients.keys_file.as_os_str().is_empty() {
        files.push(config.clients.keys_file.clone());
    }
    if let Some(tls) = &config.listen.tls {
        files.push(tls.cert.clone());
        files.push(tls.key.clone());
    }
    files
}

fn keys_errors(config: &Config, e: KeysError) -> ConfigErrors {
    match e {
        KeysError::File(errors) => errors,
        other if config.clients.keys_file.as_os_str().is_empty() => {
            ConfigErrors::single(&config.file, "state.postgres", other.to_string())
        }
        other => ConfigErrors::single(&config.clients.keys_file, "", other.to_string()),
    }
}

/// Keys created, revoked, regenerated (new hash), re-validated or removed between
/// two generations.
pub(super) fn key_changes(old: &KeyStore, new: &KeyStore) -> Vec<KeyChange> {
    let before: HashMap<&str, _> = old.keys().map(|k| (k.client_id.as_str(), k)).collect();
    let mut changes = Vec::new();
    let mut push = |action, client_id: &str, id: &str| {
        changes.push(KeyChange {
            action,
            client_id: client_id.to_owned(),
            key_id: id.to_owned(),
        });
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
