//! The wiring: `App` binds listeners and starts keygate's parts from a validated
//! `Config`; `Control` reloads and inspects it while it runs. This is the only
//! module that knows every part; the parts know nothing of it.

mod generation;
mod reload;
pub mod settings;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_rustls::TlsAcceptor;

use crate::admin_key::{AdminKeyEvent, AdminKeys};
use crate::audit::{record, Audit, AuditThread, Recovery};
use crate::client_keys::store::{BoxFuture, KeyBackend};
use crate::client_keys::Verifier;
use crate::config::{Config, ConfigErrors, Secret};
use crate::confluence::{AdminCredential, Upstream, UpstreamAdminApi};
use crate::log_sink::LogSink;
use crate::metrics::Metrics;
use crate::ops::{Change, KeyChangeGuard, OpsHandler, OpsHost};
use crate::proxy::{Parts, Policy, Proxy, Site};
use crate::readiness::Readiness;
use crate::server::{self, ServeOptions};
use crate::state::{Db, DbError};
use crate::tls;
pub use generation::Generation;

/// Why keygate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot start the audit writer: {0}")]
    Audit(std::io::Error),
    #[error("state.postgres: {0}")]
    Database(#[from] DbError),
    #[error("cannot listen on {address} ({field}): {source}")]
    Bind {
        field: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Everything a running keygate shares between its parts and `Control`.
struct Shared {
    proxy: Arc<Proxy>,
    generation: ArcSwap<Generation>,
    verifier: Arc<Verifier>,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    admin_keys: AdminKeys,
    audit: Option<Audit>,
    cert: Option<Arc<tls::ReloadingCert>>,
    credential: Arc<ArcSwap<AdminCredential>>,
    /// The shared state of cluster mode.
    db: Option<Arc<Db>>,
    /// Held by every reload and by key changes (so each is recorded under the
    /// caller that made it, and generations are stored in the order read).
    reload_lock: Arc<Mutex<()>>,
}

/// A handle on a running (or about to run) keygate: reload, inspect.
#[derive(Clone)]
pub struct Control {
    shared: Arc<Shared>,
}

impl Control {
    /// The generation in force.
    pub fn generation(&self) -> Arc<Generation> {
        self.shared.generation.load_full()
    }

    /// The proxy's policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.shared.proxy.policy.load_full()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.shared.metrics)
    }

    pub fn readiness(&self) -> Arc<Readiness> {
        Arc::clone(&self.shared.readiness)
    }

    pub fn admin_keys(&self) -> AdminKeys {
        self.shared.admin_keys.clone()
    }

    /// How many argon2 verifications have run since start.
    pub fn argon2_runs(&self) -> u64 {
        self.shared.verifier.runs()
    }

    /// Replaces the key store of the current generation (benchmarks compare
    /// verification strategies in one process this way).
    pub fn set_key_store(&self, keys: crate::client_keys::KeyStore) {
        let generation = self.generation();
        let replaced = generation.policy_with_keys(keys, &self.shared.metrics);
        self.shared.proxy.policy.store(Arc::new(replaced));
    }

    /// Re-reads config, keys and the listener's certificate; applies them only
    /// if all is valid (a bad certificate keeps the old one, logged). Reading
    /// happens on the blocking pool, never on a request's thread.
    pub async fn reload(&self, trigger: &str) -> Result<(), ConfigErrors> {
        let _guard = self.shared.reload_lock.lock().await;
        self.reload_locked(trigger, None).await
    }

    /// Re-reads the keys alone (cluster mode: another replica or `keygate keys`
    /// changed them, and recorded the change). A failed read keeps the keys in
    /// force.
    pub async fn reload_keys(&self) -> Result<(), crate::client_keys::edit::KeysError> {
        let _guard = self.shared.reload_lock.lock().await;
        let generation = self.generation();
        let keys = generation.key_backend().load().await?;
        let store = crate::client_keys::KeyStore::new(
            keys,
            generation.config.clients.verify_cache_ttl,
            Arc::clone(&self.shared.verifier),
        );
        let policy = generation.policy_with_keys(store, &self.shared.metrics);
        tracing::info!(keys = policy.keys.len(), "keys reloaded from the database");
        self.shared.proxy.policy.store(Arc::new(policy));
        Ok(())
    }

    /// A reload while holding the lock; `recorded` are key changes already
    /// written to the trail (by the key API), so they are not recorded again.
    async fn reload_locked(
        &self,
        trigger: &str,
        recorded: Option<&[Change]>,
    ) -> Result<(), ConfigErrors> {
        let shared = &self.shared;
        if let Some(cert) = shared.cert.clone() {
            let reloaded = tokio::task::spawn_blocking(move || cert.reload()).await;
            if let Ok(Err(e)) = reloaded {
                tracing::error!(trigger, error = %e, "TLS certificate reload refused; the previous one stays");
            }
        }
        let old = self.generation();
        let file = old.config.file.clone();
        let loaded = tokio::task::spawn_blocking(move || crate::config::load(&file))
            .await
            .map_err(|e| ConfigErrors::single(&old.config.file, "", format!("reload failed: {e}")))
            .and_then(|r| r);
        let built = match loaded {
            Ok(config) => {
                Generation::build(
                    config,
                    &shared.verifier,
                    &shared.metrics,
                    shared.db.as_ref(),
                )
                .await
            }
            Err(e) => Err(e),
        };
        match built {
            Ok((new, policy)) => {
                shared.metrics.config_reload(true);
                for field in settings::restart_only_changes(&old.config, &new.config) {
                    tracing::warn!(
                        field,
                        "changed in the config file; takes effect after a restart"
                    );
                }
                tracing::info!(
                    trigger,
                    routes = new.config.routes.routes().len(),
                    keys = policy.keys.len(),
                    "configuration reloaded"
                );
                shared.admin_keys.set_settings(new.admin_key_settings());
                shared.credential.store(Arc::new(new.credential()));
                if let (Some(audit), Some(settings)) = (&shared.audit, &new.config.audit) {
                    audit.set_settings(settings.clone());
                    audit.record(record::encode(
                        "config_reload",
                        &record::ConfigReload {
                            result: "ok",
                            trigger,
                            errors: Vec::new(),
                        },
                    ));
                    if recorded.is_none() {
                        let old_policy = shared.proxy.policy.load();
                        for change in generation::key_changes(&old_policy.keys, &policy.keys) {
                            let principal = format!(
                                "keys file (keygate keys or an edit), noticed on {trigger}"
                            );
                            audit.record(record::encode(
                                "key_management",
                                &record::KeyManagement {
                                    action: change.action,
                                    client_id: &change.client_id,
                                    key_id: &change.key_id,
                                    principal: &principal,
                                },
                            ));
                        }
                    }
                }
                shared.proxy.policy.store(Arc::new(policy));
                shared.generation.store(Arc::new(new));
                Ok(())
            }
            Err(errors) => {
                shared.metrics.config_reload(false);
                for e in &errors.0 {
                    tracing::error!(trigger, error = %e, "reload refused; the previous configuration stays in force");
                }
                if let Some(audit) = &shared.audit {
                    // The fields in error, not the messages: a message may quote a value.
                    let fields = errors
                        .0
                        .iter()
                        .map(|e| format!("{}: {}", e.file, e.field))
                        .collect();
                    audit.record(record::encode(
                        "config_reload",
                        &record::ConfigReload {
                            result: "error",
                            trigger,
                            errors: fields,
                        },
                    ));
                }
                Err(errors)
            }
        }
    }
}

impl OpsHost for Control {
    fn not_ready(&self) -> Vec<String> {
        self.shared.readiness.reasons()
    }

    fn metrics(&self) -> (String, &'static str) {
        (self.shared.metrics.render(), Metrics::CONTENT_TYPE)
    }

    fn key_api(&self) -> Option<(Secret, Arc<dyn KeyBackend>)> {
        let generation = self.generation();
        let token = generation.secrets.admin_token.clone()?;
        Some((token, generation.key_backend()))
    }

    fn changing_keys(&self) -> BoxFuture<'_, KeyChangeGuard> {
        Box::pin(
            async move { KeyChangeGuard(Arc::clone(&self.shared.reload_lock).lock_owned().await) },
        )
    }

    fn keys_changed(
        &self,
        guard: KeyChangeGuard,
        principal: String,
        changes: Vec<Change>,
    ) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(audit) = &self.shared.audit {
                for change in &changes {
                    audit.record(record::encode(
                        "key_management",
                        &record::KeyManagement {
                            action: change.action,
                            client_id: &change.client_id,
                            key_id: &change.key_id,
                            principal: &principal,
                        },
                    ));
                }
            }
            // A refused reload keeps the old keys and is logged.
            let _ = self.reload_locked(&principal, Some(&changes)).await;
            drop(guard);
        })
    }
}

