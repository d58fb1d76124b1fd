//! The route allow-list: ordered routes, each admitting some methods, a path pattern
//! and some roles, and saying whether the admin-key bypass is added.
//!
//! Invariant: the first route whose methods, path and roles all admit a request
//! decides it; when none does, the request is denied. Patterns match whole
//! segments of a canonical path (`/api` never matches `/apiv2`).

pub mod path;

use http::Method;

pub use path::{CanonicalPath, PathError};

/// The methods a route may name. `HEAD` is not implied by `GET`.
pub const KNOWN_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param,
    Rest,
}

/// A path pattern: literal segments, `{name}` for one non-empty segment, and a final
/// `**` for zero or more segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    text: String,
    segments: Vec<Segment>,
}

impl PathPattern {
    /// Parses a pattern; the error says what is expected.
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some(body) = text.strip_prefix('/') else {
            return Err("expected a path pattern starting with `/`".into());
        };
        let mut segments = Vec::new();
        let mut params: Vec<&str> = Vec::new();
        if !body.is_empty() {
            let parts: Vec<&str> = body.split('/').collect();
            for (i, part) in parts.iter().enumerate() {
                let last = i + 1 == parts.len();
                segments.push(parse_segment(part, last, &mut params)?);
            }
        }
        Ok(PathPattern {
            text: text.to_owned(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the canonical path matches; one trailing slash counts as absent.
    pub fn matches(&self, path: &CanonicalPath) -> bool {
        let mut segments = path.segments();
        for pattern in &self.segments {
            match pattern {
                Segment::Rest => return true,
                Segment::Param => {
                    if segments.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(lit) => {
                    if segments.next() != Some(lit.as_str()) {
                        return false;
                    }
                }
            }
        }
        segments.next().is_none()
    }
}

fn parse_segment<'a>(
    part: &'a str,
    last: bool,
    params: &mut Vec<&'a str>,
) -> Result<Segment, String> {
    if part.is_empty() {
        return Err(if last {
            "expected no trailing `/` (a request's trailing slash is matched as if absent)".into()
        } else {
            "expected no empty segment (`//`)".into()
        });
    }
    if part == "**" {
        return if last {
            Ok(Segment::Rest)
        } else {
            Err("expected `**` only as the last segment".into())
        };
    }
    if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
        let valid = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !name.as_bytes()[0].is_ascii_digit();
        if !valid {
            return Err(format!(
                "expected `{{name}}` with a name of letters, digits and `_`, got `{part}`"
            ));
        }
        if params.contains(&name) {
            return Err(format!("parameter `{{{name}}}` appears twice"));
        }
        params.push(name);
        return Ok(Segment::Param);
    }
    if part.contains(['{', '}', '*']) {
        return Err(format!(
            "segment `{part}`: expected a literal, a whole `{{name}}` segment or a final `**`"
        ));
    }
    match CanonicalPath::parse(&format!("/{part}")) {
        Ok(canonical) if canonical.as_str()[1..] == *part => Ok(Segment::Literal(part.to_owned())),
        Ok(canonical) => Err(format!(
            "segment `{part}` is not canonical; write it as `{}`",
            &canonical.as_str()[1..]
        )),
        Err(e) => Err(format!("segment `{part}`: {e}")),
    }
}

/// Which keys may use a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleRule {
    /// `"*"`: any authenticated key.
    AnyKey,
    OneOf(Vec<String>),
}

impl RoleRule {
    pub fn from_names(names: &[String]) -> Self {
        if names.iter().any(|r| r == "*") {
            RoleRule::AnyKey
        } else {
            RoleRule::OneOf(names.to_vec())
        }
    }

