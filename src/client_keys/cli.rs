//! `keygate keys create | list | revoke | regenerate`: the keys of the
//! configuration (its keys file, or the database in cluster mode), through the
//! same `KeyBackend` as the key API.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{BufRead as _, IsTerminal as _};
use std::path::PathBuf;

use super::edit::{Issued, KeysError, NewKey, Selector};
use super::store::KeyBackend;
use super::KeyEntry;

pub enum KeysAction {
    Create {
        name: String,
        roles: Vec<String>,
        expires: Option<String>,
        secret_stdin: bool,
        json: bool,
    },
    List {
        json: bool,
    },
    Revoke {
        client_id: String,
    },
    Regenerate {
        client_id: String,
        secret_stdin: bool,
        json: bool,
    },
    /// Cluster mode: moves a keys file's entries into the database.
    Import {
        file: PathBuf,
    },
}

/// A change made, for the audit trail: action, client_id, key id.
pub type Made = (&'static str, String, String);

/// Runs `action` against `keys`; `note` says when a change takes effect.
/// Returns the changes made.
pub async fn execute(
    action: KeysAction,
    keys: &dyn KeyBackend,
    note: &str,
) -> Result<Vec<Made>, String> {
    let err = |e: KeysError| e.to_string();
    let made = |action, e: &KeyEntry| (action, e.client_id.clone(), e.id.clone());
    Ok(match action {
        KeysAction::Create {
            name,
            roles,
            expires,
            secret_stdin,
            json,
        } => {
            let secret = secret_stdin.then(read_secret).transpose()?;
            let new = NewKey {
                name,
                roles,
                expiration: expires,
                secret,
            };
            let issued = keys
                .create(vec![new])
                .await
                .map_err(err)?
                .pop()
                .ok_or("nothing was created")?;
            print_issued("created", &issued, json, note);
            vec![made("create", &issued.entry)]
        }
        KeysAction::List { json } => {
            print_list(&keys.list().await.map_err(err)?, json);
            Vec::new()
        }
        KeysAction::Revoke { client_id } => {
            let entry = keys
                .revoke(Selector::ClientId(&client_id))
                .await
                .map_err(err)?;
            println!("revoked key {} ({}); {note}", entry.id, entry.client_id);
            vec![made("revoke", &entry)]
        }
        KeysAction::Regenerate {
            client_id,
            secret_stdin,
            json,
        } => {
            let secret = secret_stdin.then(read_secret).transpose()?;
            let issued = keys
                .regenerate(Selector::ClientId(&client_id), secret)
                .await
                .map_err(err)?;
            print_issued("regenerated", &issued, json, note);
            vec![made("regenerate", &issued.entry)]
        }
        KeysAction::Import { .. } => {
            return Err("keygate keys import: only with state.postgres (it moves a keys file into the database)".into())
        }
    })
}

/// One line from standard input; without echo when it is a terminal.
fn read_secret() -> Result<String, String> {
    let secret = if std::io::stdin().is_terminal() {
        rpassword::prompt_password("client secret (not echoed): ")
            .map_err(|e| format!("cannot read the secret: {e}"))?
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the secret from standard input: {e}"))?;
        line
    };
    let secret = secret.trim_end_matches(['\n', '\r']).to_owned();
    if secret.is_empty() {
        return Err("--secret-stdin: expected the secret on standard input, got nothing".into());
    }
    Ok(secret)
}

fn print_issued(verb: &str, issued: &Issued, json: bool, note: &str) {
    let e = &issued.entry;
    if json {
        let mut v = super::file::listing(e);
        v["client_secret"] = serde_json::Value::from(issued.generated_secret.clone());
        println!("{v}");
        return;
    }
    println!("{verb} key {} ({})", e.id, e.name);
    println!("  client_id      {}", e.client_id);
    match &issued.generated_secret {
        Some(secret) => {
            println!("  client_secret  {secret}\n  (shown only now: keygate stores only its hash)")
        }
        None => println!("  client_secret  the one you gave (keygate stores only its hash)"),
    }
    println!("  {note}");
}

fn print_list(keys: &[KeyEntry], json: bool) {
    let now = std::time::SystemTime::now();
    if json {
        let items: Vec<_> = keys.iter().map(super::file::listing).collect();
        println!("{}", serde_json::Value::Array(items));
        return;
    }
    println!(
        "{:<6} {:<40} {:<16} {:<28} {:<22} VALID",
        "ID", "CLIENT_ID", "NAME", "ROLES", "EXPIRATION"
    );
    for k in keys {
        let expired = k
            .expiration
            .as_deref()
            .and_then(|t| crate::rfc3339::parse(t).ok())
            .is_some_and(|t| t <= now);
        let valid = match (k.is_valid, expired) {
            (false, _) => "no (revoked)",
            (true, true) => "no (expired)",
            (true, false) => "yes",
        };
        println!(
            "{:<6} {:<40} {:<16} {:<28} {:<22} {valid}",
            k.id,
            k.client_id,
            k.name,
            k.roles.join(","),
            k.expiration.as_deref().unwrap_or("-"),
        );
    }
}
