//! Header hygiene tables.

use super::*;

fn map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn names(h: &HeaderMap) -> Vec<String> {
    let mut n: Vec<String> = h.keys().map(|k| k.to_string()).collect();
    n.sort();
    n
}

type Pairs<'a> = &'a [(&'a str, &'a str)];

#[test]
fn request_stripping_table() {
    let cases: &[(Pairs, &[&str])] = &[
        (
            &[("Authorization", "Basic x"), ("Accept", "*/*")],
            &["accept"],
        ),
        (&[("Atl-Confluence-With-Admin-Key", "true")], &[]),
        (&[("atl_confluence_with_admin_key", "true")], &[]),
        (&[("ATL_CONFLUENCE-WITH_ADMIN-KEY", "yes")], &[]),
        (&[("Cookie", "a=b"), ("Proxy-Authorization", "x")], &[]),
        (
            &[("Forwarded", "for=1.2.3.4"), ("X-Forwarded-For", "1.2.3.4")],
            &[],
        ),
        (
            &[("X-Forwarded-Host", "evil"), ("x_forwarded_proto", "https")],
            &[],
        ),
        (
            &[
                ("Connection", "keep-alive, X-Custom"),
                ("X-Custom", "1"),
                ("X-Other", "2"),
            ],
            &["x-other"],
        ),
        (&[("Connection", "x_custom"), ("X-Custom", "1")], &[]),
        (
            &[
                ("Keep-Alive", "5"),
                ("TE", "trailers"),
                ("Trailer", "x"),
                ("Upgrade", "h2c"),
            ],
            &[],
        ),
        (
            &[("Transfer-Encoding", "chunked"), ("Content-Length", "5")],
            &["content-length"],
        ),
        (
            &[
                ("Host", "keygate"),
                ("X-Request-Id", "abc"),
                ("Expect", "100-continue"),
            ],
            &[],
        ),
        (
            &[("Content-Type", "application/json"), ("User-Agent", "t")],
            &["content-type", "user-agent"],
        ),
    ];
    for (input, kept) in cases {
        let mut h = map(input);
        strip_request(&mut h);
        assert_eq!(names(&h), *kept, "{input:?}");
    }
}

#[test]
fn connection_cannot_remove_what_keygate_adds() {
    let mut h = map(&[(
        "Connection",
        "Authorization, Atl-Confluence-With-Admin-Key, X-Request-Id, Host, Forwarded",
    )]);
    strip_request(&mut h);
    let auth = HeaderValue::from_static("Basic YWRtaW46dG9rZW4=");
    let host = HeaderValue::from_static("site.example");
    let rid = HeaderValue::from_static("rid-1");
    add_upstream(
        &mut h,
        &UpstreamHeaders {
            authorization: &auth,
            host: &host,
            bypass: true,
            request_id: &rid,
            forwarded: &ForwardedFor::new("[2001:db8::1]:4711".parse().unwrap(), "https"),
        },
    );
    assert_eq!(h.get_all(AUTHORIZATION).iter().count(), 1);
    assert_eq!(h[&BYPASS_HEADER], "true");
    assert_eq!(h[&X_REQUEST_ID], "rid-1");
    assert_eq!(h[HOST], "site.example");
    assert_eq!(h[&FORWARDED], "for=\"[2001:db8::1]:4711\";proto=https");
    assert_eq!(h[&X_FORWARDED_FOR], "2001:db8::1");
    assert_eq!(h[&X_FORWARDED_PROTO], "https");
}

#[test]
fn response_stripping_removes_cookies_and_hop_by_hop() {
    let mut h = map(&[
        ("Set-Cookie", "a=b"),
        ("set-cookie", "c=d"),
        ("Set-Cookie2", "e=f"),
        ("set_cookie", "g=h"),
        ("Connection", "close, X-Internal"),
        ("X-Internal", "1"),
        ("Content-Type", "application/json"),
    ]);
    strip_response(&mut h);
    assert_eq!(names(&h), ["content-type"]);
}

#[test]
fn client_request_ids() {
    let cases: &[(Pairs, bool)] = &[
        (&[("X-Request-Id", "abc-123._:Z")], true),
        (&[("X-Request-Id", "has space")], false),
        (&[("X-Request-Id", "")], false),
        (&[("X-Request-Id", "a"), ("X-Request-Id", "b")], false),
        (&[("X-Request-Id", &"x".repeat(128))], true),
        (&[("X-Request-Id", &"x".repeat(129))], false),
        (&[("X-Request-Id", "\"quoted\"")], false),
        (&[], false),
    ];
    for (input, reused) in cases {
        assert_eq!(
            client_request_id(&map(input)).is_some(),
            *reused,
            "{input:?}"
        );
    }
    assert_eq!(new_request_id().len(), 36);
}

#[test]
fn to_upstream_is_strip_then_add() {
    let auth = HeaderValue::from_static("Basic YWRtaW46dG9rZW4=");
    let host = HeaderValue::from_static("site.example");
    let rid = HeaderValue::from_static("rid-1");
    let fwd = ForwardedFor::new("10.1.2.3:4711".parse().unwrap(), "http");
    let add = |bypass| UpstreamHeaders {
        authorization: &auth,
        host: &host,
        bypass,
        request_id: &rid,
        forwarded: &fwd,
    };
    let inputs: &[Pairs] = &[
        &[
            ("Authorization", "Basic x"),
            ("Host", "kg"),
            ("Accept", "*/*"),
        ],
        &[
            ("X-Request-Id", "a"),
            ("x_request_id", "b"),
            ("Forwarded", "for=1"),
        ],
        &[
            ("X-Forwarded-For", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("X-Forwarded-Host", "e"),
        ],
        &[
            ("Connection", "authorization, x-custom"),
            ("X-Custom", "1"),
            ("Atl-Confluence-With-Admin-Key", "true"),
        ],
        &[
            ("atl_confluence_with_admin_key", "true"),
            ("Cookie", "a=b"),
            ("TE", "trailers"),
        ],
    ];
    for input in inputs {
        for bypass in [false, true] {
            let mut a = map(input);
            strip_request(&mut a);
            add_upstream(&mut a, &add(bypass));
            let mut b = map(input);
            to_upstream(&mut b, &add(bypass));
            let dump = |h: &HeaderMap| {
                let mut v: Vec<String> = h.iter().map(|(k, v)| format!("{k}: {v:?}")).collect();
                v.sort();
                v
            };
            assert_eq!(dump(&a), dump(&b), "{input:?} bypass={bypass}");
        }
    }
}
