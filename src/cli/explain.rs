//! `keygate explain`: how a request would be decided, step by step, in the order
//! the proxy decides it (400, 401, 403).

use std::fmt;
use std::time::SystemTime;

use http::Method;

use crate::client_keys::ApiKey;
use crate::route::{CanonicalPath, RouteTable};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// 1-based position in the allow-list.
    pub(crate) position: usize,
    pub(crate) name: String,
    pub(crate) roles: Vec<String>,
    pub(crate) admin_key: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// 400: the path is refused and never forwarded.
    Refused(String),
    /// 401: the key cannot authenticate.
    Unauthorized(&'static str),
    /// 403: no route admits the request (for this key).
    Forbidden,
    /// Forwarded by this route.
    Route { name: String, admin_key: bool },
    /// No key given: the first candidate whose roles the caller holds decides.
    DependsOnRoles,
}

#[derive(Debug, Clone)]
pub(crate) struct Explanation {
    pub(crate) method: String,
    pub(crate) target: String,
    pub(crate) canonical: Option<String>,
    pub(crate) client: Option<(String, Vec<String>)>,
    pub(crate) candidates: Vec<Candidate>,
    pub(crate) decision: Decision,
}

pub(crate) fn explain(
    routes: &RouteTable,
    method: &Method,
    target: &str,
    key: Option<&ApiKey>,
    now: SystemTime,
) -> Explanation {
    let mut out = Explanation {
        method: method.to_string(),
        target: target.to_owned(),
        canonical: None,
        client: key.map(|k| (k.client_id.clone(), k.roles.clone())),
        candidates: Vec::new(),
        decision: Decision::Forbidden,
    };
    let path = target.split('?').next().unwrap_or("");
    let path = match CanonicalPath::parse(path) {
        Ok(p) => p,
        Err(e) => {
            out.decision = Decision::Refused(e.to_string());
            return out;
        }
    };
    out.canonical = Some(path.as_str().to_owned());
    out.candidates = routes
        .candidates(method, &path)
        .map(|(i, r)| Candidate {
            position: i + 1,
            name: r.name.clone(),
            roles: r.role_names.clone(),
            admin_key: r.admin_key,
        })
        .collect();
    out.decision = match key {
        Some(k) if !k.is_valid => Decision::Unauthorized("key revoked"),
        Some(k) if k.expiration.is_some_and(|e| e <= now) => Decision::Unauthorized("key expired"),
        Some(k) => match routes.decide(method, &path, &k.roles) {
            Some(r) => Decision::Route {
                name: r.name.clone(),
                admin_key: r.admin_key,
            },
            None => Decision::Forbidden,
        },
        None if out.candidates.is_empty() => Decision::Forbidden,
        None => Decision::DependsOnRoles,
    };
    out
}

