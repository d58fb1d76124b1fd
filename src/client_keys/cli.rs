//! `keygate keys create | list | revoke | regenerate`: the keys file of the
//! configuration, through the same edits as the key API.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{BufRead as _, IsTerminal as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::edit::{self, Issued, KeysError, NewKey, Selector};
use super::KeyEntry;

pub enum KeysAction {
    Create {
        config: PathBuf,
        name: String,
        roles: Vec<String>,
        expires: Option<String>,
        secret_stdin: bool,
        json: bool,
    },
    List {
        config: PathBuf,
        json: bool,
    },
    Revoke {
        config: PathBuf,
        client_id: String,
    },
    Regenerate {
        config: PathBuf,
        client_id: String,
        secret_stdin: bool,
        json: bool,
    },
}

const RELOAD_NOTE: &str =
    "takes effect when keygate reloads (SIGHUP, or within seconds as it watches the file)";

pub fn run(action: KeysAction) -> ExitCode {
    match execute(action) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{message}");
            ExitCode::from(1)
        }
    }
}

fn keys_file(config: &Path) -> Result<PathBuf, String> {
    crate::config::load(config)
        .map(|c| c.clients.keys_file)
        .map_err(|e| e.to_string())
}

fn execute(action: KeysAction) -> Result<(), String> {
    let err = |e: KeysError| e.to_string();
    match action {
        KeysAction::Create {
            config,
            name,
            roles,
            expires,
            secret_stdin,
            json,
        } => {
            let path = keys_file(&config)?;
            let secret = secret_stdin.then(read_secret).transpose()?;
            let issued = edit::create(
                &path,
                NewKey {
                    name,
                    roles,
                    expiration: expires,
                    secret,
                },
            )
            .map_err(err)?;
            print_issued("created", &issued, json);
        }
        KeysAction::List { config, json } => {
            let keys = edit::list(&keys_file(&config)?).map_err(err)?;
            print_list(&keys, json);
        }
        KeysAction::Revoke { config, client_id } => {
            let path = keys_file(&config)?;
            let entry = edit::revoke(&path, Selector::ClientId(&client_id)).map_err(err)?;
            println!(
                "revoked key {} ({}); {RELOAD_NOTE}",
                entry.id, entry.client_id
            );
        }
        KeysAction::Regenerate {
            config,
            client_id,
            secret_stdin,
            json,
        } => {
            let path = keys_file(&config)?;
            let secret = secret_stdin.then(read_secret).transpose()?;
            let issued =
                edit::regenerate(&path, Selector::ClientId(&client_id), secret).map_err(err)?;
            print_issued("regenerated", &issued, json);
        }
    }
    Ok(())
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

fn print_issued(verb: &str, issued: &Issued, json: bool) {
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
    println!("  {RELOAD_NOTE}");
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
