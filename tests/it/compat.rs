//! The compatibility suite: real applications from the package registries behind poort, each
//! driven as a user would, with the user-visible result asserted. JupyterLab and Django come
//! from PyPI, pinned in tests/compat/requirements.txt and installed by tests/compat/setup
//! (scripts/test runs it). docs/apps.md has the poort config each one needs; the tables
//! below are those recipes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Gate, Reaped, Resp, TempDir, closed_port, hand_off, parse_response, wait_for_port};

/// The virtual environment tests/compat/setup made.
fn venv() -> PathBuf {
    let dir = std::env::var_os("POORT_COMPAT_VENV").map_or("/var/tmp/poort-compat-venv".into(), PathBuf::from);
    assert!(
        dir.join("bin/python").exists(),
        "the compatibility suite needs JupyterLab and Django: run tests/compat/setup (scripts/test does)"
    );
    dir
}

fn compat_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/compat")
}

/// A server from the virtual environment, its output in its folder.
struct App {
    dir: TempDir,
    port: u16,
    _process: Reaped,
}

impl App {
    fn start(program: &str, args: &[&str], cwd: &Path, env: &[(&str, &str)], dir: TempDir, port: u16) -> App {
        let log = std::fs::File::create(dir.0.join("app.log")).unwrap();
        let child = Command::new(venv().join("bin").join(program))
            .args(args)
            .current_dir(cwd)
            .env("HOME", &dir.0)
            .env("COMPAT_DATA", &dir.0)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let process = Reaped(child);
        wait_for_port(port, program, Duration::from_secs(90));
        App { dir, port, _process: process }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("app.log")).unwrap_or_default()
    }
}

const JUPYTER_TOKEN: &str = "compat-suite-token";

/// JupyterLab on loopback, serving under `base_url`.
fn jupyter(base_url: &str, remote: bool) -> App {
    let dir = TempDir::new();
    let port = closed_port();
    let root = dir.0.join("notebooks");
    std::fs::create_dir_all(&root).unwrap();
    let (port_arg, base, root_arg) = (
        format!("--port={port}"),
        format!("--ServerApp.base_url={base_url}"),
        format!("--ServerApp.root_dir={}", root.display()),
    );
    let token = format!("--IdentityProvider.token={JUPYTER_TOKEN}");
    // --allow-root: CI runs the tests as root.
    let mut args = vec!["lab", "--no-browser", "--allow-root", "--ip=127.0.0.1", &port_arg, &base, &root_arg, &token];
    // Jupyter checks Host only while it listens on loopback alone, as it does here: on the
    // machine poort reaches it on, it listens on its own address and does not.
    if remote {
        args.push("--ServerApp.allow_remote_access=True");
    }
    let d = dir.0.display().to_string();
    let env =
        [("JUPYTER_CONFIG_DIR", d.as_str()), ("JUPYTER_DATA_DIR", d.as_str()), ("JUPYTER_RUNTIME_DIR", d.as_str())];
    App::start("jupyter", &args, &std::env::temp_dir(), &env, dir, port)
}

/// A JSON request to Jupyter through poort, as JupyterLab's page makes it: with its cookies and
/// the XSRF token from them.
async fn jupyter_call(
    gate: &Gate,
    host: &str,
    jar: &mut Jar,
    method: &str,
    path: &str,
    body: &serde_json::Value,
) -> Resp {
    let body = if body.is_null() { Vec::new() } else { body.to_string().into_bytes() };
    let xsrf = jar.get("_xsrf").unwrap_or_default();
    let cookies = jar.header();
    let headers = [("Host", host), ("Cookie", &cookies), ("X-XSRFToken", &xsrf), ("Content-Type", "application/json")];
    let r = gate.request(method, path, &headers, &body).await;
    jar.take(&r);
    r
}

