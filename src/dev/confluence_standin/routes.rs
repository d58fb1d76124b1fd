//! What the stand-in serves: the v2 admin-key API, spaces and pages (some
//! restricted), uploads and downloads, and answers shaped like Confluence Cloud's
//! (absolute URLs of the site in redirects, `Link` headers and `_links`).

use std::time::Duration;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;

use super::bodies::{upload, PatternBody};
use super::{json, StandinState};
use crate::body::Body;

pub(super) struct Page {
    id: u64,
    space: &'static str,
    title: &'static str,
    pub(super) restricted: bool,
}

pub(super) const PAGES: &[Page] = &[
    Page {
        id: 1001,
        space: "ENG",
        title: "Welcome to Engineering",
        restricted: false,
    },
    Page {
        id: 1002,
        space: "ENG",
        title: "Architecture overview",
        restricted: false,
    },
    Page {
        id: 1003,
        space: "ENG",
        title: "Incident review (restricted)",
        restricted: true,
    },
    Page {
        id: 2001,
        space: "HR",
        title: "Salary bands 2026 (restricted)",
        restricted: true,
    },
];

pub(super) fn not_found() -> String {
    serde_json::json!({"errors": [{"status": 404, "code": "NOT_FOUND", "title": "Not Found"}]})
        .to_string()
}

pub(super) fn page_json(page: &Page) -> serde_json::Value {
    serde_json::json!({
        "id": page.id.to_string(),
        "status": "current",
        "title": page.title,
        "spaceId": page.space,
        "body": {"storage": {"value": format!("<p>{}</p>", page.title), "representation": "storage"}},
    })
}

pub(super) async fn route(state: &StandinState, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = request.method().clone();
    match (method.clone(), segments.as_slice()) {
        (_, ["wiki", "api", "v2", "admin-key"]) => {
            let body = request
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let (status, retry_after, text) = state.admin_key_call(&method, &body).await;
            let mut r = if status == StatusCode::NO_CONTENT {
                let mut r = Response::new(crate::body::empty());
                *r.status_mut() = status;
                r
            } else {
                json(status, text)
            };
            if let Some(secs) = retry_after {
                r.headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
            }
            r
        }
        (Method::GET, ["wiki", "api", "v2", "spaces"]) => json(
            StatusCode::OK,
            serde_json::json!({"results": [
                {"id": "ENG", "key": "ENG", "name": "Engineering"},
                {"id": "HR", "key": "HR", "name": "People (restricted pages)"},
            ]})
            .to_string(),
        ),
        (Method::GET, ["wiki", "api", "v2", "pages"]) => {
            let results: Vec<_> = PAGES
                .iter()
                .filter(|p| state.visible(p, request.headers()))
                .map(page_json)
                .collect();
            super::cloud::paginated(state, &request, &query, "/wiki/api/v2/pages", results)
        }
        (Method::GET | Method::HEAD, ["wiki", "api", "v2", "pages", id, rest @ ..]) => {
            match PAGES.iter().find(|p| p.id.to_string() == *id) {
                Some(page) if state.visible(page, request.headers()) => match rest {
                    [] => json(StatusCode::OK, page_json(page).to_string()),
                    ["labels"] => {
                        json(StatusCode::OK, r#"{"results":[{"name":"standin"}]}"#.into())
                    }
                    _ => json(StatusCode::NOT_FOUND, not_found()),
                },
                _ => json(StatusCode::NOT_FOUND, not_found()),
            }
        }
        (
            Method::POST | Method::PUT,
            ["wiki", "rest", "api", "content", _, "child", "attachment"],
        ) => upload(state, request.into_body()).await,
        (Method::GET, ["wiki", "download", "attachments", _, _]) => {
            let size = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("size="))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(1024);
            let mut r = Response::new(crate::body::boxed(PatternBody {
                remaining: size,
                offset: 0,
            }));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        (Method::GET, ["wiki", "slow"]) => {
            let ms = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("ms="))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            json(StatusCode::OK, r#"{"slow":true}"#.into())
        }
        (_, ["wiki", "version"]) => json(
            StatusCode::OK,
            serde_json::json!({"version": format!("{:?}", request.version())}).to_string(),
        ),
        (Method::GET, ["wiki", "rate-limited"]) => {
            let after = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("after="))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(30);
            let mut r = json(
                StatusCode::TOO_MANY_REQUESTS,
                r#"{"message":"Rate limit exceeded"}"#.into(),
            );
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(after));
            r
        }
        (Method::GET, ["wiki", "redirect"]) => {
            let mut r = json(StatusCode::FOUND, "{}".into());
            r.headers_mut().insert(
                http::header::LOCATION,
                HeaderValue::from_static("/wiki/api/v2/spaces"),
            );
            r
        }
        (Method::GET, ["wiki", "trailers"]) => super::bodies::with_trailers(),
        (Method::GET, ["wiki", "stall"]) => {
            let bytes = number(&query, "bytes").unwrap_or(16);
            super::bodies::stalling(bytes)
        }
        (Method::GET, ["wiki", "switch"]) => {
            let mut r = Response::new(crate::body::empty());
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut()
                .insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
            r.headers_mut().insert(
                http::header::CONNECTION,
                HeaderValue::from_static("upgrade"),
            );
            r
        }
        // A tiny link: Confluence Cloud answers with the site's absolute URL.
        (Method::GET, ["wiki", "x", code]) => {
            let mut r = json(StatusCode::FOUND, "{}".into());
            let location = format!("{}/wiki/api/v2/pages/{code}", state.origin());
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(http::header::LOCATION, v);
            }
            r
        }
        (Method::GET, ["wiki", "rest", "api", "content"]) => {
            super::cloud::content_listing(state, &request, &query)
        }
        (Method::GET, ["wiki", "rest", "api", "content", id]) => {
            match PAGES.iter().find(|p| p.id.to_string() == *id) {
                Some(page) if state.visible(page, request.headers()) => {
                    super::cloud::content(state, page)
                }
                _ => json(StatusCode::NOT_FOUND, not_found()),
            }
        }
        _ => json(StatusCode::NOT_FOUND, not_found()),
    }
}

/// The number after `name=` in a query string.
pub(super) fn number(query: &str, name: &str) -> Option<u64> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|n| n.parse().ok())
}
