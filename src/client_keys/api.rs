//! The key management API on the ops listener (`/api/api_accesses`), with the wire
//! shapes of the API-access-key reference: create, list, get, revoke, regenerate.
//! Only with `ops.admin_token` set; callers present it as a Bearer token, compared
//! in constant time. Writes go through the same edits as `keygate keys`.

use http::{Method, StatusCode};
use serde::Deserialize;

use super::edit::{self, Issued, KeysError, NewKey, Selector};
use super::KeyEntry;
use crate::error::ProxyError;

/// A key as listed: never a secret or a hash.
pub fn listing(e: &KeyEntry) -> serde_json::Value {
    serde_json::json!({
        "type": "api_access",
        "id": e.id,
        "client_id": e.client_id,
        "name": e.name,
        "roles": e.roles,
        "expiration": e.expiration,
        "is_valid": e.is_valid,
        "created": e.created,
    })
}

fn issued_json(issued: &Issued) -> serde_json::Value {
    let mut v = serde_json::json!({
        "type": "api_access",
        "id": issued.entry.id,
        "client_id": issued.entry.client_id,
        "is_valid": issued.entry.is_valid,
    });
    if let Some(secret) = &issued.generated_secret {
        v["client_secret"] = serde_json::Value::String(secret.clone());
    }
    v
}

/// Whether `presented` (the whole Authorization value) is `Bearer <token>`; the
/// comparison takes the same time wherever the first difference is.
pub fn admin_token_matches(presented: Option<&http::HeaderValue>, token: &str) -> bool {
    let Some(value) = presented.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some((scheme, given)) = value.split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    // Equal-length digests compared in constant time: neither the token's length
    // nor the position of a difference shows in the timing.
    let a = ring::digest::digest(&ring::digest::SHA256, given.trim().as_bytes());
    let b = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    data: Vec<CreateItem>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateItem {
    name: String,
    #[serde(default)]
    roles: Vec<String>,
    expiration: Option<String>,
    client_secret: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    is_valid: bool,
    client_secret: Option<String>,
}

/// What a change did, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub action: &'static str,
    pub client_id: String,
    pub key_id: String,
}

/// An API answer: status and JSON body, and the changes it made.
pub struct Answer {
    pub status: StatusCode,
    pub body: serde_json::Value,
    pub changes: Vec<Change>,
}

fn invalid(message: impl Into<String>) -> ProxyError {
    ProxyError::InvalidRequest(message.into())
}

fn keys_error(e: KeysError) -> ProxyError {
    match e {
        KeysError::ReadOnly(_) => ProxyError::KeysFileReadOnly,
        KeysError::NotFound { .. } => ProxyError::NotFound,
        KeysError::Invalid(m) => ProxyError::InvalidRequest(m),
        other => {
            tracing::error!(error = %other, "key API could not change the keys file");
            ProxyError::KeysFileError
        }
    }
}

/// Handles one call below `/api/api_accesses`; blocking (file I/O and hashing).
pub fn handle(
    keys_file: &std::path::Path,
    method: &Method,
    rest: &str,
    body: &[u8],
) -> Result<Answer, ProxyError> {
    let id = rest.strip_prefix('/').filter(|s| !s.is_empty());
    match (method, id) {
        (&Method::GET, None) => {
            let keys = edit::list(keys_file).map_err(keys_error)?;
            let data: Vec<_> = keys.iter().map(listing).collect();
            Ok(Answer {
                status: StatusCode::OK,
                body: serde_json::json!({"total_count": data.len(), "data": data, "exceeds_total_count": false}),
                changes: Vec::new(),
            })
        }
        (&Method::GET, Some(id)) => {
            let keys = edit::list(keys_file).map_err(keys_error)?;
            let key = keys
                .iter()
                .find(|k| k.id == id)
                .ok_or(ProxyError::NotFound)?;
            Ok(Answer {
                status: StatusCode::OK,
                body: listing(key),
                changes: Vec::new(),
            })
        }
        (&Method::POST, None) => {
            let parsed: CreateBody = serde_json::from_slice(body).map_err(|e| {
                invalid(format!(
                    "expected {{\"data\":[{{\"name\":...,\"roles\":[...]}}]}}: {e}"
                ))
            })?;
            if parsed.data.is_empty() {
                return Err(invalid("expected at least one item in `data`"));
            }
            let mut data = Vec::new();
            let mut changes = Vec::new();
            for item in parsed.data {
                let issued = edit::create(
                    keys_file,
                    NewKey {
                        name: item.name,
                        roles: item.roles,
                        expiration: item.expiration,
                        secret: item.client_secret,
                    },
                )
                .map_err(keys_error)?;
                changes.push(Change {
                    action: "create",
                    client_id: issued.entry.client_id.clone(),
                    key_id: issued.entry.id.clone(),
                });
                data.push(issued_json(&issued));
            }
            Ok(Answer {
                status: StatusCode::CREATED,
                body: serde_json::json!({"total_count": data.len(), "data": data, "exceeds_total_count": false}),
                changes,
            })
        }
        (&Method::PUT, Some(id)) => {
            let parsed: UpdateBody = serde_json::from_slice(body).map_err(|e| {
                invalid(format!("expected {{\"is_valid\": false}} or {{\"is_valid\": true, \"client_secret\": optional}}: {e}"))
            })?;
            let (issued, action) = if parsed.is_valid {
                let issued = edit::regenerate(keys_file, Selector::Id(id), parsed.client_secret)
                    .map_err(keys_error)?;
                (issued, "regenerate")
            } else {
                if parsed.client_secret.is_some() {
                    return Err(invalid("a revocation takes no client_secret"));
                }
                let entry = edit::revoke(keys_file, Selector::Id(id)).map_err(keys_error)?;
                (
                    Issued {
                        entry,
                        generated_secret: None,
                    },
                    "revoke",
                )
            };
            Ok(Answer {
                status: StatusCode::OK,
                body: issued_json(&issued),
                changes: vec![Change {
                    action,
                    client_id: issued.entry.client_id.clone(),
                    key_id: issued.entry.id.clone(),
                }],
            })
        }
        _ => Err(ProxyError::MethodNotAllowed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_token_comparison() {
        let token = "a-long-admin-token-123";
        let cases: &[(Option<&str>, bool)] = &[
            (Some("Bearer a-long-admin-token-123"), true),
            (Some("bearer a-long-admin-token-123"), true),
            (Some("Bearer a-long-admin-token-124"), false),
            (Some("Bearer a-long-admin-token-12"), false),
            (Some("Basic a-long-admin-token-123"), false),
            (Some("a-long-admin-token-123"), false),
            (Some("Bearer "), false),
            (None, false),
        ];
        for (value, ok) in cases {
            let header = value.map(|v| http::HeaderValue::from_str(v).unwrap());
            assert_eq!(
                admin_token_matches(header.as_ref(), token),
                *ok,
                "{value:?}"
            );
        }
    }
}
