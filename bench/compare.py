#!/usr/bin/env python3
"""HTTP benchmark: poort against nginx, side by side on this machine, in one run.

Targets, all on loopback, all in front of the same upstream (nginx, one worker, serving a
100-byte and a 64 KiB file):

  direct      client -> upstream, plain HTTP: the physical limit
  nginx       nginx as a plain TLS reverse proxy, no authentication
  nginx-auth  nginx TLS proxy with auth_request to a separate auth server (the Authelia /
              oauth2-proxy pattern). The auth server is a second nginx that checks the
              session cookie against a map: the cheapest auth server there is, so this
              reference is as fast as the pattern gets.
  poort       poort with a signed-in session: session lookup, policy with a group rule,
              identity headers and the signed assertion on every request

Every measurement is repeated for ROUNDS rounds and the targets alternate inside a round, so
machine drift hits all of them alike. Medians are reported with min-max.

Usage: bench/run [--seconds N] [--rounds N] [--quick] [--out FILE]
(bench/run installs the packages, builds poort in release mode and runs this script.)
"""

import argparse
import asyncio
import http.client
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
COOKIE = "__Host-poort"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {timeout} s")


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


import resource  # noqa: E402  (used by raise_fd_limit, also in child processes)


class Procs:
    """Processes this run started; all stopped at exit."""

    def __init__(self):
        self.procs = []

    def start(self, args, **kw):
        p = subprocess.Popen(args, preexec_fn=raise_fd_limit, **kw)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def pids_of(master_pid):
    """A process and its children (nginx workers)."""
    out = [master_pid]
    try:
        with open(f"/proc/{master_pid}/task/{master_pid}/children") as f:
            out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


