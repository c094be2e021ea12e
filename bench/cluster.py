#!/usr/bin/env python3
"""Cluster benchmark: poort on its embedded SQLite against poort on PostgreSQL, one node and
two nodes, side by side on this machine, in one run.

Targets, all on loopback, all in front of the same upstream (nginx, one worker, a 100-byte
file), each with a signed-in session on every request (session lookup, policy, identity
headers, signed assertion):

  sqlite   one node on SQLite: the default
  pg-1     one node on PostgreSQL
  pg-2     two nodes on PostgreSQL, the load split evenly between them (one wrk per node,
           at once); the session was opened on the first node, so the second serves it
           from its cache after one read

Reported per target: requests per second (summed over nodes), p99 latency (the worse node),
and CPU microseconds per request of the poort processes (and of PostgreSQL, separately).
A cache hit does no database round trip, so poort's own CPU per request should not depend on
the engine.

Usage: bench/cluster [--seconds N] [--rounds N] [--conns N] [--out FILE]
(bench/cluster installs the packages, builds poort in release mode and runs this script.)
"""

import argparse
import glob
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as c  # noqa: E402

PASSWORD = "correct horse battery staple 42"


def as_postgres(args):
    """As root, the server runs as the postgres account (it refuses root)."""
    if os.geteuid() == 0:
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups"] + args
    return args


