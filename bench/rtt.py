#!/usr/bin/env python3
"""Small request/response round trips over TCP: `rtt.py serve PORT` echoes; `rtt.py measure
PORT N` sends N one-byte requests, one at a time, and prints the median and p99 in µs."""
import socket
import statistics
import sys
import time


def serve(port):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    while True:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            b = conn.recv(64)
            if not b:
                break
            conn.sendall(b)
        conn.close()


def measure(port, n):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples = []
    for i in range(n + 50):
        t = time.perf_counter_ns()
        s.sendall(b"x")
        if s.recv(64) != b"x":
            raise SystemExit("bad echo")
        if i >= 50:  # warm-up
            samples.append((time.perf_counter_ns() - t) / 1000)
    s.close()
    samples.sort()
    print(f"{statistics.median(samples):.0f} {samples[int(len(samples) * 0.99)]:.0f}")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        measure(int(sys.argv[2]), int(sys.argv[3]))
