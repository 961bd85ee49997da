"""The client side of scripts/bench_herd.py and scripts/bench_idle.py: TLS
connections from a chosen loopback source address, HTTP/1.1 GETs whose
bodies are hashed as they arrive, and just enough HTTP/2 (written by hand)
for one GET on a connection that then stays open. Python's stdlib only.

Every peer is addressed as the registry (SNI and Host), whatever address it
listens on, as scripts/bench.sh's curl --resolve and h2load --connect-to do.
"""

import asyncio
import hashlib
import ipaddress
import ssl
import struct

# The largest body kept in memory (a manifest); larger ones are only hashed.
KEEP = 1 << 20


def add_peer_args(parser, first_source, nsources):
    """The arguments both load generators take: where the peer listens, the
    name it is addressed by, its CA, and the clients' source addresses."""
    parser.add_argument("--connect", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--sources", default=first_source)
    parser.add_argument("--nsources", type=int, default=nsources)


def sources(first, n):
    """n consecutive addresses from first: the clients' source addresses."""
    a = ipaddress.IPv4Address(first)
    return [str(a + i) for i in range(n)]


def context(cafile, alpn):
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols([alpn])
    return ctx


async def connect(ip, host, ctx, source, timeout=30):
    """A TLS connection to ip:443 from source, as host."""
    return await asyncio.wait_for(
        asyncio.open_connection(
            ip, 443, ssl=ctx, server_hostname=host, local_addr=(source, 0), limit=1 << 18
        ),
        timeout,
    )


class BadResponse(Exception):
    pass


async def h1_get(reader, writer, host, path, accept=None):
    """One GET on a kept-alive HTTP/1.1 connection.

    Returns (status, headers, "sha256:…" of the body, body length, the body
    when at most KEEP bytes). The body is read to its end, so the connection
    is ready for the next request unless headers say "connection: close".
    """
    head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: regmirror-bench\r\n"
    if accept:
        head += f"Accept: {accept}\r\n"
    writer.write((head + "\r\n").encode())
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise BadResponse(f"bad status line {lines[0]!r}")
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    h = hashlib.sha256()
    kept = []
    n = 0

    def take(data):
        nonlocal n
        h.update(data)
        n += len(data)
        if n <= KEEP:
            kept.append(data)

    if "content-length" in headers:
        left = int(headers["content-length"])
        while left:
            data = await reader.read(min(left, 1 << 18))
            if not data:
                raise BadResponse(f"connection closed with {left} bytes of the body missing")
            take(data)
            left -= len(data)
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                break
            take(await reader.readexactly(size))
            await reader.readexactly(2)
    elif status not in (204, 304):
        raise BadResponse("a response with neither Content-Length nor chunked encoding")
    return status, headers, "sha256:" + h.hexdigest(), n, b"".join(kept) if n <= KEEP else None


# ---------------------------------------------------------------- HTTP/2
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack_int(value, prefix_bits, first=0):
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes([first | value])
    out = [first | top]
    value -= top
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literal(name_index, value):
    """A literal header field without indexing, its name from the static table."""
    v = value.encode()
    return hpack_int(name_index, 4) + hpack_int(len(v), 7) + v


def h2_request(host, path, accept=None):
    """The client's first flight: preface, empty SETTINGS, HEADERS of a GET on stream 1."""
    # Static table: 2 :method GET, 7 :scheme https, 4 :path, 1 :authority, 19 accept.
    block = b"\x82\x87" + hpack_literal(4, path) + hpack_literal(1, host)
    if accept:
        block += hpack_literal(19, accept)
    return PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, END_STREAM | END_HEADERS, 1, block)


async def h2_frame(reader):
    head = await reader.readexactly(9)
    length = int.from_bytes(head[:3], "big")
    stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
    return head[3], head[4], stream, await reader.readexactly(length)


def h2_answer(writer, kind, flags, payload):
    """What a client owes the server: SETTINGS and PING acknowledged. Returns
    False when the frame ends the connection (GOAWAY)."""
    if kind == SETTINGS and not flags & ACK:
        writer.write(frame(SETTINGS, ACK, 0))
    elif kind == PING and not flags & ACK:
        writer.write(frame(PING, ACK, 0, payload))
    return kind != GOAWAY


async def h2_get(reader, writer, host, path, accept=None):
    """One GET as the first stream of a new HTTP/2 connection: returns
    ("sha256:…" of the body, its length); the status is not decoded, the
    caller checks the digest."""
    writer.write(h2_request(host, path, accept))
    h = hashlib.sha256()
    n = 0
    while True:
        kind, flags, stream, payload = await h2_frame(reader)
        if not h2_answer(writer, kind, flags, payload):
            raise BadResponse("GOAWAY before the response ended")
        if stream != 1:
            continue
        if kind == RST_STREAM:
            raise BadResponse("stream reset")
        if kind == DATA:
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            h.update(payload)
            n += len(payload)
        if kind in (DATA, HEADERS) and flags & END_STREAM:
            return "sha256:" + h.hexdigest(), n
