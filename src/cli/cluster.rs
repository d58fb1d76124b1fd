//! The commands that know where a configuration keeps its state: keys (file or
//! database), `db migrate|status`, and the audit trail in the database
//! (`audit verify --postgres`, `audit export`, `audit search`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use super::{load, with_runtime};
use crate::audit::search::Filter;
use crate::client_keys::cli::{execute, KeysAction, Made};
use crate::client_keys::store::FileKeys;
use crate::config::{AuditSink, Config, PostgresSettings};
use crate::state::keys::PgKeys;
use crate::state::{migrate, Db};

const FILE_NOTE: &str =
    "takes effect when keygate reloads (SIGHUP, or within seconds as it watches the file)";
const DATABASE_NOTE: &str =
    "in force on every replica within about two seconds (they poll the database every second)";

fn postgres(config: &Config) -> Option<(&PostgresSettings, &str)> {
    let state = config.state.as_ref()?;
    Some((state.postgres.as_ref()?, state.replica.as_str()))
}

/// Connects to the configuration's database; `Ok(None)` without `state.postgres`.
/// With `schema_current`, brings the schema to this version as `keygate run`
/// would (or refuses, with `apply_migrations: false`).
async fn connect(
    config: &Config,
    schema_current: bool,
) -> Result<Option<(Arc<Db>, tokio_postgres::Client)>, String> {
    let Some((pg, replica)) = postgres(config) else {
        return Ok(None);
    };
    let url = pg
        .url
        .resolve(&config.file, &crate::config::process_env)
        .map_err(|e| e.to_string())?;
    let db = Db::new(pg, &url, replica).map_err(|e| e.to_string())?;
    let client = db.connect().await.map_err(|e| e.to_string())?;
    let mut client = client;
    if schema_current && pg.apply_migrations {
        migrate::migrate(&mut client)
            .await
            .map_err(|e| e.to_string())?;
    } else if schema_current {
        migrate::check(&client).await.map_err(|e| e.to_string())?;
    }
    Ok(Some((db, client)))
}

fn needs_database(command: &str) -> String {
    format!("keygate {command}: the configuration has no state.postgres (this works on the database of cluster mode)")
}

/// Loads the configuration, connects to its database (without touching the
/// schema) and runs `f` with the connection: the shape of every command that
/// only works in cluster mode.
fn on_database<F, Fut>(config_path: &Path, command: &str, f: F) -> ExitCode
where
    F: FnOnce(tokio_postgres::Client) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let config = match load(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    with_runtime(|| async move {
        let (_, client) = connect(&config, false)
            .await?
            .ok_or_else(|| needs_database(command))?;
        f(client).await
    })
}

