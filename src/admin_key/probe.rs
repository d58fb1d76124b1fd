//! `keygate check --probe`: one look at the real site. Is the admin credential
//! accepted, and may the account use admin keys? A key another replica holds is
//! left untouched; otherwise a one-minute key is enabled and disabled again.

use http::Method;

use super::{parse_key, AdminKeyApi};

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub ok: bool,
    pub text: String,
}

fn ok(text: impl Into<String>) -> Finding {
    Finding {
        ok: true,
        text: text.into(),
    }
}

fn fail(text: impl Into<String>) -> Finding {
    Finding {
        ok: false,
        text: text.into(),
    }
}

const CREDENTIAL: &str = "the admin credential was refused (401): check confluence.email and confluence.api_token; Atlassian API tokens expire within a year";
const NOT_ALLOWED: &str = "it must be an org or site admin of a Premium or Enterprise site (Connect and Forge apps cannot use admin keys)";

pub async fn probe<A: AdminKeyApi>(api: &A, site: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    let reply = match api.call(Method::GET, 0).await {
        Ok(r) => r,
        Err(e) => {
            out.push(fail(format!(
                "cannot reach {site}: {e}; check confluence.base_url and the network path"
            )));
            return out;
        }
    };
    match reply.status {
        401 => {
            out.push(fail(CREDENTIAL));
            return out;
        }
        403 => {
            out.push(ok("the admin credential is accepted"));
            out.push(fail(format!(
                "the account may not use the admin-key API (403): {NOT_ALLOWED}"
            )));
            return out;
        }
        200 => {
            out.push(ok("the admin credential is accepted"));
            let until = parse_key(
                &reply,
                tokio::time::Instant::now(),
                std::time::Duration::ZERO,
            )
            .map(|k| crate::rfc3339::format_seconds(k.lease.expires))
            .unwrap_or_else(|| "an unreadable time".into());
            out.push(ok(format!(
                "the account may use admin keys: one is active until {until} (left untouched)"
            )));
            return out;
        }
        404 => out.push(ok("the admin credential is accepted")),
        status => {
            out.push(fail(format!(
                "GET /wiki/api/v2/admin-key answered {status}; expected 200 or 404"
            )));
            return out;
        }
    }
    match api.call(Method::POST, 1).await {
        Err(e) => out.push(fail(format!("enabling a one-minute admin key failed: {e}"))),
        Ok(r) => match r.status {
            200 | 201 => {
                out.push(ok(
                    "the account may use admin keys (enabled one for a minute)",
                ));
                match api.call(Method::DELETE, 0).await {
                    Ok(d) if matches!(d.status, 200 | 204 | 404) => {
                        out.push(ok("disabled it again"))
                    }
                    Ok(d) => out.push(fail(format!(
                        "disabling it answered {}; it expires by itself within a minute",
                        d.status
                    ))),
                    Err(e) => out.push(fail(format!(
                        "disabling it failed: {e}; it expires by itself within a minute"
                    ))),
                }
            }
            401 => out.push(fail(CREDENTIAL)),
            403 | 404 => out.push(fail(format!(
                "the account may not use admin keys (POST answered {}): {NOT_ALLOWED}",
                r.status
            ))),
            status => out.push(fail(format!(
                "POST /wiki/api/v2/admin-key answered {status}"
            ))),
        },
    }
    out
}
