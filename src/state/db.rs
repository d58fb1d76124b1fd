//! Connections to the database: dedicated ones (the audit writer's, the
//! admin-key lease's) and a small pool for everything else (keys).
//!
//! Every session runs with `synchronous_commit = on` (a commit returns once
//! the server has flushed it), the configured `statement_timeout`, and an
//! `idle_in_transaction_session_timeout` so that a replica that vanishes inside
//! a transaction cannot hold the audit chain's head for long.

use std::ops::{Deref, DerefMut};
use std::str::FromStr as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::Client;

use super::pg_tls::MakeRustls;
use crate::config::{PostgresSettings, Secret};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DbError {
    #[error("state.postgres.url: {0}")]
    Url(String),
    #[error("cannot reach the database: {0}")]
    Unreachable(String),
    #[error("the database did not answer within {0:?}")]
    Timeout(Duration),
    #[error("database: {0}")]
    Query(String),
    #[error("{0}")]
    Schema(String),
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        if e.is_closed() || e.as_db_error().is_none() && e.code().is_none() {
            DbError::Unreachable(describe(&e))
        } else {
            DbError::Query(describe(&e))
        }
    }
}

/// A database error in one line, with the server's message when there is one.
pub fn describe(e: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    if let Some(db) = e.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    match e.source() {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    }
}

/// How to reach the database, and the pooled connections.
pub struct Db {
    config: tokio_postgres::Config,
    tls: MakeRustls,
    statement_timeout: Duration,
    idle: Mutex<Vec<Client>>,
    permits: Semaphore,
}

impl Db {
    /// Parses the URL (`sslmode=verify-full`/`verify-ca` are read as `require`:
    /// keygate always verifies the server's certificate) and prepares TLS.
    pub fn new(
        settings: &PostgresSettings,
        url: &Secret,
        replica: &str,
    ) -> Result<Arc<Db>, DbError> {
        let url = url
            .expose()
            .replace("sslmode=verify-full", "sslmode=require")
            .replace("sslmode=verify-ca", "sslmode=require");
        // The parser's messages never quote the URL (it may hold a password).
        let mut config = tokio_postgres::Config::from_str(&url).map_err(|e| {
            DbError::Url(format!(
                "expected postgres://user:password@host:port/database[?sslmode=...]: {e}"
            ))
        })?;
        config
            .application_name(format!("keygate {replica}"))
            .connect_timeout(settings.statement_timeout.max(Duration::from_secs(2)))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30));
        let tls = crate::tls::client_config(settings.ca_file.as_deref())
            .map_err(|e| DbError::Url(format!("TLS to the database: {e}")))?;
        Ok(Arc::new(Db {
            config,
            tls: MakeRustls(Arc::new(tls)),
            statement_timeout: settings.statement_timeout,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(settings.pool_size as usize),
        }))
    }

    pub fn statement_timeout(&self) -> Duration {
        self.statement_timeout
    }

    /// A new connection of its own, driven on the current runtime.
    pub async fn connect(&self) -> Result<Client, DbError> {
        let limit = self.statement_timeout.max(Duration::from_secs(2));
        let connecting = self.config.connect(self.tls.clone());
        let (client, connection) = tokio::time::timeout(limit, connecting)
            .await
            .map_err(|_| DbError::Timeout(limit))?
            .map_err(|e| DbError::Unreachable(describe(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %describe(&e), "database connection ended");
            }
        });
        let ms = self.statement_timeout.as_millis();
        let idle_tx = (self.statement_timeout * 2)
            .max(Duration::from_secs(10))
            .as_millis();
        client
            .batch_execute(&format!(
                "SET synchronous_commit = on; SET statement_timeout = {ms}; \
                 SET idle_in_transaction_session_timeout = {idle_tx}; SET TIME ZONE 'UTC'"
            ))
            .await?;
        Ok(client)
    }

    /// A pooled connection; waits for one at most the statement timeout.
    pub async fn get(&self) -> Result<Pooled<'_>, DbError> {
        let permit = tokio::time::timeout(self.statement_timeout, self.permits.acquire())
            .await
            .map_err(|_| DbError::Timeout(self.statement_timeout))?
            .map_err(|_| DbError::Unreachable("the pool is closed".into()))?;
        let reused = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let mut found = None;
            while let Some(client) = idle.pop() {
                if !client.is_closed() {
                    found = Some(client);
                    break;
                }
            }
            found
        };
        let client = match reused {
            Some(client) => client,
            None => self.connect().await?,
        };
        Ok(Pooled {
            client: Some(client),
            db: self,
            _permit: permit,
        })
    }
}

/// A connection lent by the pool; returned when dropped (unless it broke).
pub struct Pooled<'a> {
    client: Option<Client>,
    db: &'a Db,
    _permit: SemaphorePermit<'a>,
}

impl Deref for Pooled<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        // `client` is `Some` until `drop` takes it.
        self.client
            .as_ref()
            .unwrap_or_else(|| unreachable!("taken only by drop"))
    }
}

impl DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client
            .as_mut()
            .unwrap_or_else(|| unreachable!("taken only by drop"))
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            if !client.is_closed() {
                self.db
                    .idle
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(client);
            }
        }
    }
}
