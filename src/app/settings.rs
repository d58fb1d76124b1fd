//! The one table of which settings a reload applies and which need a restart.
//! Every field of `Config` is destructured without `..`, so a new field that is
//! not given a row here does not compile.

use crate::config::{
    AdminKeyPolicy, AuditSettings, Clients, Config, Confluence, Limits, Listen, Ops,
    PostgresSettings, StateSettings,
};

/// Whether a reload applies a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// New requests use the new value.
    Live,
    /// Only a restart applies it (listeners, connections and writers made at
    /// start); a reload warns.
    Restart,
}

/// One setting: its name, whether a reload applies it, whether it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub name: &'static str,
    pub apply: Apply,
    pub changed: bool,
}

fn row(name: &'static str, apply: Apply, changed: bool) -> Row {
    Row {
        name,
        apply,
        changed,
    }
}

/// Every setting of the configuration, compared between two generations.
pub fn table(old: &Config, new: &Config) -> Vec<Row> {
    use Apply::{Live, Restart};
    let Config {
        file: _,
        listen: listen_a,
        ops: ops_a,
        confluence: conf_a,
        admin_key: key_a,
        clients: clients_a,
        routes: routes_a,
        audit: audit_a,
        limits: limits_a,
        state: state_a,
    } = old;
    let Config {
        file: _,
        listen: listen_b,
        ops: ops_b,
        confluence: conf_b,
        admin_key: key_b,
        clients: clients_b,
        routes: routes_b,
        audit: audit_b,
        limits: limits_b,
        state: state_b,
    } = new;
    let mut rows = Vec::with_capacity(48);

    let Listen {
        address,
        tls,
        public_url,
    } = listen_a;
    rows.push(row("listen.address", Restart, *address != listen_b.address));
    rows.push(row(
        "listen.tls (file paths)",
        Restart,
        *tls != listen_b.tls,
    ));
    rows.push(row(
        "listen.public_url",
        Live,
        *public_url != listen_b.public_url,
    ));

    let ops = |o: &Option<Ops>| {
        o.as_ref().map(
            |Ops {
                 address,
                 admin_token,
             }| (*address, admin_token.clone()),
        )
    };
    let (oa, ob) = (ops(ops_a), ops(ops_b));
    rows.push(row(
        "ops.address",
        Restart,
        oa.as_ref().map(|o| o.0) != ob.as_ref().map(|o| o.0),
    ));
    rows.push(row(
        "ops.admin_token",
        Live,
        oa.map(|o| o.1) != ob.map(|o| o.1),
    ));

    let Confluence {
        scheme,
        authority,
        email,
        api_token,
        connect_timeout,
        request_timeout,
        ca_file,
        rewrite_json,
    } = conf_a;
    rows.push(row(
        "confluence.base_url",
        Restart,
        *scheme != conf_b.scheme || *authority != conf_b.authority,
    ));
    rows.push(row("confluence.email", Live, *email != conf_b.email));
    rows.push(row(
        "confluence.api_token",
        Live,
        *api_token != conf_b.api_token,
    ));
    rows.push(row(
        "confluence.connect_timeout",
        Restart,
        *connect_timeout != conf_b.connect_timeout,
    ));
    rows.push(row(
        "confluence.request_timeout",
        Live,
        *request_timeout != conf_b.request_timeout,
    ));
    rows.push(row(
        "confluence.ca_file",
        Restart,
        *ca_file != conf_b.ca_file,
    ));
    rows.push(row(
        "confluence.rewrite_json",
        Live,
        *rewrite_json != conf_b.rewrite_json,
    ));

    let AdminKeyPolicy {
        duration_minutes,
        refresh_before,
        idle_disable_after,
        disable_on_shutdown,
    } = key_a;
    rows.push(row(
        "admin_key.duration",
        Live,
        *duration_minutes != key_b.duration_minutes,
    ));
    rows.push(row(
        "admin_key.refresh_before",
        Live,
        *refresh_before != key_b.refresh_before,
    ));
    rows.push(row(
        "admin_key.idle_disable_after",
        Live,
        *idle_disable_after != key_b.idle_disable_after,
    ));
    rows.push(row(
        "admin_key.disable_on_shutdown",
        Live,
        *disable_on_shutdown != key_b.disable_on_shutdown,
    ));

    let Clients {
        keys_file,
        verify_cache_ttl,
    } = clients_a;
    rows.push(row(
        "clients.keys_file",
        Live,
        *keys_file != clients_b.keys_file,
    ));
    rows.push(row(
        "clients.verify_cache_ttl",
        Live,
        *verify_cache_ttl != clients_b.verify_cache_ttl,
    ));

    rows.push(row("routes", Live, routes_a != routes_b));

    let audit = |a: &Option<AuditSettings>| {
        a.as_ref().map(
            |AuditSettings {
                 sink,
                 rotate_size,
                 keep,
                 record_passthrough,
                 write_timeout,
                 bypass_retention,
             }| {
                (
                    sink.clone(),
                    *rotate_size,
                    *keep,
                    *record_passthrough,
                    *write_timeout,
                    *bypass_retention,
                )
            },
        )
    };
    let (aa, ab) = (audit(audit_a), audit(audit_b));
    rows.push(row(
        "audit (section present) and audit.path",
        Restart,
        aa.as_ref().map(|a| &a.0) != ab.as_ref().map(|a| &a.0),
    ));
    let (ra, rb) = (aa.as_ref(), ab.as_ref());
    rows.push(row(
        "audit.rotate_size",
        Live,
        ra.map(|a| a.1) != rb.map(|a| a.1),
    ));
    rows.push(row("audit.keep", Live, ra.map(|a| a.2) != rb.map(|a| a.2)));
    rows.push(row(
        "audit.record_passthrough",
        Live,
        ra.map(|a| a.3) != rb.map(|a| a.3),
    ));
    rows.push(row(
        "audit.write_timeout",
        Live,
        ra.map(|a| a.4) != rb.map(|a| a.4),
    ));
    rows.push(row(
        "audit.bypass_retention",
        Live,
        ra.map(|a| a.5) != rb.map(|a| a.5),
    ));

    let Limits {
        max_connections,
        per_client_rps,
        upstream_backoff,
        header_read_timeout,
        max_header_bytes,
        idle_timeout,
        body_idle_timeout,
    } = limits_a;
    rows.push(row(
        "limits.max_connections",
        Restart,
        *max_connections != limits_b.max_connections,
    ));
    rows.push(row(
        "limits.per_client_rps",
        Live,
        *per_client_rps != limits_b.per_client_rps,
    ));
    rows.push(row(
        "limits.upstream_backoff",
        Live,
        *upstream_backoff != limits_b.upstream_backoff,
    ));
    rows.push(row(
        "limits.header_read_timeout",
        Restart,
        *header_read_timeout != limits_b.header_read_timeout,
    ));
    rows.push(row(
        "limits.max_header_bytes",
        Restart,
        *max_header_bytes != limits_b.max_header_bytes,
    ));
    rows.push(row(
        "limits.idle_timeout",
        Restart,
        *idle_timeout != limits_b.idle_timeout,
    ));
    rows.push(row(
        "limits.body_idle_timeout",
        Live,
        *body_idle_timeout != limits_b.body_idle_timeout,
    ));

    let state = |s: &Option<StateSettings>| {
        s.as_ref().map(|StateSettings { replica, postgres }| {
            let pg = postgres.as_ref().map(
                |PostgresSettings {
                     url,
                     ca_file,
                     pool_size,
                     statement_timeout,
                     apply_migrations,
                 }| {
                    (
                        url.clone(),
                        ca_file.clone(),
                        *pool_size,
                        *statement_timeout,
                        *apply_migrations,
                    )
                },
            );
            (replica.clone(), pg)
        })
    };
    rows.push(row("state", Restart, state(state_a) != state(state_b)));
    rows
}

