//! TLS on both sides: the listener offers h2 and http/1.1 by ALPN; the upstream
//! client trusts an extra CA bundle and speaks HTTP/2 when the site offers it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::pki::{client_tls, make_pki, tls_standin, Pki};
use support::{DemoKeyExt as _, Harness, Setup};

#[tokio::test]
async fn tls_listener_negotiates_h2_by_alpn_and_upstream_tls_uses_the_extra_ca() {
    let pki = make_pki();
    let standin = tls_standin(&pki).await;
    let port = standin.addr.port();
    let h = Harness::start_in_front_of(
        standin,
        Setup {
            base_url: Some(format!("https://localhost:{port}")),
            confluence_extra: format!("  ca_file: {}\n", pki.ca_pem.display()),
            listen_tls: Some((pki.cert_pem.clone(), pki.key_pem.clone())),
            ..Default::default()
        },
    )
    .await;

    // Client side: TLS with ALPN h2.
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let server_name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = client_tls(&pki, &[b"h2"])
        .connect(server_name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let auth = h.reader.basic();
    let request = http::Request::builder()
        .uri(format!("https://localhost:{}/wiki/version", h.addr.port()))
        .header("authorization", &auth)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    // The stand-in offers h2 by ALPN, so keygate's upstream connection is HTTP/2.
    assert_eq!(body["version"], "HTTP/2.0");
    let seen = h.forwarded();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header_values("x-forwarded-proto"), ["https"]);
    h.stop().await;
}

#[tokio::test]
async fn upstream_with_an_untrusted_certificate_is_unreachable() {
    let pki = make_pki();
    let standin = tls_standin(&pki).await;
    let port = standin.addr.port();
    let h = Harness::start_in_front_of(
        standin,
        Setup {
            base_url: Some(format!("https://localhost:{port}")),
            ..Default::default()
        },
    )
    .await;
    let auth = h.reader.basic();
    let reply = support::client::get(&h.url("/wiki/version"), &[("Authorization", &auth)]).await;
    assert_eq!(reply.status, 502);
    assert!(h.forwarded().is_empty());
    h.stop().await;
}

#[tokio::test]
async fn a_rotated_listener_certificate_is_served_without_a_restart() {
    let old = make_pki();
    let h = Harness::start_with(Setup {
        listen_tls: Some((old.cert_pem.clone(), old.key_pem.clone())),
        ..Default::default()
    })
    .await;
    let handshake = |pki: &Pki| {
        let connector = client_tls(pki, &[b"http/1.1"]);
        let addr = h.addr;
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            connector.connect(name, tcp).await.is_ok()
        }
    };
    assert!(handshake(&old).await);
    let new = make_pki();
    std::fs::copy(&new.cert_pem, &old.cert_pem).unwrap();
    std::fs::copy(&new.key_pem, &old.key_pem).unwrap();
    h.control.reload("test").await.unwrap();
    assert!(handshake(&new).await, "the new certificate is served");
    assert!(!handshake(&old).await, "the old one is gone");
    // A broken pair keeps the current certificate.
    std::fs::write(&old.key_pem, "not a key").unwrap();
    let _ = h.control.reload("test").await;
    assert!(handshake(&new).await);
    h.stop().await;
}
