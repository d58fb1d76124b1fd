//! keygate: an authenticating reverse proxy in front of Confluence Cloud that holds
//! the admin's credentials and admin key so that internal tools never do.
//!
//! `App::bind` takes a validated `Config`, binds the listeners and returns their
//! addresses; `App::run` serves until a shutdown future completes. Tests and
//! `keygate dev` drive exactly this.

pub mod admin_key;
pub mod audit;
mod audit_fields;
pub mod body;
pub mod cli;
pub mod client_keys;
pub mod config;
pub mod confluence;
pub mod dev;
pub mod error;
pub mod headers;
pub mod metrics;
pub mod ops;
pub mod proxy;
pub mod rfc3339;
pub mod route;
pub mod server;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::admin_key::AdminKeys;
use crate::client_keys::KeyStore;
use crate::config::{Config, ConfigErrors};
use crate::confluence::{Upstream, UpstreamAdminApi};
use crate::ops::{OpsService, Readiness};
use crate::proxy::SiteAdminKeys;
use crate::proxy::{Gateway, Proxy};
use crate::server::ServeOptions;

/// Why keygate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot start the audit writer: {0}")]
    Audit(std::io::Error),
    #[error("cannot listen on {address} ({field}): {source}")]
    Bind {
        field: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
}

impl Gateway {
    /// Builds a generation from a validated config, reading its keys file.
    pub fn build(config: Config, argon2_runs: Arc<AtomicU64>) -> Result<Gateway, ConfigErrors> {
        // Taken before the keys file is read: a change racing the read is seen next poll.
        let loaded_files = config::reload::fingerprint(&watched_files(&config));
        let (_, keys) = client_keys::file::read(&config.clients.keys_file)?;
        let keys = KeyStore::new(keys, config.clients.verify_cache_ttl, argon2_runs);
        let admin_authorization = confluence::admin_authorization(
            &config.confluence.email,
            config.confluence.api_token.expose(),
        );
        Ok(Gateway {
            config,
            keys,
            admin_authorization,
            loaded_files,
        })
    }

    /// The files whose changes trigger a reload.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        watched_files(&self.config)
    }
}

/// A handle on a running (or about to run) keygate: reload, inspect.
#[derive(Clone)]
pub struct Control {
    proxy: Arc<Proxy>,
    argon2_runs: Arc<AtomicU64>,
    pub readiness: Arc<Readiness>,
    /// The listener's certificate, reloaded with everything else.
    cert: Option<Arc<tls::ReloadingCert>>,
}

impl Control {
    pub fn gateway(&self) -> Arc<Gateway> {
        self.proxy.gateway.load_full()
    }

    pub fn metrics(&self) -> Arc<metrics::Metrics> {
        Arc::clone(&self.proxy.metrics)
    }

    pub fn admin_keys(&self) -> Arc<SiteAdminKeys> {
        Arc::clone(&self.proxy.admin_keys)
    }

    /// How many argon2 verifications have run since start.
    pub fn argon2_runs(&self) -> u64 {
        self.argon2_runs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Replaces the key store of the current generation (benchmarks compare
    /// verification strategies in one process this way).
    pub fn set_key_store(&self, keys: KeyStore) {
        let old = self.gateway();
        self.proxy.gateway.store(Arc::new(Gateway {
            config: old.config.clone(),
            keys,
            admin_authorization: old.admin_authorization.clone(),
            loaded_files: old.loaded_files.clone(),
        }));
    }

    /// Re-reads config, keys and the listener's certificate; applies config and
    /// keys only if all is valid (a bad certificate keeps the old one, logged).
    pub fn reload(&self, trigger: &str) -> Result<(), ConfigErrors> {
        if let Some(cert) = &self.cert {
            if let Err(e) = cert.reload() {
                tracing::error!(trigger, error = %e, "TLS certificate reload refused; the previous one stays");
            }
        }
        let old = self.gateway();
        let result = config::load(&old.config.file)
            .and_then(|config| Gateway::build(config, Arc::clone(&self.argon2_runs)));
        match result {
            Ok(new) => {
                self.proxy
                    .metrics
                    .inc("keygate_config_reloads_total", &[("result", "ok")]);
                for field in restart_only_changes(&old.config, &new.config) {
                    tracing::warn!(
                        field,
                        "changed in the config file; takes effect after a restart"
                    );
                }
                tracing::info!(
                    trigger,
                    routes = new.config.routes.routes().len(),
                    keys = new.keys.len(),
                    "configuration reloaded"
                );
                self.proxy.admin_keys.set_policy(
                    new.config.admin_key.clone(),
                    new.config.confluence.request_timeout,
                );
                if let Some(audit) = &self.proxy.audit {
                    audit.record("config_reload", audit_fields::reload_ok(trigger));
                    for change in audit_fields::key_changes(&old.keys, &new.keys, trigger) {
                        audit.record("key_management", change);
                    }
                }
                self.proxy.gateway.store(Arc::new(new));
                Ok(())
            }
            Err(errors) => {
                self.proxy
                    .metrics
                    .inc("keygate_config_reloads_total", &[("result", "error")]);
                for e in &errors.0 {
                    tracing::error!(trigger, error = %e, "reload refused; the previous configuration stays in force");
                }
                if let Some(audit) = &self.proxy.audit {
                    audit.record(
                        "config_reload",
                        audit_fields::reload_error(trigger, &errors),
                    );
                }
                Err(errors)
            }
        }
    }
}

/// Config file, keys file, and the listener's certificate and key.
fn watched_files(config: &Config) -> Vec<PathBuf> {
    let mut files = vec![config.file.clone(), config.clients.keys_file.clone()];
    if let Some(tls) = &config.listen.tls {
        files.push(tls.cert.clone());
        files.push(tls.key.clone());
    }
    files
}

/// Settings that belong to listeners and connections made at start.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.listen.address != new.listen.address || old.listen.tls != new.listen.tls {
        changed.push("listen");
    }
    if old.ops.as_ref().map(|o| o.address) != new.ops.as_ref().map(|o| o.address) {
        changed.push("ops.address");
    }
    let (a, b) = (&old.confluence, &new.confluence);
    if a.scheme != b.scheme
        || a.authority != b.authority
        || a.ca_file != b.ca_file
        || a.connect_timeout != b.connect_timeout
    {
        changed.push("confluence.base_url/ca_file/connect_timeout");
    }
    if old.audit.as_ref().map(|a| &a.sink) != new.audit.as_ref().map(|a| &a.sink) {
        changed.push("audit.path");
    }
    changed
}

