#!/usr/bin/env python3
"""A thundering herd: many clients pull one image at the same moment, as a
fleet does when a deploy rolls out (scripts/bench.sh's herd figure).

Each client holds one TLS connection (HTTP/1.1, kept alive) from one of
--nsources consecutive source addresses, a fleet behind NAT gateways. All
connect first (handshakes are not what is measured); then, at one instant,
each GETs the manifest by tag, then the config and every layer in order,
checking each body against its sha256 digest (and the manifest against
--manifest when given).

  bench_herd.py --connect IP --host NAME --cafile CA --repo R --tag T
                [--manifest DIGEST] [--accept TYPE] [--clients N]
                [--sources FIRST] [--nsources N]

Prints the wall time (from the start to the last client done), the p50 and
p99 of the clients' own pull times, in seconds, and the number of clients
that failed, space-separated. The first few failures, and the p50 and p99
of the time to the manifest by tag, go to stderr.

All clients share one event loop, so they advance together: when the
client's core is the bottleneck, the p99 is close to the wall time.
"""

import argparse
import asyncio
import json
import sys
import time

import bench_http as bh


manifest_times = []  # each client's time to its manifest by tag


async def pull(args, ctx, source, conn, start):
    """One client's pull after start is set; returns its time in seconds."""
    reader, writer = conn
    await start.wait()
    t0 = time.monotonic()
    base = f"/v2/{args.repo}"

    async def get(path, accept=None):
        nonlocal reader, writer
        if writer is None:
            reader, writer = await bh.connect(args.connect, args.host, ctx, source)
        status, headers, digest, n, body = await bh.h1_get(reader, writer, args.host, path, accept)
        if headers.get("connection", "").lower() == "close":
            writer.close()
            writer = None
        if status != 200:
            raise bh.BadResponse(f"{path}: HTTP {status}")
        return digest, n, body

    try:
        digest, _, body = await get(f"{base}/manifests/{args.tag}", args.accept)
        manifest_times.append(time.monotonic() - t0)
        if args.manifest and digest != args.manifest:
            raise bh.BadResponse(f"manifest by tag is {digest}, not {args.manifest}")
        manifest = json.loads(body)
        for want in [manifest["config"]] + manifest["layers"]:
            digest, n, _ = await get(f"{base}/blobs/{want['digest']}")
            if digest != want["digest"] or n != want["size"]:
                raise bh.BadResponse(f"blob {want['digest']}: got {n} bytes hashing to {digest}")
    finally:
        if writer is not None:
            writer.close()
    return time.monotonic() - t0


async def main():
    p = argparse.ArgumentParser()
    bh.add_peer_args(p, "127.0.20.1", 50)
    p.add_argument("--repo", required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--manifest")
    p.add_argument("--accept", default="application/vnd.oci.image.manifest.v1+json")
    p.add_argument("--clients", type=int, default=500)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a client may take")
    args = p.parse_args()

    ctx = bh.context(args.cafile, "http/1.1")
    addrs = bh.sources(args.sources, args.nsources)
    errors = []
    # At most 64 handshakes at a time, so no listen backlog overflows while connecting.
    gate = asyncio.Semaphore(64)

    async def connect(i):
        async with gate:
            return await bh.connect(args.connect, args.host, ctx, addrs[i % len(addrs)])

    conns = await asyncio.gather(*(connect(i) for i in range(args.clients)), return_exceptions=True)
    start = asyncio.Event()
    tasks = []
    for i, conn in enumerate(conns):
        if isinstance(conn, BaseException):
            errors.append(f"connecting: {conn!r}")
            continue
        source = addrs[i % len(addrs)]
        tasks.append(asyncio.create_task(asyncio.wait_for(pull(args, ctx, source, conn, start), args.timeout)))
    t0 = time.monotonic()
    start.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.monotonic() - t0
    times = []
    for r in results:
        if isinstance(r, BaseException):
            errors.append(repr(r))
        else:
            times.append(r)
    for e in sorted(set(errors))[:5]:
        print(f"bench_herd: {e}", file=sys.stderr)
    if not times:
        print(f"bench_herd: all {args.clients} clients failed", file=sys.stderr)
        sys.exit(1)

    def pct(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(len(values) * q))]

    # Where the time went, for whoever reads the log: the manifest by tag is
    # the one request each peer sends upstream for every client.
    print(
        f"bench_herd: manifest by tag p50 {pct(manifest_times, 0.5):.3f} s, p99 {pct(manifest_times, 0.99):.3f} s",
        file=sys.stderr,
    )
    print(f"{wall:.3f} {pct(times, 0.5):.3f} {pct(times, 0.99):.3f} {len(errors)}")


if __name__ == "__main__":
    asyncio.run(main())