/// The settings that changed but only apply after a restart.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    table(old, new)
        .into_iter()
        .filter(|r| r.changed && r.apply == Apply::Restart)
        .map(|r| r.name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "listen:\n  address: 127.0.0.1:8080\nconfluence:\n  base_url: https://example.atlassian.net\n  email: a@example.com\n  api_token: t\nroutes:\n  - name: r\n    methods: [GET]\n    path: /wiki/**\n    roles: [\"*\"]\naudit:\n  path: audit.jsonl\n";

    fn load(dir: &std::path::Path, text: &str) -> Config {
        let file = dir.join("k.yaml");
        std::fs::write(&file, text).unwrap();
        crate::config::load(&file).unwrap()
    }

    #[test]
    fn each_change_lands_in_its_row() {
        let dir = tempfile::tempdir().unwrap();
        let load = |text: &str| load(dir.path(), text);
        let base = load(BASE);
        assert!(table(&base, &base).iter().all(|r| !r.changed));
        let cases: &[(&str, &str, &str, Apply)] = &[
            (
                "127.0.0.1:8080",
                "127.0.0.1:8081",
                "listen.address",
                Apply::Restart,
            ),
            ("path: /wiki/**", "path: /wiki/x/**", "routes", Apply::Live),
            (
                "path: audit.jsonl\n",
                "path: audit.jsonl\n  keep: 3\n",
                "audit.keep",
                Apply::Live,
            ),
            (
                "path: audit.jsonl\n",
                "path: audit.jsonl\n  record_passthrough: false\n",
                "audit.record_passthrough",
                Apply::Live,
            ),
            (
                "path: audit.jsonl\n",
                "path: audit.jsonl\n  rotate_size: 1MiB\n",
                "audit.rotate_size",
                Apply::Live,
            ),
            ("email: a@", "email: b@", "confluence.email", Apply::Live),
        ];
        for (from, to, name, apply) in cases {
            let changed = load(&BASE.replacen(from, to, 1));
            let rows: Vec<_> = table(&base, &changed)
                .into_iter()
                .filter(|r| r.changed)
                .collect();
            assert_eq!(rows.len(), 1, "{to}: {rows:?}");
            assert_eq!((rows[0].name, rows[0].apply), (*name, *apply), "{to}");
        }
        let limits = load(&format!(
            "{BASE}limits:\n  max_connections: 10\n  header_read_timeout: 3s\n  max_header_bytes: 16KiB\n"
        ));
        assert_eq!(
            restart_only_changes(&base, &limits),
            [
                "limits.max_connections",
                "limits.header_read_timeout",
                "limits.max_header_bytes"
            ]
        );
    }
}
