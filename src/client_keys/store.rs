//! Where API access keys live: the keys file (a single node), or the database
//! (cluster mode). The key API, `keygate keys` and each configuration
//! generation go through this trait, so they work the same on either.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use super::edit::{self, Issued, KeysError, NewKey, Selector};
use super::{ApiKey, KeyEntry};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A key store. Changes are durable when the call returns; callers make them
/// take effect (a reload, or the database's notification).
pub trait KeyBackend: Send + Sync + 'static {
    /// Every key, validated, for a configuration generation.
    fn load(&self) -> BoxFuture<'_, Result<Vec<ApiKey>, KeysError>>;

    /// Every key as stored, for listings (never used to authenticate).
    fn list(&self) -> BoxFuture<'_, Result<Vec<KeyEntry>, KeysError>>;

    /// Creates all of `batch` or, if any is refused, none.
    fn create(&self, batch: Vec<NewKey>) -> BoxFuture<'_, Result<Vec<Issued>, KeysError>>;

    fn revoke<'a>(&'a self, which: Selector<'a>) -> BoxFuture<'a, Result<KeyEntry, KeysError>>;

    fn regenerate<'a>(
        &'a self,
        which: Selector<'a>,
        secret: Option<String>,
    ) -> BoxFuture<'a, Result<Issued, KeysError>>;

    /// Where the keys are, for messages.
    fn describe(&self) -> String;
}

/// The keys file; every call runs on the blocking pool (file locks, argon2).
#[derive(Debug, Clone)]
pub struct FileKeys {
    path: PathBuf,
}

impl FileKeys {
    pub fn new(path: &Path) -> Self {
        FileKeys {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KeysError> + Send + 'static,
) -> Result<T, KeysError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| KeysError::Invalid(format!("the key store task failed: {e}")))?
}

impl KeyBackend for FileKeys {
    fn load(&self) -> BoxFuture<'_, Result<Vec<ApiKey>, KeysError>> {
        let path = self.path.clone();
        Box::pin(blocking(move || {
            super::file::read(&path)
                .map(|(_, keys)| keys)
                .map_err(KeysError::File)
        }))
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<KeyEntry>, KeysError>> {
        let path = self.path.clone();
        Box::pin(blocking(move || edit::list(&path)))
    }

    fn create(&self, batch: Vec<NewKey>) -> BoxFuture<'_, Result<Vec<Issued>, KeysError>> {
        let path = self.path.clone();
        Box::pin(blocking(move || edit::create_many(&path, batch)))
    }

    fn revoke<'a>(&'a self, which: Selector<'a>) -> BoxFuture<'a, Result<KeyEntry, KeysError>> {
        let path = self.path.clone();
        let which = which.owned();
        Box::pin(blocking(move || edit::revoke(&path, which.as_selector())))
    }

    fn regenerate<'a>(
        &'a self,
        which: Selector<'a>,
        secret: Option<String>,
    ) -> BoxFuture<'a, Result<Issued, KeysError>> {
        let path = self.path.clone();
        let which = which.owned();
        Box::pin(blocking(move || {
            edit::regenerate(&path, which.as_selector(), secret)
        }))
    }

    fn describe(&self) -> String {
        format!("keys file {}", self.path.display())
    }
}