    pub fn admits(&self, roles: &[String]) -> bool {
        match self {
            RoleRule::AnyKey => true,
            RoleRule::OneOf(allowed) => roles.iter().any(|r| allowed.contains(r)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    /// The name again, shared cheaply with what each request records.
    pub shared_name: std::sync::Arc<str>,
    pub methods: Vec<Method>,
    pub pattern: PathPattern,
    pub roles: RoleRule,
    pub role_names: Vec<String>,
    pub admin_key: bool,
}

impl Route {
    /// Whether method and path admit the request, whoever sends it.
    pub fn admits_request(&self, method: &Method, path: &CanonicalPath) -> bool {
        self.methods.contains(method) && self.pattern.matches(path)
    }
}

/// Why no route decides a request (the 403 says which, naming no route or role).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No route's path pattern matches the path.
    NoPathMatch,
    /// Routes match the path, but not this method or this key's roles.
    NotAdmitted,
}

/// The ordered allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(routes: Vec<Route>) -> Self {
        RouteTable { routes }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn any_bypass(&self) -> bool {
        self.routes.iter().any(|r| r.admin_key)
    }

    /// The route that decides a request from a key holding `roles`, if any admits it.
    pub fn decide(
        &self,
        method: &Method,
        path: &CanonicalPath,
        roles: &[String],
    ) -> Option<&Route> {
        self.decide_indexed(method, path, roles)
            .ok()
            .map(|(_, r)| r)
    }

    /// The deciding route and its position, or why none decides.
    pub fn decide_indexed(
        &self,
        method: &Method,
        path: &CanonicalPath,
        roles: &[String],
    ) -> Result<(usize, &Route), Denied> {
        let mut path_matched = false;
        for (i, r) in self.routes.iter().enumerate() {
            if !r.pattern.matches(path) {
                continue;
            }
            path_matched = true;
            if r.methods.contains(method) && r.roles.admits(roles) {
                return Ok((i, r));
            }
        }
        Err(if path_matched {
            Denied::NotAdmitted
        } else {
            Denied::NoPathMatch
        })
    }

    /// Routes admitting method and path, in order, whatever the caller's roles.
    pub fn candidates<'a>(
        &'a self,
        method: &'a Method,
        path: &'a CanonicalPath,
    ) -> impl Iterator<Item = (usize, &'a Route)> + 'a {
        self.routes
            .iter()
            .enumerate()
            .filter(move |(_, r)| r.admits_request(method, path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, methods: &[&str], path: &str, roles: &[&str], bypass: bool) -> Route {
        let role_names: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
        Route {
            name: name.into(),
            shared_name: name.into(),
            methods: methods.iter().map(|m| m.parse().unwrap()).collect(),
            pattern: PathPattern::parse(path).unwrap(),
            roles: RoleRule::from_names(&role_names),
            role_names,
            admin_key: bypass,
        }
    }

    #[test]
    fn pattern_matching_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("/", "/", true),
            ("/", "/wiki", false),
            ("/**", "/", true),
            ("/**", "/a/b/c", true),
            ("/wiki", "/wiki", true),
            ("/wiki", "/wiki/", true),
            ("/wiki", "/wikis", false),
            ("/wiki", "/wiki/x", false),
            ("/api", "/apiv2", false),
            ("/wiki/**", "/wiki", true),
            ("/wiki/**", "/wiki/", true),
            ("/wiki/**", "/wiki/a/b", true),
            ("/wiki/**", "/wikiX/a", false),
            ("/wiki/api/v2/pages/{id}", "/wiki/api/v2/pages/42", true),
            ("/wiki/api/v2/pages/{id}", "/wiki/api/v2/pages/42/", true),
            ("/wiki/api/v2/pages/{id}", "/wiki/api/v2/pages", false),
            ("/wiki/api/v2/pages/{id}", "/wiki/api/v2/pages/", false),
            (
                "/wiki/api/v2/pages/{id}",
                "/wiki/api/v2/pages/42/body",
                false,
            ),
            ("/wiki/api/v2/pages/{id}/**", "/wiki/api/v2/pages/42", true),
            (
                "/wiki/api/v2/pages/{id}/**",
                "/wiki/api/v2/pages/42/children/x",
                true,
            ),
            ("/wiki/api/v2/pages/{id}/**", "/wiki/api/v2/pages", false),
            ("/a/{x}/c", "/a/b/c", true),
            ("/a/{x}/c", "/a/b/d", false),
            ("/a/%20", "/a/%20", true),
            ("/a/b", "/a/%62", true),
        ];
        for (pattern, path, expected) in cases {
            let pattern = PathPattern::parse(pattern).unwrap();
            let path = CanonicalPath::parse(path).unwrap();
            assert_eq!(pattern.matches(&path), *expected, "{pattern:?} vs {path}");
        }
    }

    #[test]
    fn malformed_patterns_are_refused() {
        for bad in [
            "",
            "wiki",
            "/wiki/",
            "//wiki",
            "/**/x",
            "/a/*",
            "/a/{}",
            "/a/{1x}",
            "/a/{x}{y}",
            "/a/x{id}",
            "/a/{id}/{id}",
            "/a/..",
            "/a/.",
            "/a/%2F",
            "/a;b",
            "/a/%7e",
            "/a b",
        ] {
            assert!(PathPattern::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn first_route_admitting_method_path_and_roles_decides() {
        let table = RouteTable::new(vec![
            route(
                "scan",
                &["GET"],
                "/wiki/api/v2/pages/{id}",
                &["scanner"],
                true,
            ),
            route("read", &["GET", "HEAD"], "/wiki/**", &["*"], false),
        ]);
        let get = Method::GET;
        let page = CanonicalPath::parse("/wiki/api/v2/pages/7").unwrap();
        let scanner = vec!["scanner".to_string()];
        let other = vec!["reader".to_string()];
        assert_eq!(table.decide(&get, &page, &scanner).unwrap().name, "scan");
        assert_eq!(table.decide(&get, &page, &other).unwrap().name, "read");
        assert_eq!(table.decide(&get, &page, &[]).unwrap().name, "read");
        assert!(table.decide(&Method::POST, &page, &scanner).is_none());
        let head = table.decide(&Method::HEAD, &page, &scanner).unwrap();
        assert_eq!(head.name, "read", "HEAD is not implied by GET");
        let outside = CanonicalPath::parse("/rest/api").unwrap();
        assert!(table.decide(&get, &outside, &scanner).is_none());
        assert_eq!(
            table.decide_indexed(&get, &outside, &scanner).unwrap_err(),
            Denied::NoPathMatch
        );
        assert_eq!(
            table
                .decide_indexed(&Method::POST, &page, &scanner)
                .unwrap_err(),
            Denied::NotAdmitted
        );
        assert_eq!(
            table.decide_indexed(&get, &page, &other).unwrap().0,
            1,
            "position of the deciding route"
        );
        assert_eq!(table.candidates(&get, &page).count(), 2);
    }
}
