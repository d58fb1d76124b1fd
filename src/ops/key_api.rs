//! The key management API on the ops listener (`/api/api_accesses`), with the wire
//! shapes of the API-access-key reference: create, list, get, revoke, regenerate.
//! Only with `ops.admin_token` set; callers present it as a Bearer token, compared
//! in constant time. Writes go through the key store (the keys file, as
//! `keygate keys` edits it, or the database).
//!
//! Invariant: a `201`/`200` for a change means it is durable and in force on this
//! replica — the host applies it before the answer is sent.

use http::{Method, StatusCode};
use serde::Deserialize;

use crate::client_keys::edit::{Issued, KeysError, NewKey, Selector};
use crate::client_keys::file::listing;
use crate::client_keys::store::KeyBackend;
use crate::error::ProxyError;

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
        KeysError::Unavailable(why) => {
            tracing::error!(error = %why, "key API: the key store is unavailable");
            ProxyError::KeyStoreUnavailable
        }
        other => {
            tracing::error!(error = %other, "key API could not change the keys file");
            ProxyError::KeysFileError
        }
    }
}

/// Handles one call below `/api/api_accesses`.
pub async fn handle(
    keys: &dyn KeyBackend,
    method: &Method,
    rest: &str,
    body: &[u8],
) -> Result<Answer, ProxyError> {
    let id = rest.strip_prefix('/').filter(|s| !s.is_empty());
    match (method, id) {
        (&Method::GET, None) => {
            let keys = keys.list().await.map_err(keys_error)?;
            let data: Vec<_> = keys.iter().map(listing).collect();
            Ok(Answer {
                status: StatusCode::OK,
                body: serde_json::json!({"total_count": data.len(), "data": data, "exceeds_total_count": false}),
                changes: Vec::new(),
            })
        }
        (&Method::GET, Some(id)) => {
            let keys = keys.list().await.map_err(keys_error)?;
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
            if parsed.data.len() > MAX_BATCH {
                return Err(invalid(format!(
                    "expected at most {MAX_BATCH} items in `data`"
                )));
            }
            let batch = parsed
                .data
                .into_iter()
                .map(|item| NewKey {
                    name: item.name,
                    roles: item.roles,
                    expiration: item.expiration,
                    secret: item.client_secret,
                })
                .collect();
            // All or nothing: one change for the whole batch.
            let issued = keys.create(batch).await.map_err(keys_error)?;
            let changes = issued
                .iter()
                .map(|i| Change {
                    action: "create",
                    client_id: i.entry.client_id.clone(),
                    key_id: i.entry.id.clone(),
                })
                .collect();
            let data: Vec<_> = issued.iter().map(issued_json).collect();
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
                let issued = keys
                    .regenerate(Selector::Id(id), parsed.client_secret)
                    .await
                    .map_err(keys_error)?;
                (issued, "regenerate")
            } else {
                if parsed.client_secret.is_some() {
                    return Err(invalid("a revocation takes no client_secret"));
                }
                let entry = keys.revoke(Selector::Id(id)).await.map_err(keys_error)?;
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

/// Keys one create call may ask for.
const MAX_BATCH: usize = 100;

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
