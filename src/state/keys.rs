//! API keys in the database (`keygate_keys`), behind the same `KeyBackend` as
//! the keys file, with the same checks: a change is planned by the code that
//! edits the file (ids, client_ids, argon2id hashes), the whole resulting set
//! is validated, and only then written — in one transaction that holds the
//! table against other writers and bumps `keygate_keys_version`.
//!
//! Replicas learn of changes by polling that version (`KeysVersion`) once per
//! `POLL`: a create, revoke or regenerate made anywhere is in force on every
//! replica within `POLL` plus one reload (typically well under two seconds).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::GenericClient;

use super::{Db, DbError};
use crate::client_keys::edit::{self, Issued, KeysError, NewKey, OwnedSelector, Selector};
use crate::client_keys::file::{validate, KeyEntry, KeysFile};
use crate::client_keys::store::{BoxFuture, KeyBackend};
use crate::client_keys::ApiKey;

/// How often replicas look for key changes.
pub const POLL: Duration = Duration::from_secs(1);

/// How messages name this store.
fn store() -> &'static Path {
    Path::new("database table keygate_keys")
}

impl From<DbError> for KeysError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Query(m) => {
                KeysError::Invalid(format!("the database refused the change: {m}"))
            }
            other => KeysError::Unavailable(other.to_string()),
        }
    }
}

fn db_error(e: tokio_postgres::Error) -> KeysError {
    DbError::from(e).into()
}

/// The keys in the database.
#[derive(Clone)]
pub struct PgKeys {
    db: Arc<Db>,
}

impl PgKeys {
    pub fn new(db: Arc<Db>) -> Self {
        PgKeys { db }
    }

    /// Moves a keys file's entries in: all of them, or none if any client_id or
    /// id is already taken or the result would not validate.
    pub async fn import(&self, entries: Vec<KeyEntry>) -> Result<Vec<KeyEntry>, KeysError> {
        self.change(move |file| {
            for e in &entries {
                if let Some(taken) = file
                    .keys
                    .iter()
                    .find(|k| k.client_id == e.client_id || k.id == e.id)
                {
                    return Err(KeysError::Invalid(format!(
                        "key {} ({}) is already in the database as key {} ({}): nothing was imported",
                        e.id, e.client_id, taken.id, taken.client_id
                    )));
                }
            }
            Ok((entries.clone(), entries))
        })
        .await
    }

    /// Reads, plans (on the blocking pool: argon2), validates, writes.
    async fn change<T: Send + 'static>(
        &self,
        plan: impl FnOnce(&KeysFile) -> Result<(Vec<KeyEntry>, T), KeysError> + Send + 'static,
    ) -> Result<T, KeysError> {
        let mut client = self.db.get().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        tx.batch_execute("LOCK TABLE keygate_keys IN SHARE ROW EXCLUSIVE MODE")
            .await
            .map_err(db_error)?;
        let before = KeysFile {
            keys: read_all(&tx).await?,
        };
        let (changed, outcome, before) = tokio::task::spawn_blocking(move || {
            plan(&before).map(|(changed, outcome)| (changed, outcome, before))
        })
        .await
        .map_err(|e| KeysError::Invalid(format!("the key store task failed: {e}")))??;
        let mut after = before.keys;
        for entry in &changed {
            match after.iter_mut().find(|k| k.client_id == entry.client_id) {
                Some(old) => *old = entry.clone(),
                None => after.push(entry.clone()),
            }
        }
        validate(&KeysFile { keys: after }, store()).map_err(KeysError::File)?;
        for e in &changed {
            tx.execute(
                "INSERT INTO keygate_keys
                     (client_id, id, name, secret_hash, roles, expiration, is_valid, created)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (client_id) DO UPDATE SET
                     id = EXCLUDED.id, name = EXCLUDED.name,
                     secret_hash = EXCLUDED.secret_hash, roles = EXCLUDED.roles,
                     expiration = EXCLUDED.expiration, is_valid = EXCLUDED.is_valid,
                     created = EXCLUDED.created, updated_at = now()",
                &[
                    &e.client_id,
                    &e.id,
                    &e.name,
                    &e.secret_hash,
                    &e.roles,
                    &e.expiration,
                    &e.is_valid,
                    &e.created,
                ],
            )
            .await
            .map_err(db_error)?;
        }
        tx.execute(
            "UPDATE keygate_keys_version SET version = version + 1 WHERE id = 1",
            &[],
        )
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok(outcome)
    }
}

async fn read_all(client: &impl GenericClient) -> Result<Vec<KeyEntry>, KeysError> {
    let rows = client
        .query(
            "SELECT id, client_id, name, secret_hash, roles, expiration, is_valid, created
             FROM keygate_keys ORDER BY length(id), id",
            &[],
        )
        .await
        .map_err(db_error)?;
    Ok(rows
        .iter()
        .map(|r| KeyEntry {
            id: r.get(0),
            client_id: r.get(1),
            name: r.get(2),
            secret_hash: r.get(3),
            roles: r.get(4),
            expiration: r.get(5),
            is_valid: r.get(6),
            created: r.get(7),
        })
        .collect())
}

impl KeyBackend for PgKeys {
    fn load(&self) -> BoxFuture<'_, Result<Vec<ApiKey>, KeysError>> {
        Box::pin(async move {
            let client = self.db.get().await?;
            let keys = read_all(&*client).await?;
            validate(&KeysFile { keys }, store()).map_err(KeysError::File)
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<KeyEntry>, KeysError>> {
        Box::pin(async move {
            let client = self.db.get().await?;
            read_all(&*client).await
        })
    }

    fn create(&self, batch: Vec<NewKey>) -> BoxFuture<'_, Result<Vec<Issued>, KeysError>> {
        Box::pin(async move {
            for new in &batch {
                edit::check_new(new)?;
            }
            self.change(move |file| {
                let (_, issued) = edit::plan_create(file, &batch)?;
                let entries = issued.iter().map(|i| i.entry.clone()).collect();
                Ok((entries, issued))
            })
            .await
        })
    }

    fn revoke<'a>(&'a self, which: Selector<'a>) -> BoxFuture<'a, Result<KeyEntry, KeysError>> {
        let which: OwnedSelector = which.owned();
        Box::pin(self.change(move |file| {
            let (_, entry) = edit::plan_revoke(file, which.as_selector(), store())?;
            Ok((vec![entry.clone()], entry))
        }))
    }

    fn regenerate<'a>(
        &'a self,
        which: Selector<'a>,
        secret: Option<String>,
    ) -> BoxFuture<'a, Result<Issued, KeysError>> {
        let which: OwnedSelector = which.owned();
        Box::pin(self.change(move |file| {
            let (_, issued) = edit::plan_regenerate(file, which.as_selector(), secret, store())?;
            Ok((vec![issued.entry.clone()], issued))
        }))
    }

    fn describe(&self) -> String {
        "the database (state.postgres)".into()
    }
}

/// The key version replicas poll.
pub async fn version(db: &Db) -> Result<i64, DbError> {
    let client = db.get().await?;
    Ok(client
        .query_one("SELECT version FROM keygate_keys_version WHERE id = 1", &[])
        .await?
        .get(0))
}