/// keygate with its listeners bound, not yet serving.
pub struct App {
    control: Control,
    audit: Option<(AuditThread, Recovery)>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    ops_listener: Option<TcpListener>,
    options: ServeOptions,
}

async fn bind(field: &'static str, address: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| StartError::Bind {
            field,
            address,
            source,
        })
}

impl App {
    pub async fn bind(config: Config) -> Result<App, StartError> {
        let metrics = Arc::new(Metrics::new());
        let readiness = Arc::new(Readiness::default());
        let verifier = Arc::new(Verifier::default());
        let db = match &config.state {
            Some(crate::config::StateSettings {
                replica,
                postgres: Some(pg),
            }) => Some(open_database(&config, pg, replica).await?),
            _ => None,
        };
        let (generation, policy) =
            Generation::build(config, &verifier, &metrics, db.as_ref()).await?;
        let config = &generation.config;
        let upstream = Upstream::new(&config.confluence)?;
        let cert = match &config.listen.tls {
            Some(files) => Some(tls::ReloadingCert::load(&files.cert, &files.key)?),
            None => None,
        };
        let tls = match &cert {
            Some(cert) => Some(TlsAcceptor::from(tls::server_config_with(Arc::clone(
                cert,
            ))?)),
            None => None,
        };
        let listener = bind("listen.address", config.listen.address).await?;
        let ops_listener = match &config.ops {
            Some(ops) => Some(bind("ops.address", ops.address).await?),
            None => None,
        };
        let options = ServeOptions {
            max_connections: config.limits.max_connections as usize,
            header_read_timeout: config.limits.header_read_timeout,
            idle_timeout: config.limits.idle_timeout,
            max_header_bytes: usize::try_from(config.limits.max_header_bytes).unwrap_or(usize::MAX),
            drain_timeout: Duration::from_secs(30),
            metrics: Some(Arc::clone(&metrics)),
        };
        let (audit, audit_thread) = match config.audit.clone() {
            Some(settings) if settings.sink == crate::config::AuditSink::Database => {
                let db = db.clone().ok_or_else(|| {
                    StartError::Audit(std::io::Error::other("no database for the audit trail"))
                })?;
                let (readiness, metrics, replica) = (
                    Arc::clone(&readiness),
                    Arc::clone(&metrics),
                    generation.replica(),
                );
                let started = tokio::task::spawn_blocking(move || {
                    Audit::start_on(settings, readiness, metrics, |shared| {
                        crate::state::audit::PgSink::open(db, replica, shared).map(
                            |(sink, next)| {
                                let sink: Box<dyn crate::audit::writer::Sink> = Box::new(sink);
                                (
                                    sink,
                                    Recovery {
                                        torn_bytes: None,
                                        next_seq: next,
                                    },
                                )
                            },
                        )
                    })
                })
                .await
                .map_err(|e| StartError::Audit(std::io::Error::other(e.to_string())))?
                .map_err(|e| StartError::Audit(std::io::Error::other(e.to_string())))?;
                let (audit, thread, recovery) = started;
                (Some(audit), Some((thread, recovery)))
            }
            Some(settings) => {
                let (audit, thread, recovery) =
                    Audit::start(settings, Arc::clone(&readiness), Arc::clone(&metrics))
                        .map_err(StartError::Audit)?;
                (Some(audit), Some((thread, recovery)))
            }
            None => (None, None),
        };
        let credential = Arc::new(ArcSwap::from_pointee(generation.credential()));
        let api = UpstreamAdminApi {
            upstream: upstream.clone(),
            credential: Arc::clone(&credential),
        };
        // Cluster mode: one admin-key window for all replicas. A call's lease
        // outlasts its GET and POST (each bounded by the request timeout).
        let cluster = db.as_ref().map(|db| {
            let lease_for = config.confluence.request_timeout * 2 + Duration::from_secs(5);
            crate::admin_key::ClusterCoordination::new(
                crate::state::coordination::PgStore::new(Arc::clone(db)),
                &generation.replica(),
                lease_for,
            )
        });
        let admin_keys = match &cluster {
            Some(cluster) => AdminKeys::spawn_with(
                api,
                cluster.clone(),
                generation.admin_key_settings(),
                Arc::clone(&readiness),
                Arc::from(generation.replica()),
            ),
            None => AdminKeys::spawn_with(
                api,
                crate::admin_key::LocalCoordination,
                generation.admin_key_settings(),
                Arc::clone(&readiness),
                Arc::from(generation.replica()),
            ),
        };
        if let Some(audit) = audit.clone() {
            admin_keys.on_event(move |e: &AdminKeyEvent| audit.record(admin_key_record(e)));
        }
        let counted = Arc::clone(&metrics);
        admin_keys.on_event(move |e| counted.admin_key_event(e.action));
        let seconds = admin_keys.clone();
        metrics.set_admin_key_source(move || seconds.seconds_left());
        let site = Site::new(
            config.confluence.scheme.as_str(),
            config.confluence.authority.as_str(),
        );
        let proxy = Arc::new(Proxy::new(Parts {
            policy: Arc::new(ArcSwap::from_pointee(policy)),
            upstream,
            site,
            admin_keys: admin_keys.clone(),
            audit: audit.clone(),
            metrics: Arc::clone(&metrics),
            log: LogSink::get(),
            readiness: Arc::clone(&readiness),
        }));
        if let Some(cluster) = cluster {
            // A Retry-After seen here holds every replica; theirs hold this one.
            let backoff = Arc::clone(&proxy.upstream_backoff);
            cluster.on_upstream_hold(move |until| {
                let now = tokio::time::Instant::now();
                backoff.hold(now, until.saturating_duration_since(now));
            });
            proxy.upstream_backoff.observe(move |after| {
                let cluster = cluster.clone();
                tokio::spawn(async move { cluster.share_upstream_hold(after).await });
            });
        }
        Ok(App {
            control: Control {
                shared: Arc::new(Shared {
                    proxy,
                    generation: ArcSwap::from_pointee(generation),
                    verifier,
                    readiness,
                    metrics,
                    admin_keys,
                    audit,
                    cert,
                    credential,
                    db,
                    reload_lock: Arc::default(),
                }),
            },
            audit: audit_thread,
            listener,
            tls,
            ops_listener,
            options,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn ops_addr(&self) -> Option<SocketAddr> {
        self.ops_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// Serves until `shutdown` completes, then drains in-flight requests.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let shared = Arc::clone(&self.control.shared);
        // The start is on record before the first request is served.
        if let (Some(audit), Some((_, recovery))) = (&shared.audit, &self.audit) {
            let generation = self.control.generation();
            if let Err(e) = audit.durable(generation.startup_record(recovery)).await {
                tracing::error!(error = %e, "could not record the start in the audit trail");
            }
        }
        let (trigger, stop) = server::shutdown_pair();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(server::serve(
            self.listener,
            self.tls,
            Arc::clone(&shared.proxy),
            self.options.clone(),
            stop.clone(),
        ));
        if let Some(listener) = self.ops_listener {
            let ops = OpsHandler {
                host: Arc::new(self.control.clone()),
            };
            let options = ServeOptions {
                metrics: None,
                ..self.options
            };
            tasks.spawn(server::serve(
                listener,
                None,
                Arc::new(ops),
                options,
                stop.clone(),
            ));
        }
        tasks.spawn(reload::watch(self.control.clone(), stop.clone()));
        if let Some(db) = shared.db.clone() {
            tasks.spawn(reload::watch_database_keys(
                self.control.clone(),
                db,
                stop.clone(),
            ));
        }
        tasks.spawn(ticks(Arc::clone(&shared), stop.clone()));
        shutdown.await;
        tracing::info!("shutting down: no new connections, draining in-flight requests");
        trigger.trigger();
        while tasks.join_next().await.is_some() {}
        shared.admin_keys.shutdown().await;
        if let (Some(audit), Some((thread, _))) = (&shared.audit, self.audit) {
            shared.proxy.flush_auth_failure_summaries();
            let generation = self.control.generation();
            let _ = audit.durable(generation.shutdown_record()).await;
            audit.close().await;
            thread.join().await;
        }
        tracing::info!("stopped");
        if let Some(log) = LogSink::get() {
            log.flush(Duration::from_secs(2));
        }
    }
}

/// Connects to the database and brings its schema to this version (or, with
/// `apply_migrations: false`, refuses a schema that is not).
async fn open_database(
    config: &Config,
    pg: &crate::config::PostgresSettings,
    replica: &str,
) -> Result<Arc<Db>, StartError> {
    let url = pg
        .url
        .resolve(&config.file, &crate::config::process_env)
        .map_err(|e| StartError::Config(ConfigErrors(vec![e])))?;
    let db = Db::new(pg, &url, replica)?;
    let mut client = db.connect().await?;
    if pg.apply_migrations {
        for m in crate::state::migrate::migrate(&mut client).await? {
            tracing::info!(
                version = m.version,
                description = m.description,
                "database schema migrated"
            );
        }
    } else {
        crate::state::migrate::check(&client).await?;
    }
    Ok(db)
}

/// The audit writer's periodic work every second, and the summaries of
/// suppressed `auth_failure` records every five.
async fn ticks(shared: Arc<Shared>, mut stop: server::Shutdown) {
    let Some(audit) = shared.audit.clone() else {
        return;
    };
    let mut every = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.wait() => return,
            _ = every.tick() => {
                audit.tick();
                n += 1;
                if n.is_multiple_of(5) {
                    shared.proxy.flush_auth_failure_summaries();
                }
            }
        }
    }
}

fn admin_key_record(e: &AdminKeyEvent) -> crate::audit::Encoded {
    record::encode(
        "admin_key",
        &record::AdminKey {
            action: e.action,
            expires: e.expires,
            account_id: e.account_id.as_deref(),
            reason: &e.reason,
            replica: &e.replica,
        },
    )
}

/// Completes on SIGTERM or SIGINT.
pub async fn termination_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
