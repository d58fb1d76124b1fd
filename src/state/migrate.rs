//! The schema, as numbered migrations that only ever add: applied in order, each
//! in the same transaction as its row in `keygate_schema`, under an advisory
//! lock so that replicas starting together apply each one once. A database whose
//! schema is newer than this keygate knows is refused, never "fixed".

use tokio_postgres::Client;

use super::DbError;

pub struct Migration {
    pub version: i32,
    pub description: &'static str,
    sql: &'static str,
}

/// Every migration, oldest first. Never edit one that has shipped: add another.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "API keys and the audit trail",
        sql: r#"
CREATE TABLE keygate_keys (
    client_id   text PRIMARY KEY,
    id          text NOT NULL UNIQUE,
    name        text NOT NULL,
    secret_hash text NOT NULL,
    roles       text[] NOT NULL,
    expiration  text,
    is_valid    boolean NOT NULL,
    created     text,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
-- Bumped by every change to keygate_keys: replicas poll it.
CREATE TABLE keygate_keys_version (
    id      int PRIMARY KEY CHECK (id = 1),
    version bigint NOT NULL
);
INSERT INTO keygate_keys_version VALUES (1, 0);
-- One row per audit record; `line` is the record exactly as hashed.
CREATE TABLE keygate_audit (
    seq       bigint PRIMARY KEY,
    ts        timestamptz NOT NULL,
    event     text NOT NULL,
    replica   text NOT NULL,
    client_id text,
    route     text,
    path      text,
    line      text NOT NULL
);
CREATE INDEX keygate_audit_ts ON keygate_audit (ts);
CREATE INDEX keygate_audit_client_ts ON keygate_audit (client_id, ts);
-- The chain's head: writers serialise on this row.
CREATE TABLE keygate_audit_head (
    id   int PRIMARY KEY CHECK (id = 1),
    seq  bigint NOT NULL,
    hash text NOT NULL
);
INSERT INTO keygate_audit_head
    VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
"#,
    },
    Migration {
        version: 2,
        description: "one admin-key window for the cluster",
        sql: r#"
-- The admin key as the cluster knows it, and who may call the vendor's API.
-- Times are the database server's clock; replicas compare them only with
-- clock_timestamp(), never with their own clocks.
CREATE TABLE keygate_admin_key (
    id                  int PRIMARY KEY CHECK (id = 1),
    account_id          text,
    -- expirationTime as Confluence reported it (its clock).
    confluence_expires  text,
    deadline_at         timestamptz,
    refresh_at          timestamptz,
    checked_at          timestamptz,
    changed_at          timestamptz NOT NULL,
    changed_by          text,
    lease_holder        text,
    lease_until         timestamptz,
    hold_until          timestamptz,
    hold_reason         text,
    hold_fatal          boolean NOT NULL DEFAULT false,
    upstream_hold_until timestamptz
);
INSERT INTO keygate_admin_key (id, changed_at) VALUES (1, now());
-- Each replica's heartbeat and last bypass request.
CREATE TABLE keygate_replicas (
    replica     text PRIMARY KEY,
    started_at  timestamptz NOT NULL,
    heartbeat   timestamptz NOT NULL,
    last_bypass timestamptz,
    stopped     boolean NOT NULL DEFAULT false
);
"#,
    },
];

/// The schema version this keygate needs.
pub const LATEST: i32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// `pg_advisory_xact_lock` key: "keygate" in ASCII.
const LOCK: i64 = 0x006b_6579_6761_7465;

/// The schema version of the database: 0 before the first migration.
pub async fn version(client: &Client) -> Result<i32, DbError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('keygate_schema') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let row = client
        .query_one("SELECT coalesce(max(version), 0) FROM keygate_schema", &[])
        .await?;
    Ok(row.get(0))
}

/// Refuses a schema other than `LATEST`, saying what to do.
pub async fn check(client: &Client) -> Result<(), DbError> {
    explain(version(client).await?)
}

fn explain(found: i32) -> Result<(), DbError> {
    if found > LATEST {
        Err(DbError::Schema(format!(
            "the database's keygate schema is version {found}, newer than this keygate knows ({LATEST}): upgrade keygate"
        )))
    } else if found < LATEST {
        Err(DbError::Schema(format!(
            "the database's keygate schema is version {found}, this keygate needs {LATEST}: run `keygate db migrate --config FILE`"
        )))
    } else {
        Ok(())
    }
}

/// Applies the migrations the database lacks; returns those applied.
pub async fn migrate(client: &mut Client) -> Result<Vec<&'static Migration>, DbError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK])
        .await?;
    let fresh: bool = tx
        .query_one("SELECT to_regclass('keygate_schema') IS NULL", &[])
        .await?
        .get(0);
    if fresh {
        tx.batch_execute(
            "CREATE TABLE keygate_schema (
                version     int PRIMARY KEY,
                description text NOT NULL,
                applied_at  timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await?;
    }
    let found: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM keygate_schema", &[])
        .await?
        .get(0);
    if found > LATEST {
        explain(found)?;
    }
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| m.version > found) {
        tx.batch_execute(m.sql).await.map_err(|e| {
            DbError::Schema(format!(
                "migration {} ({}) failed: {}",
                m.version,
                m.description,
                super::db::describe(&e)
            ))
        })?;
        tx.execute(
            "INSERT INTO keygate_schema (version, description) VALUES ($1, $2)",
            &[&m.version, &m.description],
        )
        .await?;
        applied.push(m);
    }
    tx.commit().await?;
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_one_by_one_and_only_add() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1);
            let sql = m.sql.to_ascii_uppercase();
            for destructive in ["DROP ", "TRUNCATE", "DELETE ", "ALTER TABLE"] {
                assert!(
                    !sql.contains(destructive),
                    "migration {}: {destructive}",
                    m.version
                );
            }
        }
    }

    #[test]
    fn schema_versions_are_explained() {
        assert!(explain(LATEST).is_ok());
        let older = explain(LATEST - 1).unwrap_err().to_string();
        assert!(older.contains("keygate db migrate"), "{older}");
        let newer = explain(LATEST + 1).unwrap_err().to_string();
        assert!(newer.contains("upgrade keygate"), "{newer}");
    }
}
