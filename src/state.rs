//! Cluster mode: what several replicas share in PostgreSQL (`state.postgres`) —
//! the API keys (`state/keys.rs`), the audit trail (`state/audit.rs`) and the
//! admin-key window (`state/coordination.rs`) — over connections made by
//! `state/db.rs` with a schema that `state/migrate.rs` keeps current.
//!
//! Without `state.postgres` none of this runs: one node keeps its keys and its
//! trail in files.

pub mod audit;
pub mod coordination;
pub mod db;
pub mod keys;
pub mod migrate;
mod pg_tls;

pub use db::{Db, DbError};
