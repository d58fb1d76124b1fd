//! The command line: clap definitions and the small subcommands. User mistakes
//! print one line naming the file, field and what was expected; exit codes are
//! 0 success, 1 invalid input or a failed check, 2 usage errors.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod cluster;
mod explain;

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{format_duration, AuditSink, Config};

#[derive(Parser)]
#[command(
    name = "keygate",
    version,
    about = "Authenticating reverse proxy that holds the Confluence Cloud admin key"
)]
struct Cli {
    /// Log format on standard error: `auto` is text on a terminal, JSON otherwise.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Auto,
    Text,
    Json,
}

#[derive(Args)]
struct ConfigArg {
    /// The configuration file.
    #[arg(long, env = "KEYGATE_CONFIG", default_value = "config/keygate.yaml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Run everything on loopback: a Confluence stand-in, keygate in front of it, demo keys.
    Dev,
    /// Validate the config and keys file without starting; print a summary.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// Also check the site for real: the admin credential, and whether the account
        /// may use admin keys (a one-minute key is enabled and disabled again).
        #[arg(long)]
        probe: bool,
    },
    /// Manage API access keys: in the keys file the configuration names, or in
    /// the database with `state.postgres`.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The database of cluster mode (`state.postgres`).
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// The audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Show how a request would be decided.
    Explain {
        /// The HTTP method, like GET.
        method: String,
        /// The request path, like /wiki/api/v2/pages/42 (a query is ignored for matching).
        path: String,
        /// Decide for this client's roles.
        #[arg(long)]
        client_id: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
        /// Print the decision as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain of audit files (in any order) or of a directory of
    /// them; with --postgres, the chain in the configuration's database.
    Verify {
        #[arg(required_unless_present = "postgres")]
        paths: Vec<PathBuf>,
        /// Verify the trail in the database of --config (state.postgres).
        #[arg(long, conflicts_with = "paths")]
        postgres: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Write the database's trail as JSON Lines, byte for byte as hashed (what
    /// `audit verify FILE` checks).
    Export {
        /// Start at this seq (default: the first record kept).
        #[arg(long, default_value_t = 1)]
        from_seq: u64,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Find records: who made which requests. Reads the files given, or the
    /// trail of --config (its audit files, or its database).
    Search {
        /// Audit files or directories (default: the trail of --config).
        paths: Vec<PathBuf>,
        /// Records of this client_id.
        #[arg(long)]
        client: Option<String>,
        /// Records whose path starts with this.
        #[arg(long)]
        path_prefix: Option<String>,
        /// Records of this route (by name).
        #[arg(long)]
        route: Option<String>,
        /// Records of this event (request, auth_failure, key_management, ...).
        #[arg(long)]
        event: Option<String>,
        /// From this time (RFC 3339, like 2026-11-29T00:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Only requests made with the admin key (the bypass).
        #[arg(long)]
        bypass: bool,
        /// At most this many records.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Print the records as JSON Lines (as stored) instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
enum DbCommand {
    /// Apply the schema migrations the database lacks (keygate applies them at
    /// start unless `state.postgres.apply_migrations: false`).
    Migrate {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print the database's schema version and what this keygate needs.
    Status {
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Add a key; prints client_id and client_secret once.
    Create {
        /// The key's name; it becomes the start of the client_id.
        #[arg(long)]
        name: String,
        /// A role the key holds (repeat for several).
        #[arg(long = "role")]
        roles: Vec<String>,
        /// Expiration time, RFC 3339 (like 2027-06-30T00:00:00Z).
        #[arg(long)]
        expires: Option<String>,
        /// Read a chosen secret from standard input (no echo on a terminal) instead
        /// of generating one.
        #[arg(long)]
        secret_stdin: bool,
        #[command(flatten)]
        config: ConfigArg,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List keys (never secrets or hashes).
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Mark a key invalid; it stops working at the next reload.
    Revoke {
        client_id: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Cluster mode: copy every key of a keys file into the database (all or
    /// none: a client_id or id already there refuses the import).
    Import {
        /// The keys file to import.
        file: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Issue a new secret for the same client_id and mark the key valid.
    Regenerate {
        client_id: String,
        /// Read a chosen secret from standard input instead of generating one.
        #[arg(long)]
        secret_stdin: bool,
        #[command(flatten)]
        config: ConfigArg,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Parses arguments, runs the subcommand, returns the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Run { .. } | Command::Dev => "info",
        _ => "warn",
    };
    init_tracing(cli.log_format, default_level);
    let code = dispatch(cli.command);
    flush_logs();
    code
}

fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::Run { config } => run(&config.config),
        Command::Dev => {
            crate::trim::start();
            with_runtime(|| async { crate::dev::run().await.map_err(|e| e.to_string()) })
        }
        Command::Check {
            config,
            json,
            probe,
        } => check(&config.config, json, probe),
        Command::Explain {
            method,
            path,
            client_id,
            config,
            json,
        } => explain(&config.config, &method, &path, client_id.as_deref(), json),
        Command::Keys { command } => {
            let (config, action) = command.into_action();
            cluster::keys(&config, action)
        }
        Command::Db {
            command: DbCommand::Migrate { config },
        } => cluster::migrate(&config.config),
        Command::Db {
            command: DbCommand::Status { config },
        } => cluster::status(&config.config),
        Command::Audit {
            command:
                AuditCommand::Verify {
                    postgres: true,
                    config,
                    ..
                },
        } => cluster::audit_verify(&config.config),
        Command::Audit {
            command: AuditCommand::Verify { paths, .. },
        } => audit_verify(&paths),
        Command::Audit {
            command:
                AuditCommand::Export {
                    from_seq,
                    out,
                    config,
                },
        } => cluster::audit_export(&config.config, from_seq, out.as_deref()),
        Command::Audit {
            command:
                AuditCommand::Search {
                    paths,
                    client,
                    path_prefix,
                    route,
                    event,
                    since,
                    until,
                    bypass,
                    limit,
                    json,
                    config,
                },
        } => {
            let time = |field: &str, value: Option<String>| {
                value
                    .map(|v| {
                        crate::rfc3339::parse(&v)
                            .map_err(|e| format!("--{field} {v}: expected RFC 3339 ({e})"))
                    })
                    .transpose()
            };
            let filter = match (time("since", since), time("until", until)) {
                (Ok(since), Ok(until)) => crate::audit::search::Filter {
                    client_id: client,
                    path_prefix,
                    route,
                    event,
                    since,
                    until,
                    bypass,
                },
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            cluster::audit_search(&config.config, &paths, &filter, limit, json)
        }
    }
}

impl KeysCommand {
    /// The configuration file and what to do.
    fn into_action(self) -> (PathBuf, crate::client_keys::cli::KeysAction) {
        use crate::client_keys::cli::KeysAction as A;
        match self {
            KeysCommand::Create {
                name,
                roles,
                expires,
                secret_stdin,
                config,
                json,
            } => (
                config.config,
                A::Create {
                    name,
                    roles,
                    expires,
                    secret_stdin,
                    json,
                },
            ),
            KeysCommand::List { config, json } => (config.config, A::List { json }),
            KeysCommand::Revoke { client_id, config } => (config.config, A::Revoke { client_id }),
            KeysCommand::Import { file, config } => (config.config, A::Import { file }),
            KeysCommand::Regenerate {
                client_id,
                secret_stdin,
                config,
                json,
            } => (
                config.config,
                A::Regenerate {
                    client_id,
                    secret_stdin,
                    json,
                },
            ),
        }
    }
}

/// Logs go to standard error through one log thread (`log_sink`), which also
/// writes the access log, so no request ever writes to a terminal or pipe.
fn init_tracing(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let terminal = std::io::stderr().is_terminal();
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !terminal,
    };
    let sink = crate::log_sink::LogSink::global(json);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal && !json)
        .with_writer(sink);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// Waits (briefly) until every log line is written: the process is about to exit.
fn flush_logs() {
    if let Some(sink) = crate::log_sink::LogSink::get() {
        sink.flush(std::time::Duration::from_secs(2));
    }
}

fn with_runtime<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    // One core (a pinned process, a small container): the single-threaded
    // scheduler does the same work without cross-thread hand-offs.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cores == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keygate: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(f()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{message}");
            ExitCode::from(1)
        }
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    crate::config::load(path).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::from(1)
    })
}

fn run(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(errors) = config.secrets() {
        eprintln!("{errors}");
        return ExitCode::from(1);
    }
    crate::trim::start();
    with_runtime(|| async move {
        let app = crate::app::App::bind(config)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(listen = %app.local_addr(), ops = ?app.ops_addr(), "keygate listening");
        app.run(crate::app::termination_signal()).await;
        Ok(())
    })
}

fn audit_verify(paths: &[PathBuf]) -> ExitCode {
    match crate::audit::verify::verify(paths) {
        Ok(report) => {
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(broken) => {
            eprintln!("{broken}");
            ExitCode::from(1)
        }
    }
}

fn check(path: &Path, json: bool, probe: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let secrets = match config.secrets() {
        Ok(s) => s,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(1);
        }
    };
    let in_database = config.clients.keys_file.as_os_str().is_empty();
    let keys = if in_database {
        Vec::new()
    } else {
        match crate::client_keys::file::read(&config.clients.keys_file) {
            Ok((_, keys)) => keys,
            Err(errors) => {
                eprintln!("{errors}");
                return ExitCode::from(1);
            }
        }
    };
    let now = SystemTime::now();
    let usable = keys
        .iter()
        .filter(|k| k.is_valid && k.expiration.is_none_or(|e| e > now))
        .count();
    if json {
        let routes: Vec<_> = config
            .routes
            .routes()
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name,
                    "methods": r.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
                    "path": r.pattern.as_str(),
                    "roles": r.role_names,
                    "admin_key": r.admin_key,
                })
            })
            .collect();
        let summary = serde_json::json!({
            "valid": true,
            "file": path.display().to_string(),
            "listen": config.listen.address.to_string(),
            "tls": config.listen.tls.is_some(),
            "ops": config.ops.as_ref().map(|o| o.address.to_string()),
            "upstream": config.confluence.base_url(),
            "keys": keys.len(),
            "usable_keys": usable,
            "routes": routes,
        });
        println!("{summary}");
    } else {
        print!("{}", summary(path, &config, keys.len(), usable));
    }
    if probe {
        match cluster::probe_database(&config) {
            Ok(Some(found)) => println!("{found}"),
            Ok(None) => {}
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
        }
        return probe_site(config, secrets);
    }
    ExitCode::SUCCESS
}

