//! The only place errors become HTTP responses. Handlers return a `ProxyError`;
//! clients get a status, a short fixed JSON body and never internal error text.

use std::time::Duration;

use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};

use crate::admin_key::Unavailable;
use crate::audit::AuditError;
use crate::body::{full, Body};
use crate::client_keys::AuthError;
use crate::confluence::UpstreamError;
use crate::headers::X_REQUEST_ID;
use crate::route::{Denied, PathError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("refused path: {0}")]
    BadPath(PathError),
    #[error("more than one Authorization header")]
    DuplicateAuthorization,
    #[error("authentication required")]
    Unauthorized,
    #[error("no route admits this request")]
    Forbidden(Denied),
    #[error("too many failed verifications or verifications at once")]
    AuthThrottled { retry_after: Duration },
    #[error("Confluence could not be reached")]
    UpstreamUnreachable,
    #[error("Confluence did not answer in time")]
    UpstreamTimeout,
    #[error("Confluence rejected the admin credential")]
    UpstreamCredentialsRejected,
    #[error("Confluence answered with a protocol switch keygate does not relay")]
    UpstreamProtocol,
    #[error("no admin key available")]
    AdminKeyUnavailable { retry_after: Duration },
    #[error("audit trail unavailable")]
    AuditUnavailable,
    #[error("not found")]
    NotFound,
    #[error("rate limited")]
    RateLimited { retry_after: Duration },
    #[error("Confluence asked to back off")]
    UpstreamBackoff { retry_after: Duration },
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the admin token is required")]
    AdminUnauthorized,
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the keys file is read-only")]
    KeysFileReadOnly,
    #[error("the keys file could not be changed")]
    KeysFileError,
    #[error("the key store is unavailable")]
    KeyStoreUnavailable,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadPath(_) | ProxyError::DuplicateAuthorization => StatusCode::BAD_REQUEST,
            ProxyError::Unauthorized => StatusCode::UNAUTHORIZED,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::AuthThrottled { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::NotFound => StatusCode::NOT_FOUND,
            ProxyError::RateLimited { .. } | ProxyError::UpstreamBackoff { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::AdminUnauthorized => StatusCode::UNAUTHORIZED,
            ProxyError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::KeysFileReadOnly => StatusCode::CONFLICT,
            ProxyError::KeysFileError => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::UpstreamUnreachable
            | ProxyError::UpstreamCredentialsRejected
            | ProxyError::UpstreamProtocol => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::AdminKeyUnavailable { .. }
            | ProxyError::AuditUnavailable
            | ProxyError::KeyStoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable machine-readable code in the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BadPath(_) => "invalid_path",
            ProxyError::DuplicateAuthorization => "duplicate_authorization",
            ProxyError::Unauthorized => "unauthorized",
            ProxyError::Forbidden(_) => "forbidden",
            ProxyError::AuthThrottled { .. } => "auth_throttled",
            ProxyError::NotFound => "not_found",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::UpstreamBackoff { .. } => "upstream_backoff",
            ProxyError::MethodNotAllowed => "method_not_allowed",
            ProxyError::AdminUnauthorized => "unauthorized",
            ProxyError::InvalidRequest(_) => "invalid_request",
            ProxyError::KeysFileReadOnly => "keys_file_read_only",
            ProxyError::KeysFileError => "keys_file_error",
            ProxyError::UpstreamUnreachable => "upstream_unreachable",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::UpstreamCredentialsRejected => "upstream_credentials_rejected",
            ProxyError::UpstreamProtocol => "upstream_protocol",
            ProxyError::AdminKeyUnavailable { .. } => "admin_key_unavailable",
            ProxyError::AuditUnavailable => "audit_unavailable",
            ProxyError::KeyStoreUnavailable => "key_store_unavailable",
        }
    }

    fn message(&self) -> String {
        match self {
            ProxyError::BadPath(e) => format!("{e}; the request was not forwarded"),
            ProxyError::DuplicateAuthorization => {
                "send exactly one Authorization header".to_owned()
            }
            ProxyError::Unauthorized => {
                "authenticate with an API access key: Basic client_id:client_secret or Bearer client_secret"
                    .to_owned()
            }
            ProxyError::Forbidden(Denied::NoPathMatch) => {
                "no route covers this path (paths are matched exactly: Confluence Cloud paths start with /wiki/)".to_owned()
            }
            ProxyError::Forbidden(Denied::NotAdmitted) => {
                "routes cover this path, but none allows this method for this key's roles".to_owned()
            }
            ProxyError::AuthThrottled { .. } => {
                "too many failed authentications from this address or for this client, or too many at once; retry later".to_owned()
            }
            ProxyError::NotFound => "no such resource".to_owned(),
            ProxyError::RateLimited { .. } => {
                "this key sends more requests per second than allowed; retry later".to_owned()
            }
            ProxyError::UpstreamBackoff { .. } => {
                "Confluence asked keygate to slow down; retry after the time given".to_owned()
            }
            ProxyError::MethodNotAllowed => "this method is not allowed here".to_owned(),
            ProxyError::AdminUnauthorized => "send Authorization: Bearer <ops.admin_token>".to_owned(),
            ProxyError::InvalidRequest(m) => m.clone(),
            ProxyError::KeysFileReadOnly => {
                "the keys file is read-only (a mounted Secret?); change it where it comes from".to_owned()
            }
            ProxyError::KeysFileError => "the keys file could not be changed; see the logs".to_owned(),
            ProxyError::UpstreamUnreachable => "Confluence could not be reached".to_owned(),
            ProxyError::UpstreamTimeout => "Confluence did not answer in time".to_owned(),
            ProxyError::UpstreamCredentialsRejected => {
                "Confluence rejected keygate's admin credential; your own key is fine. Operators: see /readyz".to_owned()
            }
            ProxyError::UpstreamProtocol => {
                "Confluence answered with a protocol switch, which keygate does not relay".to_owned()
            }
            ProxyError::AdminKeyUnavailable { .. } => {
                "the Confluence admin key is not available right now; retry later".to_owned()
            }
            ProxyError::AuditUnavailable => {
                "the audit trail cannot be written, so bypass requests are refused".to_owned()
            }
            ProxyError::KeyStoreUnavailable => {
                "the key store (database) cannot be reached; retry later (list the keys to see whether a change was made)".to_owned()
            }
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ProxyError::AdminKeyUnavailable { retry_after }
            | ProxyError::RateLimited { retry_after }
            | ProxyError::AuthThrottled { retry_after }
            | ProxyError::UpstreamBackoff { retry_after } => Some(*retry_after),
            ProxyError::AuditUnavailable | ProxyError::KeyStoreUnavailable => {
                Some(Duration::from_secs(5))
            }
            _ => None,
        }
    }

    /// The response a client gets, carrying the request id.
    pub fn to_response(&self, request_id: &HeaderValue) -> Response<Body> {
        let body = serde_json::json!({
            "error": self.code(),
            "message": self.message(),
            "request_id": request_id.to_str().unwrap_or(""),
        });
        let mut response = Response::new(full(body.to_string()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(X_REQUEST_ID.clone(), request_id.clone());
        if *self == ProxyError::Unauthorized {
            headers.insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"keygate\""),
            );
        }
        if *self == ProxyError::AdminUnauthorized {
            headers.insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"keygate-ops\""),
            );
        }
        if let Some(after) = self.retry_after() {
            // Round up: a client retrying early would only be refused again.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

impl From<PathError> for ProxyError {
    fn from(e: PathError) -> Self {
        ProxyError::BadPath(e)
    }
}

impl From<Denied> for ProxyError {
    fn from(d: Denied) -> Self {
        ProxyError::Forbidden(d)
    }
}

impl From<AuthError> for ProxyError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Throttled(_, retry_after) => ProxyError::AuthThrottled { retry_after },
            AuthError::Busy => ProxyError::AuthThrottled {
                retry_after: Duration::from_secs(1),
            },
            _ => ProxyError::Unauthorized,
        }
    }
}

impl From<Unavailable> for ProxyError {
    fn from(u: Unavailable) -> Self {
        tracing::debug!(reason = %u.reason, "bypass refused: no admin key");
        ProxyError::AdminKeyUnavailable {
            retry_after: u.retry_after,
        }
    }
}

impl From<AuditError> for ProxyError {
    fn from(e: AuditError) -> Self {
        tracing::debug!(error = %e, "bypass refused: audit trail unavailable");
        ProxyError::AuditUnavailable
    }
}

impl From<UpstreamError> for ProxyError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Timeout => ProxyError::UpstreamTimeout,
            UpstreamError::Unreachable(_) => ProxyError::UpstreamUnreachable,
        }
    }
}
