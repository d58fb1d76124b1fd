//! keygate: an authenticating reverse proxy in front of Confluence Cloud that holds
//! the admin's credentials and admin key so that internal tools never do.
//!
//! Dependencies point one way, from entry points down to leaves; no module
//! imports one from a layer above it (`tests/layers.rs` checks every
//! `use crate::` line against this table):
//!
//! | layer | modules | job |
//! | --- | --- | --- |
//! | 1. entry | `cli`, `dev` | commands, `keygate dev` |
//! | 2. wiring | `app` | `App`, `Control`, generations, reload |
//! | 3. serving | `proxy`, `ops`, `server`, `error` | the request pipeline, the ops listener, accept loops, errors as responses |
//! | 4. domain | `route`, `client_keys`, `admin_key`, `audit`, `confluence`, `config`, `state` | what keygate decides and keeps |
//! | 5. leaves | `readiness`, `metrics`, `headers`, `body`, `rfc3339`, `json`, `tls`, `log_sink`, `files`, `trim` | small pieces with no knowledge of the rest |
//!
//! `App::bind` takes a validated `Config`, binds the listeners and returns their
//! addresses; `App::run` serves until a shutdown future completes. Tests and
//! `keygate dev` drive exactly this.
#![warn(unreachable_pub)]

pub mod admin_key;
pub mod app;
pub mod audit;
pub mod body;
pub mod cli;
pub mod client_keys;
pub mod config;
pub mod confluence;
pub mod dev;
pub mod error;
pub mod files;
pub mod headers;
pub mod json;
pub mod log_sink;
pub mod metrics;
pub mod ops;
pub mod proxy;
pub mod readiness;
pub mod rfc3339;
pub mod route;
pub mod server;
pub mod state;
pub mod tls;
pub mod trim;

pub use app::{termination_signal, App, Control, StartError};