/// `keygate keys ...`: on the keys file, or on the database — where every
/// change is also recorded in the shared audit trail.
pub(super) fn keys(config_path: &Path, action: KeysAction) -> ExitCode {
    let config = match load(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    with_runtime(|| async move {
        let Some((db, mut client)) = connect(&config, true).await? else {
            let keys = FileKeys::new(&config.clients.keys_file);
            return execute(action, &keys, FILE_NOTE).await.map(drop);
        };
        let keys = PgKeys::new(db);
        let made: Vec<Made> = match action {
            KeysAction::Import { file } => {
                let (read, _) = crate::client_keys::file::read(&file).map_err(|e| e.to_string())?;
                let imported = keys.import(read.keys).await.map_err(|e| e.to_string())?;
                println!(
                    "imported {} key(s) from {} into the database; {DATABASE_NOTE}",
                    imported.len(),
                    file.display()
                );
                imported
                    .iter()
                    .map(|e| ("import", e.client_id.clone(), e.id.clone()))
                    .collect()
            }
            other => execute(other, &keys, DATABASE_NOTE).await?,
        };
        if made.is_empty() {
            return Ok(());
        }
        let principal = format!(
            "keygate keys (command line) on {}",
            crate::config::host_name()
        );
        let records: Vec<_> = made
            .iter()
            .map(|(action, client_id, key_id)| {
                crate::audit::record::encode(
                    "key_management",
                    &crate::audit::record::KeyManagement {
                        action,
                        client_id,
                        key_id,
                        principal: &principal,
                    },
                )
            })
            .collect();
        let replica = postgres(&config).map_or("", |(_, r)| r);
        let ts = crate::rfc3339::format_millis(std::time::SystemTime::now());
        crate::state::audit::append(&mut client, replica, &ts, &records, true)
            .await
            .map_err(|e| {
                format!("the change was made, but recording it in the audit trail failed: {e}")
            })?;
        Ok(())
    })
}

pub(super) fn migrate(config_path: &Path) -> ExitCode {
    on_database(config_path, "db migrate", |mut client| async move {
        let applied = migrate::migrate(&mut client)
            .await
            .map_err(|e| e.to_string())?;
        if applied.is_empty() {
            println!("the schema is current (version {})", migrate::LATEST);
        }
        for m in applied {
            println!("applied migration {}: {}", m.version, m.description);
        }
        Ok(())
    })
}

pub(super) fn status(config_path: &Path) -> ExitCode {
    on_database(config_path, "db status", |client| async move {
        let found = migrate::version(&client).await.map_err(|e| e.to_string())?;
        println!(
            "schema version {found}; this keygate needs {}",
            migrate::LATEST
        );
        migrate::check(&client).await.map_err(|e| e.to_string())
    })
}

pub(super) fn audit_verify(config_path: &Path) -> ExitCode {
    on_database(
        config_path,
        "audit verify --postgres",
        |client| async move {
            let report = crate::state::audit::verify(&client).await?;
            match (report.first_seq, report.last_seq) {
                (Some(a), Some(b)) => {
                    print!(
                        "ok: {} records checked in the database, seq {a}..{b}",
                        report.records
                    );
                    if a > 1 {
                        print!(" (the chain starts at seq {a}: earlier records were removed)");
                    }
                    println!();
                }
                _ => println!("ok: the database's trail is empty"),
            }
            Ok(())
        },
    )
}

pub(super) fn audit_export(config_path: &Path, from_seq: u64, out: Option<&Path>) -> ExitCode {
    let out = out.map(Path::to_path_buf);
    on_database(config_path, "audit export", |client| async move {
        let mut writer: Box<dyn std::io::Write> = match &out {
            Some(path) => Box::new(std::io::BufWriter::new(
                std::fs::File::create(path)
                    .map_err(|e| format!("{}: cannot create: {e}", path.display()))?,
            )),
            None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
        };
        let n = crate::state::audit::export(&client, from_seq, writer.as_mut()).await?;
        drop(writer);
        if let Some(path) = &out {
            eprintln!("exported {n} records to {}", path.display());
        }
        Ok(())
    })
}

pub(super) fn audit_search(
    config_path: &Path,
    paths: &[PathBuf],
    filter: &Filter,
    limit: usize,
    json: bool,
) -> ExitCode {
    let lines = if paths.is_empty() {
        let config = match load(config_path) {
            Ok(c) => c,
            Err(code) => return code,
        };
        match config.audit.as_ref().map(|a| a.sink.clone()) {
            Some(AuditSink::File(path)) => {
                let dir = path
                    .parent()
                    .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
                crate::audit::search::search_files(&[dir], filter, limit)
            }
            Some(AuditSink::Database) => {
                let filter = filter.clone();
                let mut found = Vec::new();
                let code = with_runtime(|| async {
                    let (_, client) = connect(&config, false)
                        .await?
                        .ok_or_else(|| needs_database("audit search"))?;
                    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
                    found = crate::state::audit::search(&client, &filter, limit).await?;
                    Ok(())
                });
                if code != ExitCode::SUCCESS {
                    return code;
                }
                Ok(found)
            }
            Some(AuditSink::Stdout) => Err(format!(
                "{}: audit.path is standard output: search the log pipeline, or give audit files",
                config.file.display()
            )),
            None => Err(format!("{}: no audit section", config.file.display())),
        }
    } else {
        crate::audit::search::search_files(paths, filter, limit)
    };
    match lines {
        Ok(lines) => {
            print_records(&lines, json);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

fn print_records(lines: &[String], json: bool) {
    if json {
        for line in lines {
            println!("{line}");
        }
        return;
    }
    println!(
        "{:<8} {:<24} {:<14} {:<15} {:<6} {:<34} {:<7} {:<40} {:<14} STATUS",
        "SEQ", "TS", "REPLICA", "EVENT", "PHASE", "CLIENT_ID", "METHOD", "PATH", "ROUTE"
    );
    for line in lines {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let text = |k: &str| match v.get(k) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Null) | None => "-".into(),
            Some(other) => other.to_string(),
        };
        let event = match v.get("admin_key") {
            Some(serde_json::Value::Bool(true)) => format!("{} (bypass)", text("event")),
            _ => text("event"),
        };
        println!(
            "{:<8} {:<24} {:<14} {:<15} {:<6} {:<34} {:<7} {:<40} {:<14} {}",
            text("seq"),
            text("ts"),
            text("replica"),
            event,
            text("phase"),
            text("client_id"),
            text("method"),
            text("path"),
            text("route"),
            text("status"),
        );
    }
}

/// `check --probe` in cluster mode: the database answers, its schema is the
/// one this keygate needs; the number of keys in it.
pub(super) fn probe_database(config: &Config) -> Result<Option<String>, String> {
    if postgres(config).is_none() {
        return Ok(None);
    }
    let mut found = String::new();
    let code = with_runtime(|| async {
        let (db, client) = connect(config, false).await?.ok_or("no database")?;
        let version = migrate::version(&client).await.map_err(|e| e.to_string())?;
        migrate::check(&client).await.map_err(|e| e.to_string())?;
        let keys = crate::client_keys::store::KeyBackend::list(&PgKeys::new(db))
            .await
            .map_err(|e| e.to_string())?;
        found = format!(
            "database: reachable, schema version {version} (current), {} key(s)",
            keys.len()
        );
        Ok(())
    });
    if code == ExitCode::SUCCESS {
        Ok(Some(found))
    } else {
        Err("the database check failed (above)".into())
    }
}
