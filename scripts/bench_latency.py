#!/usr/bin/env python3
"""Open-loop latency probe: GETs sent on a fixed schedule, latency measured
from each request's scheduled time (so a stall counts for every request it
delays, not just the one it caught).

h2load is closed-loop: it sends the next request as soon as one returns, so
it saturates the CPU, and any other work on a 2-core machine (hashing a
cold download, a `cache gc` process) lengthens every request by its share of
the CPU. That measures CPU share, not stalls. A probe at a modest fixed
rate leaves the CPU mostly idle, so a request that waits for a lock, a
directory walk or disk I/O shows up as such.

  bench_latency.py --connect IP --host NAME --cafile CA --path P
                   [--accept T] [--rate R] [--seconds S] [--conns C]

Prints the p50, p99 and max latency in milliseconds, space-separated.
"""

import argparse
import http.client
import socket
import ssl
import sys
import threading
import time


def probe(args, conn_index, start, out):
    ctx = ssl.create_default_context(cafile=args.cafile)
    interval = args.conns / args.rate
    n = int(args.seconds * args.rate / args.conns)
    headers = {"Host": args.host}
    if args.accept:
        headers["Accept"] = args.accept
    def connect():
        raw = socket.create_connection((args.connect, 443), timeout=30)
        tls = ctx.wrap_socket(raw, server_hostname=args.host)
        c = http.client.HTTPSConnection(args.host, 443, timeout=30)
        c.sock = tls
        return c

    # Connected before the schedule starts: handshakes are not what is measured.
    conn = connect()
    for i in range(n):
        scheduled = start + (i + conn_index / args.conns) * interval
        delay = scheduled - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if conn is None:
            conn = connect()
        try:
            conn.request("GET", args.path, headers=headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                print(f"bench_latency: {args.path}: HTTP {resp.status}", file=sys.stderr)
                sys.exit(1)
        except (OSError, http.client.HTTPException) as e:
            print(f"bench_latency: {args.path}: {e}", file=sys.stderr)
            conn.close()
            conn = None
            continue
        out.append(time.monotonic() - scheduled)
    if conn is not None:
        conn.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--connect", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--cafile", required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--accept")
    p.add_argument("--rate", type=float, default=200.0, help="requests per second, all connections")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--conns", type=int, default=4)
    args = p.parse_args()

    results = []
    start = time.monotonic() + 1.0
    threads = [
        threading.Thread(target=probe, args=(args, i, start, results)) for i in range(args.conns)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not results:
        print("bench_latency: no request succeeded", file=sys.stderr)
        sys.exit(1)
    results.sort()

    def pct(q):
        return results[min(len(results) - 1, int(len(results) * q))] * 1000

    print(f"{pct(0.5):.3f} {pct(0.99):.3f} {results[-1] * 1000:.3f}")


if __name__ == "__main__":
    main()
