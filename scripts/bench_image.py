#!/usr/bin/env python3
"""Writes an OCI image layout for scripts/bench.sh: one image whose layers are
gzip'd tars of random bytes, so nothing in the path can compress them.

    bench_image.py DIR TAG SIZE_MIB [SIZE_MIB ...]

One layer per SIZE_MIB (the first is the big one the blob figures use).
Prints the manifest digest, then each layer's digest and size, one per line.
"""

import gzip
import hashlib
import io
import json
import os
import sys
import tarfile


def blob(root, data):
    d = hashlib.sha256(data).hexdigest()
    path = os.path.join(root, "blobs", "sha256", d)
    with open(path, "wb") as f:
        f.write(data)
    return "sha256:" + d


def layer(size):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as t:
        info = tarfile.TarInfo("random.bin")
        info.size = size
        info.mode = 0o644
        t.addfile(info, io.BytesIO(os.urandom(size)))
    # Level 1: random bytes do not compress anyway, and it is fast.
    return gzip.compress(raw.getvalue(), compresslevel=1, mtime=0)


def main():
    root, tag, sizes = sys.argv[1], sys.argv[2], [float(s) for s in sys.argv[3:]]
    os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)
    layers = []
    for mib in sizes:
        data = layer(int(mib * 1024 * 1024))
        layers.append((blob(root, data), len(data), hashlib.sha256(gzip.decompress(data)).hexdigest()))
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + l[2] for l in layers]},
        }
    ).encode()
    config_digest = blob(root, config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n}
                for d, n, _ in layers
            ],
        }
    ).encode()
    manifest_digest = blob(root, manifest)
    with open(os.path.join(root, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump(index, f)
    print(manifest_digest, len(manifest))
    for d, n, _ in layers:
        print(d, n)


if __name__ == "__main__":
    main()
