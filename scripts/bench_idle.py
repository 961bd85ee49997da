#!/usr/bin/env python3
"""What an idle connection costs a server (scripts/bench.sh's idle figures).

Opens --conns TLS connections from --nsources consecutive source addresses
(so no per-address limit is in play), does one GET on each (checked against
--digest), keeps them all open and idle for --settle seconds, then reads the
server's RSS (VmRSS summed over --pids) and compares it with its RSS before
the first connection. Over HTTP/2 (--proto h2, ALPN h2) the client answers
the server's SETTINGS and PINGs, as a live client would, and sends nothing
else.

  bench_idle.py --connect IP --host NAME --cafile CA --path P --digest D
                --pids PID,PID... [--accept TYPE] [--proto h1|h2]
                [--conns N] [--sources FIRST] [--nsources N] [--settle S]

Prints the KiB of RSS per connection ((after - before) / conns), the number
of connections still open at the measurement, the number that failed or
were closed before it, and the RSS before and after (KiB), space-separated.
"""

import argparse
import asyncio
import sys

import bench_http as bh


def rss_kib(pids):
    """VmRSS of each pid still alive, KiB."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        out[pid] = int(line.split()[1])
        except FileNotFoundError:
            pass
    return out


class Conn:
    """One connection that did its GET and now only keeps itself alive."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.closed = None  # why the server ended it, if it did

    async def watch(self, proto):
        try:
            if proto == "h1":
                data = await self.reader.read(1)
                self.closed = "closed by the server" if not data else "unasked-for bytes"
            else:
                while True:
                    kind, flags, _, payload = await bh.h2_frame(self.reader)
                    if not bh.h2_answer(self.writer, kind, flags, payload):
                        self.closed = "GOAWAY"
                        return
        except (OSError, asyncio.IncompleteReadError) as e:
            self.closed = repr(e)


async def open_one(args, ctx, source):
    reader, writer = await bh.connect(args.connect, args.host, ctx, source)
    if args.proto == "h1":
        status, _, digest, _, _ = await bh.h1_get(reader, writer, args.host, args.path, args.accept)
        if status != 200:
            raise bh.BadResponse(f"HTTP {status}")
    else:
        alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        if alpn != "h2":
            raise bh.BadResponse(f"ALPN chose {alpn!r}, not h2")
        digest, _ = await bh.h2_get(reader, writer, args.host, args.path, args.accept)
    if digest != args.digest:
        raise bh.BadResponse(f"body hashes to {digest}, not {args.digest}")
    return Conn(reader, writer)


async def main():
    p = argparse.ArgumentParser()
    bh.add_peer_args(p, "127.0.21.1", 40)
    p.add_argument("--path", required=True)
    p.add_argument("--digest", required=True)
    p.add_argument("--pids", required=True, help="the server's processes, comma-separated")
    p.add_argument("--accept")
    p.add_argument("--proto", choices=["h1", "h2"], default="h1")
    p.add_argument("--conns", type=int, default=4000)
    p.add_argument("--settle", type=float, default=10.0)
    args = p.parse_args()

    pids = [int(x) for x in args.pids.split(",") if x]
    ctx = bh.context(args.cafile, "h2" if args.proto == "h2" else "http/1.1")
    addrs = bh.sources(args.sources, args.nsources)
    before = rss_kib(pids)
    gate = asyncio.Semaphore(64)

    async def one(i):
        async with gate:
            return await open_one(args, ctx, addrs[i % len(addrs)])

    opened = await asyncio.gather(*(one(i) for i in range(args.conns)), return_exceptions=True)
    errors = [repr(c) for c in opened if isinstance(c, BaseException)]
    conns = [c for c in opened if isinstance(c, Conn)]
    watchers = [asyncio.create_task(c.watch(args.proto)) for c in conns]
    await asyncio.sleep(args.settle)
    after = rss_kib(pids)
    closed = [c.closed for c in conns if c.closed]
    errors += closed
    for e in sorted(set(errors))[:5]:
        print(f"bench_idle: {e}", file=sys.stderr)
    for c in conns:
        c.writer.transport.abort()
    for w in watchers:
        w.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    # Only processes alive at both readings: one that came or went meanwhile
    # (nginx's cache loader) says nothing about connections.
    both = before.keys() & after.keys()
    b = sum(before[p] for p in both)
    a = sum(after[p] for p in both)
    print(f"{(a - b) / args.conns:.2f} {len(conns) - len(closed)} {len(errors)} {b} {a}")


if __name__ == "__main__":
    asyncio.run(main())
