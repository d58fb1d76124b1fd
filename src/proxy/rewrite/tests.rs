//! Origin rewriting: header tables, and the streaming replacer against the
//! whole-body answer for every way of cutting the body into chunks.

use super::*;
use proptest::prelude::*;

const SITE: (&str, &str) = ("https", "example.atlassian.net");
const PUBLIC: &str = "https://keygate.internal:8443";

fn site() -> Site {
    Site::new(SITE.0, SITE.1)
}

#[test]
fn urls_on_the_site_origin_are_rewritten_and_others_are_not() {
    let cases: &[(&str, Option<&str>)] = &[
        (
            "https://example.atlassian.net/wiki/spaces/ENG",
            Some("https://keygate.internal:8443/wiki/spaces/ENG"),
        ),
        (
            "HTTPS://Example.Atlassian.Net/wiki/x?y=1",
            Some("https://keygate.internal:8443/wiki/x?y=1"),
        ),
        (
            "https://example.atlassian.net:443/wiki",
            Some("https://keygate.internal:8443/wiki"),
        ),
        (
            "https://example.atlassian.net",
            Some("https://keygate.internal:8443"),
        ),
        ("https://example.atlassian.net.evil.com/wiki", None),
        ("https://example.atlassian.net:8443/wiki", None),
        ("http://example.atlassian.net/wiki", None),
        ("https://api.media.atlassian.com/file/1", None),
        ("/wiki/relative", None),
        ("https://user@example.atlassian.net/wiki", None),
    ];
    for (url, want) in cases {
        assert_eq!(site().rewrite_url(url, PUBLIC).as_deref(), *want, "{url}");
    }
    assert_eq!(
        site()
            .rewrite_url("https://example.atlassian.net/wiki/x", "")
            .as_deref(),
        Some("/wiki/x"),
        "no public origin: origin-relative"
    );
}

#[test]
fn location_content_location_and_link_are_rewritten() {
    let mut h = HeaderMap::new();
    h.insert(
        LOCATION,
        HeaderValue::from_static("https://example.atlassian.net/wiki/spaces/ENG/pages/1"),
    );
    h.insert(
        CONTENT_LOCATION,
        HeaderValue::from_static("https://api.media.atlassian.com/x"),
    );
    h.append(
        LINK,
        HeaderValue::from_static(
            "<https://example.atlassian.net/wiki>; rel=\"base\", </wiki/api/v2/pages?cursor=a>; rel=\"next\"",
        ),
    );
    site().rewrite_headers_to(&mut h, PUBLIC);
    assert_eq!(
        h[LOCATION],
        "https://keygate.internal:8443/wiki/spaces/ENG/pages/1"
    );
    assert_eq!(h[CONTENT_LOCATION], "https://api.media.atlassian.com/x");
    assert_eq!(
        h[LINK],
        "<https://keygate.internal:8443/wiki>; rel=\"base\", </wiki/api/v2/pages?cursor=a>; rel=\"next\""
    );
}

#[test]
fn public_origin_comes_from_config_or_a_valid_host_only() {
    let req = |host: &str| {
        Request::builder()
            .uri("/wiki")
            .header(HOST, host)
            .body(())
            .unwrap()
    };
    let configured = Replacement::new("https://kg.example".into());
    let resolve = |configured: Option<&Arc<Replacement>>, host: &str| {
        let cache = Mutex::new(None);
        let public = Public {
            configured,
            scheme: "http",
            authority: request_authority(&req(host)),
            cache: &cache,
        };
        let first = public.resolve();
        assert_eq!(public.resolve().as_str(), first.as_str(), "cached alike");
        first.as_str().to_owned()
    };
    assert_eq!(resolve(Some(&configured), "x"), "https://kg.example");
    assert_eq!(resolve(None, "kg.example:8080"), "http://kg.example:8080");
    for bad in ["evil.com/x", "a@evil.com", "", "a b", "[::1"] {
        assert_eq!(resolve(None, bad), "", "{bad:?}");
    }
}

const BODY: &str = r#"{"results":[{"id":"1","_links":{"webui":"/spaces/X","self":"https://example.atlassian.net/wiki/api/v2/pages/1"}}],"_links":{"base":"https://example.atlassian.net/wiki","next":"/wiki/api/v2/pages?cursor=abc","escaped":"https:\/\/example.atlassian.net\/wiki","other":"https://example.atlassian.net.evil/x","hh":"hhttps://example.atlassian.net/"}}"#;

fn whole(body: &str) -> String {
    let mut r = site().json_rewriter(Replacement::new(PUBLIC.into()));
    String::from_utf8(r.push(body.as_bytes(), true).to_vec()).unwrap()
}

#[test]
fn json_bodies_are_rewritten_in_both_spellings() {
    let out = whole(BODY);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["_links"]["base"], "https://keygate.internal:8443/wiki");
    assert_eq!(
        v["results"][0]["_links"]["self"],
        "https://keygate.internal:8443/wiki/api/v2/pages/1"
    );
    assert_eq!(v["_links"]["escaped"], "https://keygate.internal:8443/wiki");
    assert_eq!(v["_links"]["other"], "https://example.atlassian.net.evil/x");
    assert_eq!(v["_links"]["hh"], "hhttps://keygate.internal:8443/");
    assert!(!out.contains("example.atlassian.net/"), "{out}");
}

proptest! {
    #[test]
    fn chunk_boundaries_never_change_the_result(cuts in proptest::collection::vec(0usize..BODY.len(), 0..12)) {
        let mut cuts = cuts;
        cuts.sort_unstable();
        cuts.dedup();
        let bytes = BODY.as_bytes();
        let mut r = site().json_rewriter(Replacement::new(PUBLIC.into()));
        let mut out = Vec::new();
        let mut start = 0;
        for cut in cuts {
            out.extend_from_slice(&r.push_bytes(Bytes::copy_from_slice(&bytes[start..cut]), false));
            start = cut;
        }
        out.extend_from_slice(&r.push(&bytes[start..], true));
        prop_assert_eq!(String::from_utf8(out).unwrap(), whole(BODY));
    }
}
