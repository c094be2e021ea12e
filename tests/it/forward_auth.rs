//! Forward-auth with a real nginx `auth_request` in front of an app, set up as
//! docs/forward-auth.md says: nginx asks poort for each request, passes only what poort lets
//! through, and copies poort's identity headers to the app; a browser without a session is
//! sent to sign in and comes back with one. Also the Traefik/Caddy form of the question, and
//! callers poort must not believe.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{Gate, Nginx, Resp, TempDir, closed_port, hand_off, hand_off_from, parse_response};

const APP: &str = r#"
[[app]]
name = "fwd"
host = "fwd.localhost"
forward_auth = true
access = { rules = [{ effect = "allow", groups = ["staff"] }] }
"#;

/// The nginx config of docs/forward-auth.md, for poort at `gate` and the app at `app`.
fn nginx_conf(port: u16, gate: SocketAddr, app: SocketAddr) -> String {
    format!(
        r#"
  server {{
    listen 127.0.0.1:{port};
    server_name fwd.localhost;

    # The question is the proxy's to ask: no client asks it through the pass-through below.
    location = /.poort/auth {{ return 404; }}
    # poort's own pages on the app's host: sign-in hand-off, assets.
    location /.poort/ {{
      proxy_pass https://{gate};
      proxy_ssl_server_name on;
      proxy_ssl_name fwd.localhost;
      proxy_set_header Host fwd.localhost;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Uri "";
      proxy_set_header X-Forwarded-Method "";
    }}

    location = /.poort-auth {{
      internal;
      proxy_pass https://{gate}/.poort/auth;
      proxy_ssl_server_name on;
      proxy_ssl_name fwd.localhost;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header Host fwd.localhost;
      proxy_set_header X-Forwarded-Uri $request_uri;
      proxy_set_header X-Forwarded-Method $request_method;
      proxy_set_header X-Forwarded-For $remote_addr;
    }}

    location / {{
      auth_request /.poort-auth;
      auth_request_set $poort_user $upstream_http_x_poort_user;
      auth_request_set $poort_email $upstream_http_x_poort_email;
      auth_request_set $poort_groups $upstream_http_x_poort_groups;
      auth_request_set $poort_assertion $upstream_http_x_poort_assertion;
      auth_request_set $poort_signin $upstream_http_location;
      error_page 401 =302 $poort_signin;
      proxy_set_header X-Poort-User $poort_user;
      proxy_set_header X-Poort-Email $poort_email;
      proxy_set_header X-Poort-Groups $poort_groups;
      proxy_set_header X-Poort-Assertion $poort_assertion;
      proxy_pass http://{app};
    }}
  }}
"#
    )
}

/// One plain HTTP/1.1 GET to a proxy on `port`, for `host`.
async fn plain_get(port: u16, host: &str, target: &str, headers: &[(&str, &str)]) -> Resp {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.unwrap().unwrap();
    parse_response(&out)
}

/// One request to the nginx of `nginx_conf`.
async fn via_nginx(port: u16, target: &str, headers: &[(&str, &str)]) -> Resp {
    plain_get(port, "fwd.localhost", target, headers).await
}