impl Explanation {
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let (decision, status, route, admin_key, reason) = match &self.decision {
            Decision::Refused(r) => ("refused", Some(400), None, false, Some(r.clone())),
            Decision::Unauthorized(r) => (
                "unauthorized",
                Some(401),
                None,
                false,
                Some((*r).to_owned()),
            ),
            Decision::Forbidden => ("forbidden", Some(403), None, false, None),
            Decision::Route { name, admin_key } => {
                ("forward", None, Some(name.clone()), *admin_key, None)
            }
            Decision::DependsOnRoles => ("depends_on_roles", None, None, false, None),
        };
        serde_json::json!({
            "method": self.method,
            "target": self.target,
            "canonical_path": self.canonical,
            "client_id": self.client.as_ref().map(|c| &c.0),
            "candidates": self.candidates.iter().map(|c| serde_json::json!({
                "position": c.position, "name": c.name, "roles": c.roles, "admin_key": c.admin_key,
            })).collect::<Vec<_>>(),
            "decision": decision,
            "status": status,
            "route": route,
            "admin_key": admin_key,
            "reason": reason,
        })
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "request     {} {}", self.method, self.target)?;
        match &self.canonical {
            Some(c) => writeln!(f, "canonical   {c}")?,
            None => {
                if let Decision::Refused(reason) = &self.decision {
                    writeln!(f, "canonical   refused: {reason}")?;
                }
            }
        }
        if let Some((id, roles)) = &self.client {
            writeln!(f, "client      {id} roles [{}]", roles.join(", "))?;
        }
        if self.canonical.is_some() {
            if self.candidates.is_empty() {
                writeln!(f, "routes      none admits {} on this path", self.method)?;
            } else {
                writeln!(f, "routes      admitting method and path, in order:")?;
                for c in &self.candidates {
                    writeln!(
                        f,
                        "            {:>2}. {} roles [{}] bypass {}",
                        c.position,
                        c.name,
                        c.roles.join(", "),
                        if c.admin_key { "yes" } else { "no" }
                    )?;
                }
            }
        }
        match &self.decision {
            Decision::Refused(_) => writeln!(f, "decision    400 invalid_path: never forwarded"),
            Decision::Unauthorized(r) => writeln!(f, "decision    401 unauthorized: {r}"),
            Decision::Forbidden => writeln!(f, "decision    403 forbidden: no route admits this request"),
            Decision::Route { name, admin_key } => writeln!(
                f,
                "decision    forwarded by route `{name}`; bypass header {}",
                if *admin_key { "ADDED (Atl-Confluence-With-Admin-Key: true)" } else { "not added" }
            ),
            Decision::DependsOnRoles => writeln!(
                f,
                "decision    the first route above whose roles the key holds decides (403 if none); pass --client-id to decide"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{PathPattern, RoleRule, Route};

    fn table() -> RouteTable {
        let mk = |name: &str, path: &str, roles: &[&str], bypass: bool| {
            let role_names: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
            Route {
                name: name.into(),
                shared_name: name.into(),
                methods: vec![Method::GET],
                pattern: PathPattern::parse(path).unwrap(),
                roles: RoleRule::from_names(&role_names),
                role_names,
                admin_key: bypass,
            }
        };
        RouteTable::new(vec![
            mk("scan", "/wiki/api/v2/pages/{id}", &["scanner"], true),
            mk("read", "/wiki/**", &["*"], false),
        ])
    }

    fn key(roles: &[&str], valid: bool) -> ApiKey {
        ApiKey {
            id: "1".into(),
            client_id: "k_x".into(),
            name: "k".into(),
            secret_hash: String::new(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            expiration: None,
            is_valid: valid,
        }
    }

    #[test]
    fn decisions() {
        let t = table();
        let now = SystemTime::now();
        let get = Method::GET;
        let d = |target: &str, k: Option<&ApiKey>| explain(&t, &get, target, k, now).decision;
        assert_eq!(
            d("/wiki/api/v2/pages/42", Some(&key(&["scanner"], true))),
            Decision::Route {
                name: "scan".into(),
                admin_key: true
            }
        );
        assert_eq!(
            d("/wiki/api/v2/pages/42?x=1", Some(&key(&["other"], true))),
            Decision::Route {
                name: "read".into(),
                admin_key: false
            }
        );
        assert_eq!(d("/wiki/api/v2/pages/42", None), Decision::DependsOnRoles);
        assert_eq!(d("/rest/x", None), Decision::Forbidden);
        assert!(matches!(d("/wiki/../x", None), Decision::Refused(_)));
        assert_eq!(
            d("/wiki/x", Some(&key(&["scanner"], false))),
            Decision::Unauthorized("key revoked")
        );
        let text = explain(
            &t,
            &get,
            "/wiki/api/v2/pages/42",
            Some(&key(&["scanner"], true)),
            now,
        )
        .to_string();
        assert!(text.contains("canonical   /wiki/api/v2/pages/42"), "{text}");
        assert!(text.contains("ADDED"), "{text}");
    }
}