fn probe_site(config: Config, secrets: crate::config::Secrets) -> ExitCode {
    with_runtime(|| async move {
        let site = config.confluence.base_url();
        let upstream =
            crate::confluence::Upstream::new(&config.confluence).map_err(|e| e.to_string())?;
        let credential = crate::confluence::AdminCredential {
            authorization: crate::confluence::admin_authorization(
                &config.confluence.email,
                secrets.api_token.expose(),
            ),
            request_timeout: config.confluence.request_timeout,
        };
        let api = crate::confluence::UpstreamAdminApi {
            upstream,
            credential: std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(credential)),
        };
        println!("probe of {site}:");
        let findings = crate::admin_key::probe::probe(&api, &site).await;
        for f in &findings {
            println!("  {} {}", if f.ok { "ok  " } else { "FAIL" }, f.text);
        }
        if findings.iter().all(|f| f.ok) {
            Ok(())
        } else {
            Err("the probe found problems (FAIL lines above)".into())
        }
    })
}

fn summary(path: &Path, config: &Config, keys: usize, usable: usize) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "{}: valid", path.display());
    let tls = if config.listen.tls.is_some() {
        "TLS, h2 + http/1.1"
    } else {
        "plain HTTP, h2c + http/1.1"
    };
    let _ = writeln!(s, "  listen      {} ({tls})", config.listen.address);
    match &config.ops {
        Some(ops) => {
            let api = if ops.admin_token.is_some() {
                "key API on"
            } else {
                "key API off"
            };
            let _ = writeln!(s, "  ops         {} ({api})", ops.address);
        }
        None => {
            let _ = writeln!(s, "  ops         off");
        }
    }
    let c = &config.confluence;
    let _ = writeln!(
        s,
        "  upstream    {} as {} (connect {}, request {})",
        c.base_url(),
        c.email,
        format_duration(c.connect_timeout),
        format_duration(c.request_timeout)
    );
    let a = &config.admin_key;
    let idle = a
        .idle_disable_after
        .map_or("never".to_owned(), format_duration);
    let _ = writeln!(
        s,
        "  admin key   {}m, refresh {} before expiry, idle disable {idle}, disable on shutdown {}",
        a.duration_minutes,
        format_duration(a.refresh_before),
        a.disable_on_shutdown
    );
    if config.clients.keys_file.as_os_str().is_empty() {
        let _ = writeln!(
            s,
            "  keys        in the database (state.postgres); `check --probe` counts them"
        );
    } else {
        let _ = writeln!(
            s,
            "  keys        {}: {keys} keys, {usable} usable",
            config.clients.keys_file.display()
        );
    }
    match &config.audit {
        Some(audit) => {
            let sink = match &audit.sink {
                AuditSink::Stdout => "standard output".to_owned(),
                AuditSink::File(p) => p.display().to_string(),
                AuditSink::Database => "the database (state.postgres)".to_owned(),
            };
            let _ = writeln!(
                s,
                "  audit       {sink} (rotate {} bytes, keep {}, passthrough {})",
                audit.rotate_size,
                audit.keep,
                if audit.record_passthrough {
                    "recorded"
                } else {
                    "not recorded"
                }
            );
        }
        None => {
            let _ = writeln!(s, "  audit       off");
        }
    }
    let _ = writeln!(s, "  routes (first admitting route wins; none => 403)");
    for (i, r) in config.routes.routes().iter().enumerate() {
        let methods: Vec<&str> = r.methods.iter().map(|m| m.as_str()).collect();
        let _ = writeln!(
            s,
            "    {:>2}. {:<28} {:<12} {:<36} [{}]{}",
            i + 1,
            r.name,
            methods.join(","),
            r.pattern.as_str(),
            r.role_names.join(", "),
            if r.admin_key { "  BYPASS" } else { "" }
        );
    }
    s
}

fn explain(
    path: &Path,
    method: &str,
    target: &str,
    client_id: Option<&str>,
    json: bool,
) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Ok(method) = method.parse::<http::Method>() else {
        eprintln!("keygate explain: expected an HTTP method like GET, got `{method}`");
        return ExitCode::from(2);
    };
    let key = match client_id {
        None => None,
        Some(id) => {
            let keys = match crate::client_keys::file::read(&config.clients.keys_file) {
                Ok((_, keys)) => keys,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::from(1);
                }
            };
            match keys.into_iter().find(|k| k.client_id == id) {
                Some(k) => Some(k),
                None => {
                    eprintln!(
                        "{}: no key with client_id `{id}`",
                        config.clients.keys_file.display()
                    );
                    return ExitCode::from(1);
                }
            }
        }
    };
    let explanation = explain::explain(
        &config.routes,
        &method,
        target,
        key.as_ref(),
        SystemTime::now(),
    );
    if json {
        println!("{}", explanation.to_json());
    } else {
        print!("{explanation}");
    }
    ExitCode::SUCCESS
}
