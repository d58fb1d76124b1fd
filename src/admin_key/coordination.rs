//! How the owner task agrees with other replicas on the one admin key they share.
//!
//! A single node needs no agreement (`LocalCoordination`); replicas that share a
//! database take turns for admin-key calls and publish what they learnt, so that a
//! call made by one counts for all.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::ActiveKey;

/// The shared view of the admin key, on the local monotonic clock.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Shared {
    /// The key some replica holds, with its deadline and refresh time.
    pub key: Option<ActiveKey>,
    /// Calls are held back until then (a failure another replica saw).
    pub backoff: Option<(Instant, String)>,
    /// The most recent bypass request of any live replica.
    pub last_bypass: Option<Instant>,
}

/// Whether the owner may make its call now.
#[derive(Debug)]
pub enum Turn {
    /// Make the call; report with `finish`.
    Mine,
    /// Another replica's result is fresh enough: take it instead of calling.
    Adopt(Shared),
}

/// What a finished call left behind, to publish to the other replicas.
#[derive(Debug, Clone)]
pub enum Outcome {
    Key(ActiveKey),
    Failed {
        until: Instant,
        reason: String,
    },
    Disabled,
    /// The call left the shared state as it was (a failed DELETE).
    Unchanged,
}

/// Agreement with other replicas on the admin key.
pub trait Coordination: Send + Sync + 'static {
    /// Waits for this replica's turn to make an admin-key call; `call_kind` is
    /// for logs. A replica that cannot reach the others answers `Err`.
    fn turn(&self, wanted: super::Call) -> impl Future<Output = Result<Turn, String>> + Send;

    /// Publishes the outcome of the call this replica made and ends its turn.
    fn finish(&self, outcome: &Outcome) -> impl Future<Output = ()> + Send;

    /// The shared view now, for a replica that did not make the last call
    /// (polled; `None` for a single node, which is the only caller).
    fn shared(&self) -> impl Future<Output = Option<Shared>> + Send;

    /// Records that this replica forwarded bypass traffic at `at` (throttled by
    /// the implementation).
    fn traffic(&self, at: Instant) -> impl Future<Output = ()> + Send;

    /// How often `shared` should be polled; `None` when there is nobody to agree
    /// with.
    fn poll_every(&self) -> Option<Duration>;

    /// Whether this replica is the last with recent bypass traffic (a shutdown
    /// disables the key only then).
    fn last_one_out(&self) -> impl Future<Output = bool> + Send;
}

/// A single node: every turn is its own, nothing is shared.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalCoordination;

impl Coordination for LocalCoordination {
    async fn turn(&self, _wanted: super::Call) -> Result<Turn, String> {
        Ok(Turn::Mine)
    }

    async fn finish(&self, _outcome: &Outcome) {}

    async fn shared(&self) -> Option<Shared> {
        None
    }

    async fn traffic(&self, _at: Instant) {}

    fn poll_every(&self) -> Option<Duration> {
        None
    }

    async fn last_one_out(&self) -> bool {
        true
    }
}