/// keygate with its listeners bound, not yet serving.
pub struct App {
    control: Control,
    audit: Option<(audit::AuditThread, audit::writer::Recovery)>,
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
        let argon2_runs = Arc::new(AtomicU64::new(0));
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
        let metrics = Arc::new(metrics::Metrics::default());
        let options = ServeOptions {
            max_connections: config.limits.max_connections as usize,
            header_read_timeout: config.limits.header_read_timeout,
            max_header_bytes: usize::try_from(config.limits.max_header_bytes).unwrap_or(usize::MAX),
            drain_timeout: Duration::from_secs(30),
            connections: Some(Arc::clone(&metrics.open_connections)),
        };
        let readiness = Arc::new(Readiness::default());
        let admin_key_policy = config.admin_key.clone();
        let wait_bound = config.confluence.request_timeout;
        let gateway = Arc::new(arc_swap::ArcSwap::from_pointee(Gateway::build(
            config,
            Arc::clone(&argon2_runs),
        )?));
        let api = UpstreamAdminApi {
            upstream: upstream.clone(),
            gateway: Arc::clone(&gateway),
        };
        let audit_settings = gateway.load().config.audit.clone();
        let (audit, audit_thread) = match audit_settings {
            Some(settings) => {
                let (audit, thread, recovery) =
                    audit::Audit::start(settings, Arc::clone(&readiness), Arc::clone(&metrics))
                        .map_err(StartError::Audit)?;
                (Some(audit), Some((thread, recovery)))
            }
            None => (None, None),
        };
        let admin_keys = AdminKeys::new(api, admin_key_policy, wait_bound, Arc::clone(&readiness));
        if let Some(audit) = audit.clone() {
            admin_keys.on_event(move |e| audit.record("admin_key", audit_fields::admin_key(e)));
        }
        let counted = Arc::clone(&metrics);
        admin_keys.on_event(move |e| {
            let result = if e.action == "failed" { "error" } else { "ok" };
            counted.inc(
                "keygate_admin_key_events_total",
                &[("action", e.action), ("result", result)],
            );
        });
        let proxy = Arc::new(Proxy::new(gateway, upstream, admin_keys, metrics, audit));
        Ok(App {
            control: Control {
                proxy,
                argon2_runs,
                readiness,
                cert,
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
        let (trigger, stop) = server::shutdown_pair();
        let mut tasks = tokio::task::JoinSet::new();
        let proxy = ProxyHandler(Arc::clone(&self.control.proxy));
        tasks.spawn(server::serve(
            self.listener,
            self.tls,
            Arc::new(proxy),
            self.options.clone(),
            stop.clone(),
        ));
        if let Some(listener) = self.ops_listener {
            let ops = OpsService {
                control: self.control.clone(),
            };
            let options = ServeOptions {
                connections: None,
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
        tasks.spawn(config::reload::watch(self.control.clone(), stop.clone()));
        let admin_keys = self.control.admin_keys();
        let mut idle_stop = stop.clone();
        tasks.spawn(async move {
            admin_keys
                .idle_watch(async move { idle_stop.wait().await })
                .await;
        });
        let audit = self.control.proxy.audit.clone();
        if let (Some(audit), Some((_, recovery))) = (&audit, &self.audit) {
            let fields = audit_fields::startup(&self.control.gateway().config, recovery);
            if let Err(e) = audit.durable("startup", fields).await {
                tracing::error!(error = %e, "could not record the start in the audit trail");
            }
            let ticking = audit.clone();
            let mut tick_stop = stop.clone();
            tasks.spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = tick_stop.wait() => return,
                        _ = every.tick() => ticking.tick(),
                    }
                }
            });
        }
        shutdown.await;
        tracing::info!("shutting down: no new connections, draining in-flight requests");
        trigger.trigger();
        while tasks.join_next().await.is_some() {}
        self.control.admin_keys().shutdown().await;
        if let (Some(audit), Some((thread, _))) = (audit, self.audit) {
            let _ = audit.durable("shutdown", audit_fields::shutdown()).await;
            audit.close().await;
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        tracing::info!("stopped");
    }
}

struct ProxyHandler(Arc<Proxy>);

impl server::Handler for ProxyHandler {
    async fn call(
        &self,
        request: http::Request<hyper::body::Incoming>,
        conn: proxy::ConnInfo,
    ) -> http::Response<body::Body> {
        self.0.handle(request, conn).await
    }
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