def rss_bytes(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/statm") as f:
            total += int(f.read().split()[1]) * PAGE
    return total


NGINX_COMMON = """
daemon off;
pid {dir}/{name}.pid;
error_log {dir}/{name}.err warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 12000; }}
"""

HTTP_COMMON = """
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {dir}/tmp-{name}-body;
    proxy_temp_path {dir}/tmp-{name}-proxy;
    fastcgi_temp_path {dir}/tmp-{name}-fastcgi;
    uwsgi_temp_path {dir}/tmp-{name}-uwsgi;
    scgi_temp_path {dir}/tmp-{name}-scgi;
"""

TLS = """
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
"""

PROXY = """
            proxy_pass http://upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
"""


def nginx_conf(name, workers, body, d):
    return (
        f"worker_processes {workers};\n"
        + NGINX_COMMON.format(dir=d, name=name)
        + "http {\n"
        + HTTP_COMMON.format(dir=d, name=name)
        + body
        + "}\n"
    )


def write_configs(d, ports, cert, key, session_value):
    www = os.path.join(d, "www")
    os.makedirs(www)
    with open(os.path.join(www, "small"), "wb") as f:
        f.write(b"x" * 99 + b"\n")
    with open(os.path.join(www, "large"), "wb") as f:
        f.write(bytes((i * 7 + 13) % 251 for i in range(65536)))
    tls = TLS.format(cert=cert, key=key)
    upstream = f"""
    upstream upstream {{ server 127.0.0.1:{ports['upstream']}; keepalive 256; }}
"""
    confs = {
        "upstream": nginx_conf(
            "upstream",
            1,
            f"""
    server {{
        listen 127.0.0.1:{ports['upstream']} reuseport;
        root {www};
        default_type application/octet-stream;
    }}
""",
            d,
        ),
        "nginx": nginx_conf(
            "nginx",
            "auto",
            upstream
            + f"""
    server {{
        listen 127.0.0.1:{ports['nginx']} ssl http2;
{tls}
        location / {{
{PROXY}
        }}
    }}
""",
            d,
        ),
        "authd": nginx_conf(
            "authd",
            1,
            f"""
    map $cookie_session $authorised {{ default 0; "{session_value}" 1; }}
    server {{
        listen 127.0.0.1:{ports['authd']};
        location = /check {{
            if ($authorised = 0) {{ return 401; }}
            add_header X-Auth-User alice;
            add_header X-Auth-Groups staff;
            return 200;
        }}
    }}
""",
            d,
        ),
        "nginx-auth": nginx_conf(
            "nginx-auth",
            "auto",
            upstream
            + f"""
    upstream authd {{ server 127.0.0.1:{ports['authd']}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{ports['nginx-auth']} ssl http2;
{tls}
        location = /_auth {{
            internal;
            proxy_pass http://authd/check;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
        }}
        location / {{
            auth_request /_auth;
            auth_request_set $user $upstream_http_x_auth_user;
            auth_request_set $groups $upstream_http_x_auth_groups;
{PROXY}
            proxy_set_header X-Auth-User $user;
            proxy_set_header X-Auth-Groups $groups;
        }}
    }}
""",
            d,
        ),
    }
    paths = {}
    for name, text in confs.items():
        p = os.path.join(d, f"{name}.conf")
        with open(p, "w") as f:
            f.write(text)
        paths[name] = p
    return paths


def poort_config(d, ports, folder="poort-data", external=None, store="", admin=""):
    """poort's config in `folder`: listening on ports['poort'], in front of ports['upstream'];
    `external` is the port users type (default: the one it listens on); `store` and `admin`
    are extra lines for those tables."""
    text = f"""
[server]
listen = "127.0.0.1:{ports['poort']}"
external_url = "https://localhost:{external or ports['poort']}"
header_timeout = "300s"
idle_timeout = "300s"
max_connections = 20000
max_connections_per_client = 20000

[store]
data_dir = "."
{store}

# As nginx's access_log off in the peers' configs.
[log]
access = false

[admin]
{admin}

[tls]
cert_file = "tls/cert.pem"
key_file = "tls/key.pem"

[[app]]
name = "bench"
upstream = "http://127.0.0.1:{ports['upstream']}"
path = "/app/"
strip_prefix = true
access = {{ rules = [ {{ effect = "allow", groups = ["staff"] }}, {{ effect = "deny", users = ["mallory"] }} ] }}
"""
    p = os.path.join(d, folder, "poort.toml")
    with open(p, "w") as f:
        f.write(text)
    return p


def login(port, user, password):
    """Signs in through the login form like a browser; returns the session cookie value."""
    ctx = ssl._create_unverified_context()
    host = f"localhost:{port}"

    def conn():
        c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        return c

    c = conn()
    c.request("GET", "/.poort/login", headers={"Host": host, "Accept": "text/html"})
    r = c.getresponse()
    page = r.read().decode()
    csrf_cookie = next(
        v.split(";")[0] for k, v in r.getheaders() if k.lower() == "set-cookie" and "csrf" in v
    )
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    form = urllib.parse.urlencode({"username": user, "password": password, "csrf": token, "next": "/"})
    c.request(
        "POST",
        "/.poort/login",
        body=form,
        headers={
            "Host": host,
            "Origin": f"https://{host}",
            "Content-Type": "application/x-www-form-urlencoded",
            "Cookie": csrf_cookie,
        },
    )
    r = c.getresponse()
    r.read()
    for k, v in r.getheaders():
        if k.lower() == "set-cookie" and v.startswith(COOKIE + "="):
            return v.split(";")[0].split("=", 1)[1]
    raise SystemExit(f"login failed: {r.status}")


def parse_latency(s):
    m = re.match(r"([\d.]+)(us|ms|s)", s)
    v, unit = float(m.group(1)), m.group(2)
    return v * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def wrk(url, conns, secs, headers, threads=1):
    args = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{secs}s", "--latency", "--timeout", "5s"]
    for h in headers:
        args += ["-H", h]
    out = subprocess.run(args + [url], capture_output=True, text=True, check=True).stdout
    res = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    res["requests"] = int(re.search(r"(\d+) requests in", out).group(1))
    res["p50"] = parse_latency(re.search(r"\s50%\s+(\S+)", out).group(1))
    res["p99"] = parse_latency(re.search(r"\s99%\s+(\S+)", out).group(1))
    errs = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errs += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errs += int(m.group(1))
    res["errors"] = errs
    return res


def h2load(url, conns, secs, headers):
    args = ["h2load", "-t1", f"-c{conns}", "-m10", f"-D{secs}"]
    for h in headers:
        args += ["-H", h]
    out = subprocess.run(args + [url], capture_output=True, text=True, check=True).stdout
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    status = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    errors = int(done.group(3)) + int(done.group(4)) + int(status.group(3)) + int(status.group(4))
    return {"rps": float(m.group(1)), "requests": int(done.group(2)), "p50": None, "p99": None, "errors": errors}


async def hold_idle(port, n, host_header, cookie, path):
    """Opens n TLS keep-alive connections, makes one request on each, and holds them open."""
    ctx = ssl._create_unverified_context()
    ctx.set_alpn_protocols(["http/1.1"])
    sem = asyncio.Semaphore(200)
    conns = []
    failures = 0

    async def one():
        nonlocal failures
        async with sem:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
                req = f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\n"
                if cookie:
                    req += f"Cookie: {cookie}\r\n"
                w.write((req + "\r\n").encode())
                head = await r.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
                await r.readexactly(length)
                if not head.startswith(b"HTTP/1.1 200"):
                    raise OSError(head[:40])
                conns.append(w)
            except (OSError, asyncio.IncompleteReadError, AttributeError):
                failures += 1

    await asyncio.gather(*(one() for _ in range(n)))
    return conns, failures


def memory(target, pids, port, n, host_header, cookie, path):
    base = rss_bytes(pids)
    loop = asyncio.new_event_loop()
    conns, failures = loop.run_until_complete(hold_idle(port, n, host_header, cookie, path))
    time.sleep(1)
    held = rss_bytes(pids)
    for w in conns:
        w.close()
    loop.run_until_complete(asyncio.sleep(0.5))
    loop.close()
    return {"base": base, "held": held, "open": len(conns), "failures": failures}


def fmt_med(values, digits=0):
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    med = statistics.median(vals)
    if len(vals) == 1:
        return f"{med:,.{digits}f}"
    return f"{med:,.{digits}f} ({min(vals):,.{digits}f}–{max(vals):,.{digits}f})"


def ratio(values, ref):
    vals, refs = [v for v in values if v], [v for v in ref if v]
    if not vals or not refs:
        return "–"
    return f"{statistics.median(vals) / statistics.median(refs):.2f}x"


def machine():
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024 // 1024
    nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()[1]
    h2_v = subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.split()[-1]
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem} GiB, Linux {platform.release()}; "
        f"nginx {nginx_v}, wrk {wrk_v}, h2load {h2_v}"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle", type=int, default=10000, help="idle connections for the memory test")
    ap.add_argument("--quick", action="store_true", help="2 s, one round, 1000 idle connections")
    ap.add_argument("--poort", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release/poort"))
    ap.add_argument("--out", help="also write the Markdown report here")
    ap.add_argument("--only", help="only these keep-alive runs, e.g. small:64,large:64 (no HTTP/2, handshake or memory runs)")
    ap.add_argument(
        "--against",
        metavar="POORT",
        help="also measure this poort binary (\"poort-b\"), alternating with the first in every round: "
        "the way to compare two builds on a machine that drifts",
    )
    ap.add_argument("--hold", action="store_true", help="start everything, print the wrk commands, wait (to profile)")
    a = ap.parse_args()
    if a.quick:
        a.seconds, a.rounds, a.idle = 2, 1, 1000
    raise_fd_limit()
    report_of(run, a, "poort-bench-")


def report_of(run, a, prefix):
    """Runs `run(a, folder, procs)` in a temporary folder, stops what it started, and prints
    (and with --out writes) the report it returns."""
    d = tempfile.mkdtemp(prefix=prefix)
    # nginx started as root runs its workers as nobody, and PostgreSQL as its own account:
    # they must be able to reach the files.
    os.chmod(d, 0o755)
    procs = Procs()
    try:
        report = run(a, d, procs)
    finally:
        procs.stop()
        shutil.rmtree(d, ignore_errors=True)
    print(report)
    if a.out:
        with open(a.out, "w") as f:
            f.write(report)


def run(a, d, procs):
    names = ["upstream", "nginx", "authd", "nginx-auth", "poort"]
    ports = {n: free_port() for n in names}
    out = subprocess.run([a.poort, "quickstart", "--no-serve"], cwd=d, capture_output=True, text=True, check=True)
    cert = os.path.join(d, "poort-data/tls/cert.pem")
    key = os.path.join(d, "poort-data/tls/key.pem")
    poort_cfg = poort_config(d, ports)
    env = dict(os.environ, POORT_LOG="warn,rustls=error")
    password = "correct horse battery staple 42"
    subprocess.run(
        [a.poort, "user", "add", "alice", "--config", poort_cfg, "--group", "staff", "--password-stdin"],
        input=password + "\n",
        text=True,
        check=True,
        capture_output=True,
        env=env,
    )
    del out

    session_value = "bench-session-" + os.urandom(16).hex()
    confs = write_configs(d, ports, cert, key, session_value)
    nginx = {}
    for name in ["upstream", "nginx", "authd", "nginx-auth"]:
        nginx[name] = procs.start(["nginx", "-c", confs[name], "-p", d], stderr=subprocess.DEVNULL)
    poort = procs.start([a.poort, "serve", "--config", poort_cfg], env=env, cwd=d)
    for n in names:
        wait_port(ports[n])
    time.sleep(0.5)
    token = login(ports["poort"], "alice", password)
    if a.against:
        # The second build serves a copy of the first one's data, session included, under the
        # same external address (so the same Host header and cookie work), on a port of its own.
        shutil.copytree(os.path.join(d, "poort-data"), os.path.join(d, "poort-b-data"))
        ports["poort-b"] = free_port()
        cfg_b = poort_config(
            d,
            dict(ports, poort=ports["poort-b"]),
            folder="poort-b-data",
            external=ports["poort"],
            admin=f'listen = "127.0.0.1:{free_port()}"',
        )
        poort_b = procs.start([a.against, "serve", "--config", cfg_b], env=env, cwd=d)
        wait_port(ports["poort-b"])

    pids = {
        "nginx": pids_of(nginx["nginx"].pid),
        "nginx-auth": pids_of(nginx["nginx-auth"].pid) + pids_of(nginx["authd"].pid),
        "poort": [poort.pid],
        "direct": pids_of(nginx["upstream"].pid),
    }
    host = f"localhost:{ports['poort']}"
    targets = {
        "direct": (f"http://127.0.0.1:{ports['upstream']}/", []),
        "nginx": (f"https://127.0.0.1:{ports['nginx']}/", []),
        "nginx-auth": (f"https://127.0.0.1:{ports['nginx-auth']}/", [f"Cookie: session={session_value}"]),
        "poort": (f"https://127.0.0.1:{ports['poort']}/app/", [f"Host: {host}", f"Cookie: {COOKIE}={token}"]),
    }
    order = ["direct", "nginx", "nginx-auth", "poort"]
    if a.against:
        pids["poort-b"] = [poort_b.pid]
        targets["poort-b"] = (f"https://127.0.0.1:{ports['poort-b']}/app/", targets["poort"][1])
        order.append("poort-b")

    # Every target must answer 200 with the right body before anything is measured.
    for t in order:
        url, hdrs = targets[t]
        args = ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code} %{size_download}"]
        for h in hdrs:
            args += ["-H", h]
        got = subprocess.run(args + [url + "large"], capture_output=True, text=True).stdout
        if got != "200 65536":
            raise SystemExit(f"{t} answered {got!r} instead of 200 with 65536 bytes")
    # A wrong session must not get through poort or nginx-auth.
    wrong = [(t, [f"Host: {host}", f"Cookie: {COOKIE}=AAAA"]) for t in order if t.startswith("poort")]
    for t, h in wrong + [("nginx-auth", ["Cookie: session=x"])]:
        got = subprocess.run(
            ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}"] + sum((["-H", x] for x in h), []) + [targets[t][0] + "small"],
            capture_output=True,
            text=True,
        ).stdout
        if got != "401":
            raise SystemExit(f"{t} answered {got} to a wrong session instead of 401")

    if a.hold:
        for t in order:
            url, hdrs = targets[t]
            print(f"{t} (pids {' '.join(map(str, pids[t]))}): wrk -t1 -c64 -d10s " + " ".join(f"-H '{h}'" for h in hdrs) + f" {url}small")
        sys.stdout.flush()
        # Blocked first, so that the signal is waited for instead of killing the script
        # before it stops what it started.
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT, signal.SIGTERM])
        signal.sigwait([signal.SIGINT, signal.SIGTERM])
        return ""

    scenarios = [("small", 64), ("small", 256), ("large", 64)]
    if a.only:
        scenarios = [(b, int(c)) for b, c in (x.split(":") for x in a.only.split(","))]
    results = {}  # (scenario, target) -> list of runs
    for r in range(a.rounds):
        print(f"round {r + 1}/{a.rounds}", file=sys.stderr)
        for body, conns in scenarios:
            for t in order:
                url, hdrs = targets[t]
                before = cpu_ticks(pids[t])
                res = wrk(url + body, conns, a.seconds, hdrs)
                res["cpu_us"] = (cpu_ticks(pids[t]) - before) * 1e6 / TICK / max(res["requests"], 1)
                results.setdefault((body, conns), {}).setdefault(t, []).append(res)
                print(f"  {body} c{conns} {t}: {res['rps']:.0f} req/s p99 {res['p99']:.2f} ms", file=sys.stderr)
        if a.only:
            continue
        for t in order[1:]:
            url, hdrs = targets[t]
            h2 = [h.replace("Host: ", ":authority: ") for h in hdrs]
            res = h2load(url + "small", 64, a.seconds, h2)
            results.setdefault(("h2", 64), {}).setdefault(t, []).append(res)
            print(f"  h2 {t}: {res['rps']:.0f} req/s", file=sys.stderr)
        for t in order[1:]:
            url, hdrs = targets[t]
            res = wrk(url + "small", 16, a.seconds, hdrs + ["Connection: close"])
            results.setdefault(("handshake", 16), {}).setdefault(t, []).append(res)
            print(f"  new connection {t}: {res['rps']:.0f} req/s", file=sys.stderr)

    mem = {}
    for t in [] if a.only else [t for t in order if t == "nginx" or t.startswith("poort")]:
        url, hdrs = targets[t]
        port = int(urllib.parse.urlparse(url).port)
        ours = t.startswith("poort")
        cookie = f"{COOKIE}={token}" if ours else None
        hh = host if ours else f"127.0.0.1:{port}"
        path = urllib.parse.urlparse(url).path + "small"
        mem[t] = memory(t, pids[t], port, a.idle, hh, cookie, path)
        print(f"  memory {t}: {mem[t]}", file=sys.stderr)

    return render(a, results, mem, order)


