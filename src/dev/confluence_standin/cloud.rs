//! Listings shaped like Confluence Cloud's: cursor pagination with `_links.next`
//! (relative) and `_links.base` (the site's absolute URL), the same in a `Link`
//! header, and gzip when the client accepts it.

use http::header::{HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, LINK};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::routes::{number, page_json, Page, PAGES};
use super::StandinState;
use crate::body::Body;

/// Items per page unless `limit=` says otherwise.
const DEFAULT_LIMIT: u64 = 2;

/// A v2 listing: `?limit=N&cursor=K` over `results`.
pub(super) fn paginated(
    state: &StandinState,
    request: &Request<Incoming>,
    query: &str,
    path: &str,
    results: Vec<serde_json::Value>,
) -> Response<Body> {
    let limit = number(query, "limit").unwrap_or(DEFAULT_LIMIT).max(1);
    let start = number(query, "cursor").unwrap_or(0);
    let page: Vec<_> = results
        .iter()
        .skip(usize::try_from(start).unwrap_or(usize::MAX))
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
        .cloned()
        .collect();
    let origin = state.origin();
    let more = start + limit < results.len() as u64;
    let next = format!("{path}?limit={limit}&cursor={}", start + limit);
    let mut links = serde_json::json!({"base": format!("{origin}/wiki")});
    if more {
        links["next"] = serde_json::Value::String(next.clone());
    }
    let body = serde_json::json!({"results": page, "_links": links}).to_string();
    let mut r = encoded(request, body);
    let mut link = format!("<{origin}/wiki>; rel=\"base\"");
    if more {
        link = format!("<{next}>; rel=\"next\", {link}");
    }
    if let Ok(v) = HeaderValue::from_str(&link) {
        r.headers_mut().insert(LINK, v);
    }
    r
}

/// The v1 content listing (`/wiki/rest/api/content?start=&limit=`), with absolute
/// `self` links on every result as Cloud writes them.
pub(super) fn content_listing(
    state: &StandinState,
    request: &Request<Incoming>,
    query: &str,
) -> Response<Body> {
    let origin = state.origin();
    let limit = number(query, "limit").unwrap_or(DEFAULT_LIMIT).max(1);
    let start = number(query, "start").unwrap_or(0);
    let visible: Vec<_> = PAGES
        .iter()
        .filter(|p| state.visible(p, request.headers()))
        .collect();
    let results: Vec<_> = visible
        .iter()
        .skip(usize::try_from(start).unwrap_or(usize::MAX))
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
        .map(|p| {
            let mut v = page_json(p);
            let id = v["id"].as_str().unwrap_or("").to_owned();
            v["type"] = "page".into();
            v["_links"] = serde_json::json!({
                "self": format!("{origin}/wiki/rest/api/content/{id}"),
                "webui": format!("/spaces/ENG/pages/{id}"),
            });
            v
        })
        .collect();
    let mut links = serde_json::json!({
        "base": format!("{origin}/wiki"),
        "context": "/wiki",
        "self": format!("{origin}/wiki/rest/api/content"),
    });
    if start + limit < visible.len() as u64 {
        links["next"] = serde_json::Value::String(format!(
            "/rest/api/content?limit={limit}&start={}",
            start + limit
        ));
    }
    let body = serde_json::json!({
        "results": results,
        "start": start,
        "limit": limit,
        "size": results.len(),
        "_links": links,
    })
    .to_string();
    encoded(request, body)
}

/// One page in the v1 shape, with the site's absolute links.
pub(super) fn content(state: &StandinState, page: &Page) -> Response<Body> {
    let origin = state.origin();
    let mut v = page_json(page);
    let id = v["id"].as_str().unwrap_or("").to_owned();
    v["type"] = "page".into();
    v["_links"] = serde_json::json!({
        "self": format!("{origin}/wiki/rest/api/content/{id}"),
        "webui": format!("/spaces/ENG/pages/{id}"),
        "base": format!("{origin}/wiki"),
        "context": "/wiki",
    });
    super::json(StatusCode::OK, v.to_string())
}

/// JSON, gzip-encoded when the request accepts gzip.
fn encoded(request: &Request<Incoming>, body: String) -> Response<Body> {
    let gzip = request
        .headers()
        .get(ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("gzip"));
    let mut r = if gzip {
        let mut r = Response::new(crate::body::full(super::bodies::gzip_stored(
            body.as_bytes(),
        )));
        r.headers_mut()
            .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        r
    } else {
        Response::new(crate::body::full(body))
    };
    *r.status_mut() = StatusCode::OK;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
