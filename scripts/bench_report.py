#!/usr/bin/env python3
"""Turns scripts/bench.sh's measurements (figure, peer, value per line, one
line per repetition) into tables of ratios, one per group of figures. Prints
them; with --out, puts each between its markers in that file (the rest of the
file, and the tables of groups this run did not measure, are kept), creating
the file when missing."""

import argparse
import os
import statistics
import sys

# Each group is its own table between its own markers: a run that measured
# none of a group's figures (scripts/bench.sh --only) leaves its table as it was.
GROUPS = {
    "cache": {
        "peers": ["direct", "dist-proxy", "nginx-cache", "nginx-static", "regmirror"],
        "begin": "<!-- bench:begin (written by scripts/bench.sh; edit outside the markers) -->",
        "end": "<!-- bench:end -->",
    },
    "registry": {
        "peers": ["dist-auth", "regmirror"],
        "begin": "<!-- bench:registry:begin (written by scripts/bench.sh; edit outside the markers) -->",
        "end": "<!-- bench:registry:end -->",
    },
    "replicas": {
        "peers": ["garage", "nginx-relay", "regmirror-disk", "regmirror"],
        "begin": "<!-- bench:replicas:begin (written by scripts/bench.sh; edit outside the markers) -->",
        "end": "<!-- bench:replicas:end -->",
    },
}
REGISTRY_FIGURES = {"push_s", "push_pull_s", "push8_s", "push8_rss_mib"}
REPLICA_FIGURES = {"s3_cold_local_plain_mibs", "s3_cold_local_tls_mibs", "s3_local_mibs"}


def group_of(figure):
    if figure in REGISTRY_FIGURES:
        return "registry"
    if figure in REPLICA_FIGURES:
        return "replicas"
    return "cache"