/// Opens JupyterLab and a notebook as a browser does (signed in to Jupyter by its token once,
/// then by its cookie), starts its kernel, runs a cell over the kernel's WebSocket and returns
/// the cell's output.
async fn run_a_cell(gate: &Gate, host: &str, poort_cookie: &str, base: &str) -> String {
    let mut jar = Jar::default();
    jar.0.push(("__Host-poort".into(), poort_cookie.to_string()));
    let nothing = serde_json::Value::Null;
    let r = jupyter_call(gate, host, &mut jar, "GET", &format!("{base}lab?token={JUPYTER_TOKEN}"), &nothing).await;
    assert_eq!(r.status, 200, "JupyterLab's page: {}", r.text());
    assert!(r.text().contains("JupyterLab"), "{}", r.text());
    assert!(jar.0.len() > 1, "Jupyter signed the browser in with a cookie");
    let notebook = serde_json::json!({
        "type": "notebook",
        "format": "json",
        "content": { "cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5 }
    });
    let r = jupyter_call(gate, host, &mut jar, "PUT", &format!("{base}api/contents/compat.ipynb"), &notebook).await;
    assert!(r.status == 201 || r.status == 200, "saving a notebook: {} {}", r.status, r.text());
    let r = jupyter_call(gate, host, &mut jar, "GET", &format!("{base}api/contents/compat.ipynb"), &nothing).await;
    assert_eq!(r.status, 200, "opening it: {}", r.text());
    let session = serde_json::json!({
        "path": "compat.ipynb", "name": "compat.ipynb", "type": "notebook", "kernel": { "name": "python3" }
    });
    let r = jupyter_call(gate, host, &mut jar, "POST", &format!("{base}api/sessions"), &session).await;
    assert_eq!(r.status, 201, "starting its kernel: {}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let kernel = v["kernel"]["id"].as_str().unwrap().to_string();

    // The kernel's channels, as the browser opens them: from the page's own origin.
    // Jupyter checks the Origin of a WebSocket signed in by cookie against the Host it is sent.
    let origin = format!("https://{host}:8443");
    let path = format!("{base}api/kernels/{kernel}/channels?session_id=compat");
    let mut ws = gate
        .websocket(host, &path, &[("cookie", &jar.header()), ("origin", &origin)])
        .await
        .unwrap_or_else(|status| panic!("the kernel WebSocket was refused: {status}"));
    let message = |msg_type: &str, id: &str, content: serde_json::Value| {
        serde_json::json!({
            "header": { "msg_id": id, "username": "alice", "session": "compat", "msg_type": msg_type, "version": "5.3", "date": "" },
            "parent_header": {}, "metadata": {}, "content": content, "channel": "shell", "buffers": []
        })
        .to_string()
    };
    // The kernel answers kernel_info once it is up; then the cell runs.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut asked = 0;
    'ready: loop {
        asked += 1;
        ws.send(Message::text(message("kernel_info_request", &format!("info-{asked}"), serde_json::json!({}))))
            .await
            .unwrap();
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Some(Ok(m))) = tokio::time::timeout_at(until, ws.next()).await {
            if let Ok(text) = m.into_text() {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                if v["header"]["msg_type"] == "kernel_info_reply" {
                    break 'ready;
                }
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "the kernel did not start");
    }
    let code = serde_json::json!({
        "code": "print(6 * 7)", "silent": false, "store_history": true, "user_expressions": {}, "allow_stdin": false, "stop_on_error": true
    });
    ws.send(Message::text(message("execute_request", "run-1", code))).await.unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(until, ws.next()).await {
        let Ok(text) = m.into_text() else { continue };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if v["parent_header"]["msg_id"] == "run-1" && v["header"]["msg_type"] == "stream" {
            return v["content"]["text"].as_str().unwrap_or_default().to_string();
        }
    }
    panic!("the cell's output never came back");
}

#[tokio::test]
async fn jupyterlab_runs_a_cell_path_routed_and_host_routed() {
    let (by_path, by_host) = (jupyter("/jupyter/", false), jupyter("/", true));
    let tables = format!(
        r#"
[[app]]
name = "jupyter"
path = "/jupyter/"
upstream = "http://127.0.0.1:{}"
preserve_host = true
access = "authenticated"

[[app]]
name = "lab"
host = "jupyter.localhost"
upstream = "http://127.0.0.1:{}"
preserve_host = true
access = "authenticated"
"#,
        by_path.port, by_host.port
    );
    let gate = Gate::start_config("", &tables).await;
    let portal = gate.login("alice").await;
    let out = run_a_cell(&gate, "localhost", &portal, "/jupyter/").await;
    assert_eq!(out, "42\n", "{}", by_path.log());
    let lab = hand_off(&gate, &portal, "jupyter.localhost", "/lab").await;
    let out = run_a_cell(&gate, "jupyter.localhost", &lab, "/").await;
    assert_eq!(out, "42\n", "{}", by_host.log());
}

/// The Django project in tests/compat/django, its database made and an admin user added.
fn django(sso: bool) -> App {
    let dir = TempDir::new();
    let project = compat_dir().join("django");
    let python = venv().join("bin/python");
    let manage = |args: &[&str]| {
        let out = Command::new(&python)
            .arg("manage.py")
            .args(args)
            .current_dir(&project)
            .env("COMPAT_DATA", &dir.0)
            .env("DJANGO_SUPERUSER_PASSWORD", "compat-admin-password")
            .output()
            .unwrap();
        assert!(out.status.success(), "manage.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    manage(&["migrate", "--noinput"]);
    manage(&["createsuperuser", "--noinput", "--username", "admin", "--email", "admin@example.com"]);
    let port = closed_port();
    let addr = format!("127.0.0.1:{port}");
    let sso = if sso { "1" } else { "" };
    App::start("python", &["manage.py", "runserver", &addr, "--noreload"], &project, &[("COMPAT_SSO", sso)], dir, port)
}

/// The value of `<input ... name="NAME" value="...">` in a page.
fn input_value(page: &str, name: &str) -> String {
    let at = page.find(&format!("name=\"{name}\"")).unwrap_or_else(|| panic!("no {name} field in {page}"));
    let rest = &page[at..];
    let v = rest.find("value=\"").unwrap() + 7;
    rest[v..v + rest[v..].find('"').unwrap()].to_string()
}

/// A browser's cookie jar for one host, as simple as the suite needs.
#[derive(Default)]
struct Jar(Vec<(String, String)>);

impl Jar {
    fn take(&mut self, r: &Resp) {
        for (k, v) in &r.headers {
            if k == "set-cookie" {
                let pair = v.split(';').next().unwrap_or_default();
                if let Some((name, value)) = pair.split_once('=') {
                    self.0.retain(|(n, _)| n != name);
                    self.0.push((name.trim().to_string(), value.to_string()));
                }
            }
        }
    }

    fn get(&self, name: &str) -> Option<String> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    }

    fn header(&self) -> String {
        self.0.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ")
    }
}

#[tokio::test]
async fn the_django_admin_works_with_its_csrf_and_origin_checks_on() {
    let site = django(false);
    let tables = format!(
        "\n[[app]]\nname = \"django\"\nhost = \"django.localhost\"\nupstream = \"http://127.0.0.1:{}\"\npreserve_host = true\naccess = \"authenticated\"\n",
        site.port
    );
    let gate = Gate::start_config("", &tables).await;
    let portal = gate.login("alice").await;
    let mut jar = Jar::default();
    jar.0.push(("__Host-poort".into(), hand_off(&gate, &portal, "django.localhost", "/admin/").await));
    let origin = "https://django.localhost:8443";
    let get = async |jar: &mut Jar, path: &str| {
        let r = gate.request("GET", path, &[("Host", "django.localhost"), ("Cookie", &jar.header())], b"").await;
        jar.take(&r);
        r
    };
    let post = async |jar: &mut Jar, path: &str, form: &[(&str, &str)], origin: &str| {
        let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
        let referer = format!("{origin}{path}");
        let headers = [
            ("Host", "django.localhost"),
            ("Cookie", &jar.header()),
            ("Origin", origin),
            ("Referer", &referer),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ];
        let r = gate.request("POST", path, &headers, body.as_bytes()).await;
        jar.take(&r);
        r
    };

    let r = get(&mut jar, "/admin/login/?next=/admin/").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let token = input_value(&r.text(), "csrfmiddlewaretoken");
    let login = [
        ("csrfmiddlewaretoken", token.as_str()),
        ("username", "admin"),
        ("password", "compat-admin-password"),
        ("next", "/admin/"),
    ];
    // Django's own checks hold through poort: a post from another origin is refused.
    let r = post(&mut jar, "/admin/login/?next=/admin/", &login, "https://evil.example").await;
    assert_eq!(r.status, 403, "Django refuses a cross-origin post: {}", r.text());
    let r = post(&mut jar, "/admin/login/?next=/admin/", &login, origin).await;
    assert_eq!(r.status, 302, "signed in: {}", r.text());
    assert_eq!(r.header("location"), Some("/admin/"));

    let r = get(&mut jar, "/admin/notes/note/add/").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let token = input_value(&r.text(), "csrfmiddlewaretoken");
    let r = post(
        &mut jar,
        "/admin/notes/note/add/",
        &[("csrfmiddlewaretoken", &token), ("title", "First note"), ("body", "x")],
        origin,
    )
    .await;
    assert_eq!(r.status, 302, "created: {}", r.text());
    let r = get(&mut jar, "/admin/notes/note/").await;
    let page = r.text();
    assert!(page.contains("First note"), "{page}");
    // The object's change page: /admin/notes/note/ID/change/.
    let at = page
        .match_indices("/admin/notes/note/")
        .find_map(|(i, prefix)| {
            let rest = &page[i + prefix.len()..];
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            (digits > 0 && rest[digits..].starts_with("/change/"))
                .then(|| format!("{prefix}{}/change/", &rest[..digits]))
        })
        .expect("a link to the note");
    let r = get(&mut jar, &at).await;
    let token = input_value(&r.text(), "csrfmiddlewaretoken");
    let r =
        post(&mut jar, &at, &[("csrfmiddlewaretoken", &token), ("title", "Edited note"), ("body", "y")], origin).await;
    assert_eq!(r.status, 302, "edited: {}", r.text());
    let page = get(&mut jar, "/admin/notes/note/").await.text();
    assert!(page.contains("Edited note") && !page.contains("First note"), "{page}");
    drop(site);
}

#[tokio::test]
async fn an_app_signs_the_user_in_from_poorts_header_and_streams_and_long_polls_through_it() {
    let site = django(true);
    let tables = format!(
        "\n[[app]]\nname = \"sso\"\npath = \"/sso/\"\nstrip_prefix = true\nupstream = \"http://127.0.0.1:{}\"\npreserve_host = true\naccess = \"authenticated\"\n",
        site.port
    );
    let gate = Gate::start_full("", "response_timeout = \"10s\"", &tables).await;
    for user in ["alice", "bob"] {
        let s = gate.login(user).await;
        let r = gate.get("/sso/whoami/", Some(&s)).await;
        assert_eq!((r.status, r.text()), (200, user.to_string()), "{}", site.log());
    }
    // A header a client sends never signs anyone in.
    let s = gate.login("bob").await;
    let forged =
        [("Cookie", format!("__Host-poort={s}")), ("X-Poort-User", "admin".into()), ("Remote-User", "admin".into())];
    let headers: Vec<(&str, &str)> = forged.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(gate.request("GET", "/sso/whoami/", &headers, b"").await.text(), "bob");

    // Server-sent events: the first arrives while the app still sends the rest.
    let mut tls = gate.connect(&[b"http/1.1"]).await;
    let req = format!(
        "GET /sso/events/ HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\nAccept: text/event-stream\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("event 0") {
        let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "the stream ended early");
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(!String::from_utf8_lossy(&got).contains("event 2"), "the app has not sent it yet");
    while !String::from_utf8_lossy(&got).contains("event 2") {
        let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "the stream ended early");
        got.extend_from_slice(&chunk[..n]);
    }
    // A long poll answered after three seconds.
    let r = gate.get("/sso/poll/?wait=3", Some(&s)).await;
    assert_eq!((r.status, r.text()), (200, "changed".to_string()));
}

/// KiB of resident memory: now (VmRSS) and at most so far (VmHWM).
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |key: &str| {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
    };
    (kib("VmRSS:"), kib("VmHWM:"))
}

