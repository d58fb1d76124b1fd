//! keygate as Confluence clients see it: a client that follows every URL it is
//! given never leaves keygate, and no client credential reaches the site;
//! e-mail-shaped usernames; an upstream 401 is keygate's problem, not the
//! client's; 403s say which denial; commands that need no secret run without;
//! and real client libraries (atlassian-python-api, confluence.js) work unchanged.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;

use support::check::assert_never_forwarded;
use support::client::{get, send};
use support::{DemoKeyExt as _, Harness, Setup};

/// Every absolute URL in a JSON value or header text.
fn urls(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for scheme in ["http://", "https://"] {
        let mut rest = text;
        while let Some(i) = rest.find(scheme) {
            let tail = &rest[i..];
            let end = tail.find(['"', '>', ' ', ',']).unwrap_or(tail.len());
            out.push(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    out
}

#[tokio::test]
async fn a_client_following_every_link_it_is_given_never_leaves_keygate() {
    let h = Harness::start().await;
    let auth = h.reader.basic();
    let site = h.standin.base_url();
    let ours = format!("http://{}", h.addr);
    // A paginated v2 listing: follow `Link: rel="next"` and `_links.base` +
    // `_links.next` until the end.
    let mut next = Some(h.url("/wiki/api/v2/pages?limit=1"));
    let mut seen_ids = Vec::new();
    while let Some(url) = next.take() {
        assert!(url.starts_with(&ours), "sent to {url}");
        let reply = get(&url, &[("Authorization", &auth)]).await;
        assert_eq!(reply.status, 200, "{url}: {}", reply.text());
        let body = reply.json();
        seen_ids.extend(
            body["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["id"].as_str().unwrap().to_owned()),
        );
        let link = reply.headers["link"].to_str().unwrap().to_owned();
        for u in urls(&link).into_iter().chain(urls(&reply.text())) {
            assert!(
                u.starts_with(&ours),
                "the site's URL {u} reached the client"
            );
        }
        assert_eq!(body["_links"]["base"], format!("{ours}/wiki"));
        if let Some(rel) = body["_links"]["next"].as_str() {
            // Cloud's docs: join the site root with `next`.
            let root = body["_links"]["base"]
                .as_str()
                .unwrap()
                .trim_end_matches("/wiki");
            next = Some(format!("{root}{rel}"));
        }
    }
    assert_eq!(seen_ids, ["1001", "1002"], "every page, page by page");
    // A tiny link: the absolute Location points at keygate.
    let reply = get(&h.url("/wiki/x/1001"), &[("Authorization", &auth)]).await;
    assert_eq!(reply.status, 302);
    let location = reply.headers["location"].to_str().unwrap().to_owned();
    assert_eq!(location, format!("{ours}/wiki/api/v2/pages/1001"));
    assert_eq!(
        get(&location, &[("Authorization", &auth)]).await.status,
        200
    );
    // `_links.self` in a v1 answer, too.
    let reply = get(
        &h.url("/wiki/rest/api/content/1001"),
        &[("Authorization", &auth)],
    )
    .await;
    assert_eq!(
        reply.json()["_links"]["self"],
        format!("{ours}/wiki/rest/api/content/1001")
    );
    assert!(!reply.text().contains(&site));
    assert_never_forwarded(&h.standin.state, "a client credential", |r| {
        r.header_values("authorization") != [support::admin_basic()]
    });
    h.stop().await;
}

#[tokio::test]
async fn public_url_names_keygate_behind_a_load_balancer_and_bad_hosts_are_not_trusted() {
    let h = Harness::start_with(Setup {
        listen_extra: "  public_url: https://keygate.example.com\n".into(),
        ..Default::default()
    })
    .await;
    let auth = h.reader.basic();
    let reply = get(&h.url("/wiki/x/1001"), &[("Authorization", &auth)]).await;
    assert_eq!(
        reply.headers["location"],
        "https://keygate.example.com/wiki/api/v2/pages/1001"
    );
    h.stop().await;

    // Without public_url, an invalid Host is never used: the URL becomes relative.
    let h = Harness::start().await;
    let (status, raw) = support::client::raw(
        h.addr,
        &format!(
            "GET /wiki/x/1001 HTTP/1.1\r\nHost: evil.example/x\r\nAuthorization: {}",
            h.reader.basic()
        ),
    )
    .await;
    assert_eq!(status, 302, "{raw}");
    assert!(
        raw.to_ascii_lowercase()
            .contains("location: /wiki/api/v2/pages/1001\r\n"),
        "{raw}"
    );
    h.stop().await;
}

#[tokio::test]
async fn compressed_json_is_asked_for_plain_when_rewriting_and_passes_untouched_otherwise() {
    let h = Harness::start().await;
    let auth = h.reader.basic();
    let reply = get(
        &h.url("/wiki/api/v2/pages?limit=1"),
        &[("Authorization", &auth), ("Accept-Encoding", "gzip")],
    )
    .await;
    assert!(reply.headers.get("content-encoding").is_none());
    assert!(reply.text().contains(&format!("http://{}/wiki", h.addr)));
    let sent = h.forwarded().pop().unwrap();
    assert_eq!(sent.header_values("accept-encoding"), ["identity"]);
    h.stop().await;

    let h = Harness::start_with(Setup {
        confluence_extra: "  rewrite_json: false\n".into(),
        ..Default::default()
    })
    .await;
    let reply = get(
        &h.url("/wiki/api/v2/pages?limit=1"),
        &[("Authorization", &auth_of(&h)), ("Accept-Encoding", "gzip")],
    )
    .await;
    assert_eq!(reply.headers["content-encoding"], "gzip");
    assert_eq!(
        &reply.body[..2],
        &[0x1f, 0x8b],
        "the gzip body passed unchanged"
    );
    h.stop().await;
}

fn auth_of(h: &Harness) -> String {
    h.reader.basic()
}

#[tokio::test]
async fn an_upstream_401_is_a_502_for_the_client_and_a_readiness_reason() {
    let h = Harness::start().await;
    let auth = h.reader.basic();
    // The admin's token expires: Confluence refuses keygate's credential.
    let config = h.dir.join("keygate.yaml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace(support::ADMIN_TOKEN, "expired-token")).unwrap();
    h.control.reload("test").await.unwrap();
    let reply = get(
        &h.url("/wiki/api/v2/pages/1001"),
        &[("Authorization", &auth)],
    )
    .await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.json()["error"], "upstream_credentials_rejected");
    assert!(reply.headers.get("www-authenticate").is_none());
    let ready = get(&h.ops_url("/readyz"), &[]).await;
    assert_eq!(ready.status, 503);
    assert!(
        ready.text().contains("rejected the admin credential"),
        "{}",
        ready.text()
    );
    let metrics = get(&h.ops_url("/metrics"), &[]).await.text();
    assert!(
        metrics.contains("keygate_upstream_credentials_rejected_total 1"),
        "{metrics}"
    );
    // Fixed: the next answer clears the reason.
    std::fs::write(&config, good).unwrap();
    h.control.reload("test").await.unwrap();
    assert_eq!(
        get(
            &h.url("/wiki/api/v2/pages/1001"),
            &[("Authorization", &auth)]
        )
        .await
        .status,
        200
    );
    assert_eq!(get(&h.ops_url("/readyz"), &[]).await.status, 200);
    h.stop().await;
}

#[tokio::test]
async fn a_403_says_whether_no_route_covers_the_path_or_none_admits_the_request() {
    let h = Harness::start().await;
    let auth = h.reader.basic();
    let missing_prefix = get(&h.url("/api/v2/pages/1001"), &[("Authorization", &auth)]).await;
    assert_eq!(missing_prefix.status, 403);
    assert!(missing_prefix.json()["message"]
        .as_str()
        .unwrap()
        .contains("no route covers this path"));
    let wrong_method = send(
        "DELETE",
        &h.url("/wiki/api/v2/pages/1001"),
        &[("Authorization", &auth)],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(wrong_method.status, 403);
    let message = wrong_method.json()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("none allows this method"), "{message}");
    for reply in [&missing_prefix, &wrong_method] {
        let text = reply.text();
        assert!(
            !text.contains("read-anything") && !text.contains("compliance"),
            "{text}"
        );
    }
    h.stop().await;
}

#[test]
fn explain_and_keys_run_without_any_secret_and_check_names_the_missing_one() {
    let tmp = support::temp_dir("nosecrets");
    let config = tmp.path().join("keygate.yaml");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/keygate.example.yaml"),
    )
    .unwrap()
    .replace(
        "keys.example.yaml",
        &format!("{}/config/keys.example.yaml", env!("CARGO_MANIFEST_DIR")),
    );
    std::fs::write(&config, text).unwrap();
    let config = config.to_str().unwrap();
    let out = support::process::cli(&["keys", "list", "--config", config], None, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("scanner"), "{}", out.stdout);
    let out = support::process::cli(
        &[
            "explain",
            "GET",
            "/wiki/api/v2/pages/42",
            "--config",
            config,
        ],
        None,
        &[],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("scan-restricted-pages"),
        "{}",
        out.stdout
    );
    let out = support::process::cli(&["check", "--config", config], None, &[]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("CONFLUENCE_API_TOKEN"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_following_redirects_with_its_credentials_stays_on_keygate() {
    let h = Harness::start().await;
    let user = format!("{}:{}", h.reader.client_id, h.reader.secret);
    let url = h.url("/wiki/x/1001");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-s", "-L", "--location-trusted", "-u", &user, &url])
            .output()
            .expect("curl is installed (.ci/run installs it)")
    })
    .await
    .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["id"], "1001");
    assert_never_forwarded(&h.standin.state, "the client's credential", |r| {
        r.header_values("authorization") != [support::admin_basic()]
    });
    h.stop().await;
}

/// Runs a client library script against keygate; `None` when its runtime or the
/// library is not installed (unless CI requires them).
fn run_library(program: &str, script: &str, h: &Harness) -> Option<serde_json::Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients");
    let args = [
        dir.join(script).to_str().unwrap().to_owned(),
        format!("http://{}", h.addr),
        h.reader.client_id.clone(),
        h.reader.secret.clone(),
        h.scanner.client_id.clone(),
        h.scanner.secret.clone(),
    ];
    let out = std::process::Command::new(program)
        .args(&args)
        .current_dir(&dir)
        .output();
    let required = std::env::var("KEYGATE_REQUIRE_CLIENT_LIBS").is_ok_and(|v| v == "1");
    let missing = match &out {
        Err(e) => Some(e.to_string()),
        Ok(o) if !o.status.success() => {
            let err = String::from_utf8_lossy(&o.stderr).into_owned();
            let absent = err.contains("No module named")
                || err.contains("Cannot find package")
                || err.contains("ERR_MODULE_NOT_FOUND");
            if absent {
                Some(err)
            } else {
                panic!("{script} failed: {err}");
            }
        }
        Ok(_) => None,
    };
    if let Some(why) = missing {
        assert!(
            !required,
            "{script}: the client library is required here: {why}"
        );
        eprintln!(
            "SKIPPED {script}: its client library is not installed ({}); .ci/run installs it",
            why.lines().last().unwrap_or("")
        );
        return None;
    }
    let out = out.unwrap();
    Some(
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{script}: {e}: {}", String::from_utf8_lossy(&out.stdout))),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_client_libraries_page_follow_redirects_and_read_through_the_bypass() {
    let h = Harness::start().await;
    for (program, script) in [("python3", "python_client.py"), ("node", "node_client.mjs")] {
        let result = {
            let h = &h;
            tokio::task::block_in_place(|| run_library(program, script, h))
        };
        let Some(result) = result else { continue };
        assert_eq!(
            result["ids"],
            serde_json::json!(["1001", "1002"]),
            "{script}"
        );
        assert_eq!(result["redirected"], "1001", "{script}");
        assert_eq!(
            result["restricted"], "Salary bands 2026 (restricted)",
            "{script}"
        );
    }
    assert_never_forwarded(&h.standin.state, "a client credential", |r| {
        r.header_values("authorization") != [support::admin_basic()]
    });
    h.stop().await;
}