def start_postgres(d, procs):
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bins:
        raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
    b = bins[-1]
    pg = os.path.join(d, "pg")
    os.makedirs(pg)
    if os.geteuid() == 0:
        shutil.chown(pg, "postgres", "postgres")
    subprocess.run(
        as_postgres([f"{b}/initdb", "-D", f"{pg}/data", "-U", "poort", "-A", "trust", "--no-sync", "--no-instructions"]),
        check=True,
        capture_output=True,
    )
    port = c.free_port()
    # Durable as a production server would be (fsync on), shared buffers as Debian's default.
    p = procs.start(
        as_postgres([f"{b}/postgres", "-D", f"{pg}/data", "-p", str(port), "-k", pg, "-c", "listen_addresses=127.0.0.1"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    c.wait_port(port)
    for _ in range(100):
        ok = subprocess.run(
            [f"{b}/psql", "-h", "127.0.0.1", "-p", str(port), "-U", "poort", "-d", "postgres", "-c", "CREATE DATABASE poort"],
            capture_output=True,
        )
        if ok.returncode == 0:
            break
        time.sleep(0.1)
    else:
        raise SystemExit("PostgreSQL did not accept the database")
    return p, f"postgres://poort@127.0.0.1:{port}/poort"


def node_config(d, name, port, upstream, database_url, external):
    """A node's folder: the shared keys and certificate, a config of its own; the nodes of a
    cluster share the address users type (`external`)."""
    folder = os.path.join(d, name)
    shutil.copytree(os.path.join(d, "poort-data"), folder, ignore=shutil.ignore_patterns("poort.db*", "poort.toml"))
    store = f'database_url = "{database_url}"' if database_url else ""
    # Each node has an admin listener of its own (two cannot share the default port).
    admin = f'listen = "127.0.0.1:{c.free_port()}"'
    ports = {"poort": port, "upstream": upstream}
    return c.poort_config(d, ports, folder=name, external=external, store=store, admin=admin)


def measure(a, nodes, token, pg_pids):
    """wrk on each node at once, the connections split; returns rps, p99 and CPU µs/req."""
    poort_pids = [p.pid for p, _ in nodes]
    before, pg_before = c.cpu_ticks(poort_pids), c.cpu_ticks(pg_pids) if pg_pids else 0
    per = max(1, a.conns // len(nodes))
    runs = []
    for _, port in nodes:
        url = f"https://127.0.0.1:{port}/app/small"
        args = ["wrk", "-t1", f"-c{per}", f"-d{a.seconds}s", "--latency", "--timeout", "5s"]
        args += ["-H", f"Host: localhost:{nodes[0][1]}", "-H", f"Cookie: {c.COOKIE}={token}", url]
        runs.append(subprocess.Popen(args, stdout=subprocess.PIPE, text=True))
    outs = [r.communicate()[0] for r in runs]
    ticks = c.cpu_ticks(poort_pids) - before
    pg_ticks = (c.cpu_ticks(pg_pids) - pg_before) if pg_pids else 0
    rps = requests = errors = 0
    p99 = 0.0
    for out in outs:
        rps += float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        requests += int(re.search(r"(\d+) requests in", out).group(1))
        p99 = max(p99, c.parse_latency(re.search(r"\s99%\s+(\S+)", out).group(1)))
        m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        errors += int(m.group(1)) if m else 0
    us = lambda t: t / c.TICK * 1e6 / max(requests, 1)  # noqa: E731
    return {"rps": rps, "p99": p99, "cpu": us(ticks), "pg_cpu": us(pg_ticks), "errors": errors}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--poort", required=True)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--out")
    a = ap.parse_args()
    c.report_of(run, a, "poort-cluster-bench-")


def run(a, d, procs):
    subprocess.run([a.poort, "quickstart", "--no-serve"], cwd=d, capture_output=True, text=True, check=True)
    upstream = c.free_port()
    www = os.path.join(d, "www")
    os.makedirs(www)
    with open(os.path.join(www, "small"), "wb") as f:
        f.write(b"x" * 99 + b"\n")
    conf = os.path.join(d, "upstream.conf")
    with open(conf, "w") as f:
        f.write(
            c.nginx_conf(
                "upstream",
                1,
                f"""
    server {{
        listen 127.0.0.1:{upstream} reuseport;
        root {www};
        default_type application/octet-stream;
    }}
""",
                d,
            )
        )
    procs.start(["nginx", "-c", conf, "-p", d], stderr=subprocess.DEVNULL)
    pg, url = start_postgres(d, procs)
    pg_pids = c.pids_of(pg.pid)
    env = dict(os.environ, POORT_LOG="warn,rustls=error")
    ports = {n: c.free_port() for n in ["sqlite", "pg-a", "pg-b"]}
    cfgs = {
        "sqlite": node_config(d, "sqlite", ports["sqlite"], upstream, None, ports["sqlite"]),
        "pg-a": node_config(d, "pg-a", ports["pg-a"], upstream, url, ports["pg-a"]),
        "pg-b": node_config(d, "pg-b", ports["pg-b"], upstream, url, ports["pg-a"]),
    }
    for cfg in [cfgs["sqlite"], cfgs["pg-a"]]:
        subprocess.run(
            [a.poort, "user", "add", "alice", "--config", cfg, "--group", "staff", "--password-stdin"],
            input=PASSWORD + "\n",
            text=True,
            check=True,
            capture_output=True,
            env=env,
        )
    nodes = {}
    for n, cfg in cfgs.items():
        folder = os.path.dirname(cfg)
        nodes[n] = (procs.start([a.poort, "serve", "--config", cfg], env=env, cwd=folder), ports[n])
        c.wait_port(ports[n])
    time.sleep(0.5)
    tokens = {"sqlite": c.login(ports["sqlite"], "alice", PASSWORD), "pg": c.login(ports["pg-a"], "alice", PASSWORD)}
    pg_pids = c.pids_of(pg.pid)  # with the backends the nodes opened
    targets = {
        "sqlite": ([nodes["sqlite"]], tokens["sqlite"], []),
        "pg-1": ([nodes["pg-a"]], tokens["pg"], pg_pids),
        "pg-2": ([nodes["pg-a"], nodes["pg-b"]], tokens["pg"], pg_pids),
    }
    # Each target answers the session before anything is measured, and refuses a wrong one.
    for t, (ns, token, _) in targets.items():
        for _, port in ns:
            for cookie, want in [(token, "200"), ("AAAA", "401")]:
                got = subprocess.run(
                    ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Host: localhost:{ns[0][1]}"]
                    + ["-H", f"Cookie: {c.COOKIE}={cookie}", f"https://127.0.0.1:{port}/app/small"],
                    capture_output=True,
                    text=True,
                ).stdout
                if got != want:
                    raise SystemExit(f"{t} on port {port} answered {got} instead of {want}")
    order = list(targets)
    results = {t: [] for t in order}
    for r in range(a.rounds):
        for t in order if r % 2 == 0 else reversed(order):
            ns, token, pids = targets[t]
            results[t].append(measure(a, ns, token, c.pids_of(pg.pid) if pids else []))
    return render(a, results, order)


def render(a, results, order):
    med = lambda t, k: statistics.median(x[k] for x in results[t])  # noqa: E731
    rng = lambda t, k, fmt: "–".join(fmt.format(f(x[k] for x in results[t])) for f in (min, max))  # noqa: E731
    lines = [
        "# Cluster benchmark: SQLite node, PostgreSQL node, two PostgreSQL nodes",
        "",
        f"`bench/cluster --seconds {a.seconds} --rounds {a.rounds} --conns {a.conns}`, "
        f"{time.strftime('%Y-%m-%d')}, on {c.machine()}.",
        "",
        f"wrk, keep-alive, {a.conns} connections in all (split evenly over the nodes), 100-byte body, "
        "a signed-in session on every request; medians of the rounds, range in brackets.",
        "",
        "| target | req/s | vs sqlite | p99 ms | poort CPU µs/req | PostgreSQL CPU µs/req | errors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = med("sqlite", "rps")
    for t in order:
        errors = sum(x["errors"] for x in results[t])
        lines.append(
            f"| {t} | {med(t, 'rps'):.0f} ({rng(t, 'rps', '{:.0f}')}) | {med(t, 'rps') / base:.2f}x "
            f"| {med(t, 'p99'):.2f} | {med(t, 'cpu'):.1f} ({rng(t, 'cpu', '{:.1f}')}) "
            f"| {med(t, 'pg_cpu'):.2f} | {errors} |"
        )
    lines += [
        "",
        "All targets share the machine's cores with wrk and with each other, so two nodes on one",
        "machine show what the database costs per request, not what a second machine would add.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