const GIB: u64 = 1 << 30;

/// The bytes of the test file, made on the fly: 1 GiB never sits in memory or on disk.
fn pattern(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let n = offset + i as u64;
        *b = (n ^ (n >> 11) ^ (n >> 23)) as u8;
    }
}

#[tokio::test]
async fn a_gibibyte_down_and_up_arrives_intact_in_bounded_memory() {
    use tokio::net::TcpListener;
    // The app: GET sends the file, POST hashes what it receives and answers with the digest.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_lowercase();
                let mut buf = vec![0u8; 256 << 10];
                if head.starts_with("get") {
                    s.write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {GIB}\r\nContent-Type: application/octet-stream\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await
                    .unwrap();
                    let mut sent = 0;
                    while sent < GIB {
                        pattern(sent, &mut buf);
                        if s.write_all(&buf).await.is_err() {
                            return;
                        }
                        sent += buf.len() as u64;
                    }
                } else {
                    let want: u64 = head
                        .split("content-length:")
                        .nth(1)
                        .unwrap()
                        .split("\r\n")
                        .next()
                        .unwrap()
                        .trim()
                        .parse()
                        .unwrap();
                    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
                    let mut got = 0;
                    while got < want {
                        let n = s.read(&mut buf).await.unwrap();
                        assert!(n > 0);
                        hash.update(&buf[..n]);
                        got += n as u64;
                    }
                    let hex = poort::secret::hex(hash.finish().as_ref());
                    s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{hex}", hex.len()).as_bytes())
                        .await
                        .unwrap();
                }
            });
        }
    });
    let tables = format!(
        "\n[[app]]\nname = \"files\"\npath = \"/files/\"\nupstream = \"http://{addr}\"\naccess = \"authenticated\"\n"
    );
    let mut gate = Gate::start_full("", "max_body_bytes = 2147483648\nresponse_timeout = \"120s\"", &tables).await;
    let (_poort, pid) = gate.as_process("").await;
    let s = gate.login("alice").await;
    let (before, _) = memory(pid);

    let mut expected = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 << 10];
    let mut off = 0;
    while off < GIB {
        pattern(off, &mut buf);
        expected.update(&buf);
        off += buf.len() as u64;
    }
    let expected = poort::secret::hex(expected.finish().as_ref());

    // Down.
    let mut tls = gate.connect(&[b"http/1.1"]).await;
    let req = format!(
        "GET /files/big.bin HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tls.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut got = 0u64;
    loop {
        let n = tls.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        got += n as u64;
    }
    assert_eq!(got, GIB);
    assert_eq!(poort::secret::hex(hash.finish().as_ref()), expected, "the download arrived intact");

    // Up.
    let mut tls = gate.connect(&[b"http/1.1"]).await;
    let head = format!(
        "POST /files/upload HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\nContent-Type: application/octet-stream\r\nContent-Length: {GIB}\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut off = 0;
    while off < GIB {
        pattern(off, &mut buf);
        tls.write_all(&buf).await.unwrap();
        off += buf.len() as u64;
    }
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), tls.read_to_end(&mut answer)).await.unwrap().ok();
    let r = parse_response(&answer);
    assert_eq!((r.status, r.text()), (200, expected), "the upload arrived intact");

    let (_, peak) = memory(pid);
    let grew = peak.saturating_sub(before);
    eprintln!("poort's resident memory: {before} KiB before, peak {peak} KiB after 2 GiB through it");
    assert!(grew < 64 << 10, "poort's memory grew by {grew} KiB moving 2 GiB");
}