/// The claims of an `X-Poort-Assertion` (not verified here: tests/it/proxy.rs does that).
fn claims(jwt: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

#[tokio::test]
async fn nginx_auth_request_lets_through_only_what_poort_allows() {
    let rules = TempDir::new();
    std::fs::write(
        rules.0.join("rules.toml"),
        "[[rule]]\nid = \"admin-area\"\nreason = \"virtual patch\"\naction = \"deny\"\npath_prefix = \"/admin\"\n",
    )
    .unwrap();
    let tables = format!("{APP}\n[mitigate]\nrules_file = \"{}\"\n", rules.0.join("rules.toml").display());
    let gate = Gate::start_config("trusted_proxies = [\"127.0.0.1/32\"]", &tables).await;
    let port = closed_port();
    let _nginx = Nginx::start_in(TempDir::new(), &nginx_conf(port, gate.addr, gate.upstream.addr), port);
    let app_hits = || gate.upstream.hits();

    // No session: nginx passes the browser to poort's sign-in on the app's own host, which
    // hands it to the portal with a nonce for this browser.
    let r = via_nginx(port, "/page?q=1", &[("Accept", "text/html")]).await;
    assert_eq!(r.status, 302, "{}", r.text());
    assert!(r.cookie("__Host-poort-handoff").is_some());
    let begin = r.header("location").unwrap();
    assert!(begin.starts_with("https://localhost:8443/.poort/handoff/begin?"), "{begin}");
    assert!(begin.contains("path=%2Fpage%3Fq%3D1"), "{begin}");
    // Headers a client adds do not change what poort is asked about.
    let forged = [
        ("X-Original-URL", "https://localhost:8443/"),
        ("X-Forwarded-Host", "git.localhost"),
        ("X-Forwarded-Uri", "/ok"),
        ("X-Forwarded-Method", "GET"),
        ("X-Original-URI", "/ok"),
    ];
    let r = via_nginx(port, "/page", &forged).await;
    assert_eq!(r.status, 302, "{}", r.text());
    // Nor can a client ask the question itself through the pass-through.
    assert_eq!(via_nginx(port, "/.poort/auth", &forged).await.status, 404);
    assert_eq!(app_hits(), 0);

    let portal = gate.login("alice").await;
    let alice = hand_off_from(&gate, &portal, "fwd.localhost", "/.poort/signin?next=%2Fpage", "/page").await;
    let cookie = format!("__Host-poort={alice}");
    // A header the client forges does not reach the app: nginx sets poort's.
    let r = via_nginx(port, "/page?q=1", &[("Cookie", &cookie), ("X-Poort-User", "admin")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "upstream ok");
    let seen = gate.upstream.last();
    assert_eq!(seen.target, "/page?q=1");
    assert_eq!(seen.header("x-poort-user"), Some("alice"));
    assert_eq!(seen.header("x-poort-groups"), Some("staff"));
    assert_eq!(seen.header("x-poort-email"), Some("alice@example.com"));
    let c = claims(seen.header("x-poort-assertion").unwrap());
    assert_eq!((c["aud"].as_str(), c["sub"].as_str()), (Some("fwd"), Some("alice")));
    let hits = app_hits();

    // The emergency rules apply to the request nginx asks about, in any letter case, and
    // whatever the client claims the request is.
    for path in ["/admin/users", "/ADMIN/users", "/%61dmin/users"] {
        let r = via_nginx(port, path, &[("Cookie", &cookie)]).await;
        assert_eq!(r.status, 403, "{path}: {}", r.text());
        let r = via_nginx(
            port,
            path,
            &[("Cookie", &cookie), ("X-Forwarded-Uri", "/ok"), ("X-Original-URL", "https://fwd.localhost/ok")],
        )
        .await;
        assert_eq!(r.status, 403, "{path}: {}", r.text());
    }
    // A user the policy refuses.
    let portal = gate.login("bob").await;
    let bob = hand_off_from(&gate, &portal, "fwd.localhost", "/.poort/signin?next=%2F", "/").await;
    let r = via_nginx(port, "/page", &[("Cookie", &format!("__Host-poort={bob}"))]).await;
    assert_eq!(r.status, 403);
    // A session of another host (the portal's, another app's), or a made-up one.
    let portal = gate.login("alice").await;
    let git = hand_off(&gate, &portal, "git.localhost", "/").await;
    for other in [portal, git, "x".repeat(43)] {
        let r = via_nginx(
            port,
            "/page",
            &[("Cookie", &format!("__Host-poort={other}")), ("X-Forwarded-Host", "git.localhost")],
        )
        .await;
        assert_eq!(r.status, 302, "{}", r.text());
    }
    assert_eq!(app_hits(), hits, "nothing refused reached the app");

    // poort itself does not serve the app: only its own pages answer on that host.
    let r = gate.request("GET", "/page", &[("Host", "fwd.localhost"), ("Cookie", &cookie)], b"").await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn the_traefik_and_caddy_form_is_answered_too_and_only_for_trusted_proxies() {
    let gate = Gate::start_config("trusted_proxies = [\"127.0.0.1/32\"]", APP).await;
    let portal = gate.login("alice").await;
    let alice = hand_off_from(&gate, &portal, "fwd.localhost", "/.poort/signin?next=%2Fx", "/x").await;
    let cookie = format!("__Host-poort={alice}");
    async fn ask(gate: &Gate, cookie: Option<&str>, query: &str) -> Resp {
        let mut h = vec![
            ("X-Forwarded-Host", "fwd.localhost"),
            ("X-Forwarded-Uri", "/x/y?z=1"),
            ("X-Forwarded-Method", "GET"),
            ("X-Forwarded-Proto", "https"),
            ("Accept", "text/html"),
        ];
        if let Some(c) = cookie {
            h.push(("Cookie", c));
        }
        gate.request("GET", &format!("/.poort/auth{query}"), &h, b"").await
    }
    // Traefik asks at poort's own address: the app is named in the URL it is set up to ask.
    let r = ask(&gate, Some(&cookie), "?app=fwd").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-poort-user"), Some("alice"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let r = ask(&gate, None, "?app=fwd").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("location"), Some("/.poort/signin?next=%2Fx%2Fy%3Fz%3D1"));
    // Traefik and Caddy hand poort's answer to the browser: a redirect when asked for one.
    let r = ask(&gate, None, "?app=fwd&redirect=1").await;
    assert_eq!(r.status, 302);
    // Only apps served by a proxy that asks; X-Forwarded-Host names none.
    assert_eq!(ask(&gate, Some(&cookie), "").await.status, 404);
    assert_eq!(ask(&gate, Some(&cookie), "?app=git").await.status, 404);
    // A question asked twice over is not answered.
    let twice = [
        ("Host", "fwd.localhost"),
        ("Cookie", cookie.as_str()),
        ("X-Forwarded-Uri", "/a"),
        ("X-Forwarded-Uri", "/admin"),
        ("X-Forwarded-Method", "GET"),
    ];
    assert_eq!(gate.request("GET", "/.poort/auth", &twice, b"").await.status, 400);

    // A caller that is not a trusted proxy gets no answer about anyone.
    let untrusted = Gate::start_config("", APP).await;
    let portal = untrusted.login("alice").await;
    let alice = hand_off_from(&untrusted, &portal, "fwd.localhost", "/.poort/signin?next=%2Fx", "/x").await;
    let headers = [
        ("Host", "fwd.localhost"),
        ("X-Forwarded-Uri", "/x"),
        ("X-Forwarded-Method", "GET"),
        ("Cookie", &format!("__Host-poort={alice}")),
    ];
    let r = untrusted.request("GET", "/.poort/auth", &headers, b"").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-poort-user"), None);
}

/// The Caddyfile of docs/forward-auth.md, for poort at `gate` and the app at `app`.
fn caddyfile(port: u16, gate: SocketAddr, app: SocketAddr) -> String {
    format!(
        r#"
http://fwd.localhost:{port} {{
  bind 127.0.0.1
  handle /.poort/auth {{
    respond 404
  }}
  handle /.poort/* {{
    reverse_proxy https://{gate} {{
      header_up -X-Forwarded-Uri
      header_up -X-Forwarded-Method
      transport http {{
        tls_insecure_skip_verify
        tls_server_name fwd.localhost
      }}
    }}
  }}
  handle {{
    # In this order (Caddy would otherwise sort request_header after forward_auth): what a
    # client claims is removed, then poort's answer is copied in.
    route {{
      # Every spelling of poort's header names (dashes, underscores, any case):
      # some frameworks read them all as the same header.
      request_header -X-Poort*
      request_header -X_Poort*
      forward_auth https://{gate} {{
        uri /.poort/auth?redirect=1
        copy_headers X-Poort-User X-Poort-Email X-Poort-Groups X-Poort-Assertion
        transport http {{
          tls_insecure_skip_verify
          tls_server_name fwd.localhost
        }}
      }}
      reverse_proxy {app}
    }}
  }}
}}
"#
    )
}

#[tokio::test]
async fn caddy_forward_auth_lets_through_only_what_poort_allows() {
    // A public app: anyone passes, signed-in users with their identity, and nobody with one
    // they made up.
    let public =
        APP.replace("access = { rules = [{ effect = \"allow\", groups = [\"staff\"] }] }", "access = \"public\"");
    for (tables, public) in [(APP.to_string(), false), (public, true)] {
        let gate = Gate::start_config("trusted_proxies = [\"127.0.0.1/32\"]", &tables).await;
        let port = closed_port();
        let _caddy = crate::harness::Caddy::start(&caddyfile(port, gate.addr, gate.upstream.addr), port);
        let host = format!("fwd.localhost:{port}");
        let get = |target: &'static str, headers: Vec<(&'static str, String)>| {
            let host = host.clone();
            async move {
                let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                plain_get(port, &host, target, &headers).await
            }
        };
        let forged = ("X-Poort-User", "admin".to_string());
        let underscored = ("X_Poort_User", "admin".to_string());
        let mixed = ("X-Poort_User", "admin".to_string());
        let r = get("/page", vec![("Accept", "text/html".into()), forged.clone(), underscored.clone(), mixed.clone()])
            .await;
        if public {
            assert_eq!(r.status, 200, "{}", r.text());
            let seen = gate.upstream.last();
            let user = seen.header("x-poort-user").map(String::from);
            assert!(matches!(user.as_deref(), None | Some("")), "a forged identity never arrives: {user:?}");
            assert_eq!(seen.header("x_poort_user"), None);
            assert_eq!(seen.header("x-poort_user"), None);
        } else {
            assert_eq!(r.status, 302, "{}", r.text());
            assert_eq!(r.header("location"), Some("/.poort/signin?next=%2Fpage"));
            assert_eq!(gate.upstream.hits(), 0);
        }
        let portal = gate.login("alice").await;
        let alice = hand_off_from(&gate, &portal, "fwd.localhost", "/.poort/signin?next=%2Fx", "/x").await;
        let r = get("/page", vec![("Cookie", format!("__Host-poort={alice}")), forged.clone()]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(gate.upstream.last().header("x-poort-user"), Some("alice"));
        if !public {
            let portal = gate.login("bob").await;
            let bob = hand_off_from(&gate, &portal, "fwd.localhost", "/.poort/signin?next=%2Fx", "/x").await;
            let hits = gate.upstream.hits();
            let r = get("/page", vec![("Cookie", format!("__Host-poort={bob}"))]).await;
            assert_eq!(r.status, 403);
            assert_eq!(gate.upstream.hits(), hits);
        }
    }
}