def render(a, results, mem, order):
    cmd = "bench/run" + ("" if (a.seconds, a.rounds) == (10, 3) else f" --seconds {a.seconds} --rounds {a.rounds}")
    lines = [
        "# HTTP benchmark: poort and nginx side by side",
        "",
        f"Machine: {machine()}.",
        f"Command: `{cmd}` ({time.strftime('%Y-%m-%d')}). wrk -t1, keep-alive, {a.seconds} s per run, "
        f"{a.rounds} rounds with the targets alternating; medians with min–max over the rounds.",
        "Everything (client, proxies, upstream) shares the same cores, so a proxy that needs less "
        "CPU leaves more for the rest.",
        "",
    ]
    titles = {
        ("small", 64): "HTTPS, 100-byte body, 64 connections",
        ("small", 256): "HTTPS, 100-byte body, 256 connections",
        ("large", 64): "HTTPS, 64 KiB body, 64 connections",
        ("h2", 64): "HTTP/2 (h2load, 64 connections, 10 streams each), 100-byte body",
        ("handshake", 16): "A new TLS connection per request (wrk, 16 connections, `Connection: close`), 100-byte body",
    }
    for key, title in titles.items():
        per = results.get(key, {})
        if not per:
            continue
        lines += [f"## {title}", ""]
        timed = key[0] in ("small", "large")
        head = "| target | req/s | vs direct | vs nginx |"
        sep = "| --- | --- | --- | --- |"
        if timed:
            head += " p50 ms | p99 ms | CPU µs/req | errors |"
            sep += " --- | --- | --- | --- |"
        else:
            head += " errors |"
            sep += " --- |"
        lines += [head, sep]
        for t in order:
            if t not in per:
                continue
            runs = per[t]
            rps = [x["rps"] for x in runs]
            row = f"| {t} | {fmt_med(rps)} | "
            row += ratio(rps, [x["rps"] for x in per["direct"]]) if "direct" in per else "–"
            row += " | " + ratio(rps, [x["rps"] for x in per["nginx"]]) + " |"
            if timed:
                row += f" {fmt_med([x['p50'] for x in runs], 2)} | {fmt_med([x['p99'] for x in runs], 2)} |"
                row += f" {fmt_med([x['cpu_us'] for x in runs], 1)} |"
            row += f" {sum(x['errors'] for x in runs)} |"
            lines.append(row)
        lines.append("")
    if mem:
        lines += [
            f"## Memory with {a.idle:,} idle keep-alive connections (each made one request)",
            "",
            "| target | resident before | resident with connections open | per connection | connections held |",
            "| --- | --- | --- | --- | --- |",
        ]
        for t, m in mem.items():
            per = (m["held"] - m["base"]) / max(m["open"], 1)
            lines.append(
                f"| {t} | {m['base'] / 2**20:.1f} MiB | {m['held'] / 2**20:.1f} MiB | {per / 1024:.1f} KiB |"
                f" {m['open']:,} of {a.idle:,} |"
            )
        lines.append("")
    lines += [
        "CPU µs/req is the user plus system time of the proxy's processes (for nginx-auth, the proxy "
        "and the auth server) divided by the requests served, from /proc; for direct it is the upstream's.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