# key: (label, unit, [(peer, comparison, target ratio regmirror/peer)])
# A peer of None compares regmirror's own value with the target; a comparison
# of None shows the ratio without a target.
FIGURES = [
    ("manifest_h1", "warm manifest-by-digest GET/s, 64 connections, HTTP/1.1", "req/s", [("nginx-cache", ">=", 1.0)]),
    ("manifest_h2", "warm manifest-by-digest GET/s, 64 connections × 4 streams, HTTP/2", "req/s", [("nginx-cache", ">=", 1.0)]),
    ("manifest_h2m1", "warm manifest-by-digest GET/s, 64 connections × 1 stream, HTTP/2", "req/s", [("nginx-cache", ">=", 1.0)]),
    ("tag_head_ms", "warm tag HEAD round trip (median of 3 × 100 on kept-alive connections, peers taking turns)", "ms", [("direct", "<=", 1.1)]),
    ("blob1_mibs", "warm {big} MiB blob GET, 1 client (HTTP/1.1; median of 3 GETs per repetition)", "MiB/s", [("nginx-cache", ">=", 1.0), ("nginx-static", ">=", 0.9)]),
    ("blob64_mibs", "warm {big} MiB blob GET, 64 concurrent clients (HTTP/1.1), aggregate", "MiB/s", [("nginx-cache", ">=", 1.0), ("nginx-static", ">=", 0.9)]),
    ("cold_blob_s", "cold {big} MiB blob GET, time (median of 3 per repetition, taking turns)", "s", [("direct", "<=", 1.5)]),
    ("cold8_upstream_bytes", "8 concurrent cold pulls of one image (skopeo): upstream blob bytes / image size (the larger of 2 per repetition)", "×", [(None, "<=", 1.0)]),
    ("cold8_s", "8 concurrent cold pulls of one image (skopeo), time (mean of 2 per repetition, taking turns)", "s", [("nginx-cache", "<=", 1.0)]),
    # A fleet behind NAT gateways pulling one image the cache has not seen (scripts/bench_herd.py):
    # nginx-cache's proxy_cache_lock waiters poll for the entry, regmirror's waiters are streamed to.
    ("herd_s", "herd: {herd} clients from 50 addresses pull one cold {herd_mib} MiB image (5 layers) at once, manifest by tag then each blob, digests checked; wall time (mean of 2 per repetition, taking turns)", "s", [("nginx-cache", "<=", 1.0)]),
    ("herd_p99_s", "herd: p99 of the {herd} clients' own pull times (mean of 2 per repetition)", "s", [("nginx-cache", "<=", 1.0)]),
    ("herd_errors", "herd: failed pulls, both rounds together", "pulls", []),
    ("pull_warm_s", "warm whole-image pull (skopeo, {image} MiB, 5 layers), time (median of 5 per repetition, taking turns)", "s", [("direct", "<=", 1.0)]),
    ("rss_mib", "peak RSS (VmHWM, all processes): cold pull, then every warm figure incl. 64 × {big} MiB", "MiB", [("nginx-cache", "<=", 1.5)]),
    ("conns_s", "{conns} new TLS connections × 5 manifest GETs (HTTP/1.1), time (median of 3 per repetition, taking turns)", "s", [("nginx-cache", "<=", 1.0)]),
    # scripts/bench_idle.py: VmRSS summed over the server's processes, after minus before, in a freshly started peer.
    ("idle_h1_kib", "RSS per idle connection: {idle} TLS connections from 40 addresses, one warm manifest GET each (HTTP/1.1), then idle {settle} s", "KiB", [("nginx-cache", "<=", 1.5)]),
    ("idle_h2_kib", "RSS per idle connection: the same over HTTP/2 (ALPN h2, one GET each, PINGs answered)", "KiB", [("nginx-cache", "<=", 1.5)]),
    # The private registry: regmirror with a [[local]] namespace beside distribution with
    # htpasswd auth, both started empty for each figure, skopeo pushing the bench image.
    ("push_s", "push of the {image} MiB image to a private registry (skopeo, login, empty store; median of 3 per repetition, taking turns)", "s", [("dist-auth", "<=", 1.0)]),
    ("push_pull_s", "pull of that pushed image back (skopeo, login; median of 3 per repetition)", "s", [("dist-auth", "<=", 1.0)]),
    ("push8_s", "8 concurrent pushes of the {image} MiB image to distinct repositories, time", "s", [("dist-auth", "<=", 1.0)]),
    ("push8_rss_mib", "peak RSS (VmHWM) of the registry during those 8 concurrent pushes", "MiB", [("dist-auth", "<=", 1.0)]),
    # The S3 backend (regmirror, cache.backend = "s3", on one Garage node): a blob the bucket
    # holds, through a replica whose local read cache is empty (restarted empty before each
    # GET), against curl reading the same object from Garage; then hits from its local read
    # cache against the disk backend's (regmirror-disk: the single-node instance above).
    ("s3_cold_local_plain_mibs", "warm {big} MiB blob GET through a replica whose local read cache is cold (from the bucket), plain HTTP like curl to Garage, 1 client (median of 3 per repetition, taking turns with curl; nginx-relay: curl through nginx proxy_pass to Garage)", "MiB/s", [("garage", ">=", 0.9), ("nginx-relay", None, None)]),
    ("s3_cold_local_tls_mibs", "the same over TLS (transparent mode; curl to Garage stays plain HTTP; nginx-relay: through its TLS listener)", "MiB/s", [("garage", ">=", 0.9), ("nginx-relay", None, None)]),
    ("s3_local_mibs", "warm {big} MiB blob GET from the replica's local read cache, 1 client (median of 2 × 3 GETs per repetition, taking turns)", "MiB/s", [("regmirror-disk", ">=", 0.9)]),
    # The server's own CPU during the client-bound figures: their time is mostly the
    # client's (skopeo, h2load) on the same two cores. No target. regmirror's is its own
    # process (the upstream's ~2 ms for its tag HEAD per pull is not counted).
    ("pull_cpu_s", "server CPU during one warm whole-image pull", "s", [("direct", None, None)]),
    ("cold8_cpu_s", "server CPU during 8 concurrent cold pulls", "s", [("nginx-cache", None, None)]),
    ("conns_cpu_s", "server CPU during {conns} new TLS connections × 5 manifest GETs", "s", [("nginx-cache", None, None)]),
    # No stall: eviction (cache gc of the big layer, then its refetch from upstream, in a loop)
    # beside warm requests. Open loop (scripts/bench_latency.py, 200 requests/s on a fixed
    # schedule), compared with the same refetch loop where the layer's file is deleted
    # behind regmirror's back (no cache gc, no index work): what eviction itself costs.
    ("p99_manifest_evicting_open", "p99 of warm manifest GETs (200/s) while eviction + refetch run / while the same refetch runs without eviction", "×", [(None, "<=", 1.5)]),
    ("p99_blob_evicting_open", "p99 of warm GETs of a small blob (200/s) while eviction + refetch run / while the same refetch runs without eviction", "×", [(None, "<=", 1.5)]),
    ("p99_manifest_loaded_open", "p99 of warm manifest GETs (200/s) while eviction + refetch run / while idle", "×", []),
    ("p99_blob_loaded_open", "p99 of warm GETs of a small blob (200/s) while eviction + refetch run / while idle", "×", []),
    # Closed loop (h2load, 8 connections as fast as they go) saturates both cores: the ratio is
    # the CPU share the refetch takes from it, not a stall. Shown for comparison, no target.
    ("p99_manifest_evicting", "p99 of warm manifest GETs, h2load saturating, while eviction + refetch run / while idle", "×", []),
    ("p99_blob_evicting", "p99 of warm GETs of a 40 MiB layer (0.5 MiB with --quick), h2load saturating, while eviction + refetch run / while idle", "×", []),
]


def fmt(v):
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def cell(values):
    if not values:
        return "–"
    m = statistics.median(values)
    if len(values) == 1:
        return fmt(m)
    return f"{fmt(m)} ({fmt(min(values))}–{fmt(max(values))})"


def holds(ratio, op, target):
    return ratio >= target if op == ">=" else ratio <= target


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--command", required=True)
    ap.add_argument("--reps", type=int, required=True)
    ap.add_argument("--big-mib", required=True)
    ap.add_argument("--image-mib", required=True)
    ap.add_argument("--conns", default="1000")
    ap.add_argument("--herd", default="500")
    ap.add_argument("--herd-mib", default="4")
    ap.add_argument("--idle", default="4000")
    ap.add_argument("--idle-settle", default="10")
    ap.add_argument("--machine", default="")
    ap.add_argument("--versions", default="")
    ap.add_argument("--out")
    a = ap.parse_args()

    data = {}  # (figure, peer) -> [values in repetition order]
    with open(a.results) as f:
        for line in f:
            fig, peer, value = line.rstrip("\n").split("\t")
            if value:
                data.setdefault((fig, peer), []).append(float(value))

    old = ""
    if a.out and os.path.exists(a.out):
        with open(a.out) as f:
            old = f.read()
    new = old
    missed_all = 0
    for group, g in GROUPS.items():
        figures = [f for f in FIGURES if group_of(f[0]) == group]
        if not any((f[0], p) in data for f in figures for p in g["peers"]):
            continue
        table, missed = render(figures, g["peers"], data, a)
        missed_all += missed
        print(table)
        body = "\n".join(
            [
                g["begin"],
                "",
                f"Command: `{a.command}` (as root; {a.reps} repetition{'s' if a.reps != 1 else ''}, peers alternating in a rotating order).",
                f"Machine: {a.machine}." if a.machine else "",
                f"Versions: {a.versions}." if a.versions else "",
                "",
                "Each cell: median (min–max) over the repetitions. Ratios are regmirror / peer, computed per repetition",
                "(runs made side by side) and then the median taken. Everything shares one machine, the load generator",
                "included: treat differences under ~10% as noise."
                + (
                    " Where no target compares with direct or dist-proxy"
                    " (manifest rates, 1-client blobs, connections, cold pulls), those two are measured in the first repetition only."
                    if group == "cache"
                    else ""
                ),
                "Figures whose time is short or mostly the client's are measured several times per repetition for the pair",
                "the target compares, peers taking turns (the label says how many); the repetition's value is their median.",
                "",
                table,
                "",
                f"Targets missed: {missed}.",
                "",
                g["end"],
            ]
        )
        if g["begin"] in new and g["end"] in new:
            new = new[: new.index(g["begin"])] + body + new[new.index(g["end"]) + len(g["end"]) :]
        elif group == "registry" and GROUPS["cache"]["end"] in new:
            at = new.index(GROUPS["cache"]["end"]) + len(GROUPS["cache"]["end"])
            new = new[:at] + "\n\n### Private registry\n\n" + body + new[at:]
        elif group == "replicas" and GROUPS["registry"]["end"] in new:
            at = new.index(GROUPS["registry"]["end"]) + len(GROUPS["registry"]["end"])
            new = new[:at] + "\n\n### Several replicas (S3 backend)\n\n" + body + new[at:]
        else:
            new = ("# Benchmarks\n\n" if not new else new + "\n") + body + "\n"
    print(f"\ntargets missed: {missed_all}")
    if a.out:
        with open(a.out, "w") as f:
            f.write(new)
        print(f"wrote {a.out}", file=sys.stderr)


def render(figures, peers, data, a):
    head = "| figure | unit | " + " | ".join(peers) + " | regmirror / peer (target) | met |"
    rows = [head, "|" + "---|" * (len(peers) + 4)]
    missed = 0
    for key, label, unit, targets in figures:
        label = label.format(
            big=a.big_mib, image=a.image_mib, conns=a.conns, herd=a.herd, herd_mib=a.herd_mib, idle=a.idle, settle=a.idle_settle
        )
        cells = [cell(data.get((key, p), [])) for p in peers]
        mine = data.get((key, "regmirror"), [])
        ratios, met = [], []
        for peer, op, target in targets:
            if peer is None:
                r = mine
                name = "itself"
            else:
                theirs = data.get((key, peer), [])
                # Paired by repetition: each ratio compares runs made side by side.
                r = [x / y for x, y in zip(mine, theirs) if y]
                name = peer
            if not r:
                ratios.append(f"{name}: –" + (f" ({op} {target})" if op else ""))
                met.append("?" if op else "")
                continue
            med = statistics.median(r)
            spread = "" if len(r) == 1 else f" ({min(r):.2f}–{max(r):.2f})"
            if op is None:
                ratios.append(f"{name}: {med:.2f}×{spread}")
                met.append("")
                continue
            ratios.append(f"{name}: **{med:.2f}×**{spread} ({op} {target})")
            ok = holds(med, op, target)
            missed += not ok
            met.append("yes" if ok else "**no**")
        rows.append(f"| {label} | {unit} | " + " | ".join(cells) + " | " + "<br>".join(ratios) + " | " + "<br>".join(met) + " |")
    return "\n".join(rows), missed


if __name__ == "__main__":
    main()
