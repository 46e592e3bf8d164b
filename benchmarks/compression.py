#!/usr/bin/env python3
"""Lossless filters for capture files: bytes, write and read speed, and what a compressed capture costs.

    python benchmarks/compression.py --work /tmp/hwdiff-vs-msprobe   # after vs_msprobe.py (its workload A)

Every module output of workload A's full capture (float32), and of the same model run in bfloat16, is
written with each filter (Fletcher-32 on, the capture's own chunks) and read back; bytes are relative to
the uncompressed data and to msprobe's output dumps of workload A (docs/benchmarks.json). Then a whole
capture with each of ``hwdiff capture --compression`` is timed against the plain forward, in one process.
Medians of --repeats. Writes docs/compression.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import h5py  # noqa: E402
import hdf5plugin  # noqa: E402

FILTERS = {
    "none": {},
    "lzf (shuffle)": dict(compression="lzf", shuffle=True),
    "gzip 4 (shuffle)": dict(compression="gzip", shuffle=True),
    "gzip 1 (shuffle)": dict(compression="gzip", compression_opts=1, shuffle=True),
    "blosc lz4 (byte shuffle)": dict(
        hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE)
    ),
    "blosc lz4 (bit shuffle) = --compression lz4": dict(
        hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.BITSHUFFLE)
    ),
    "blosc zstd 1 (byte shuffle)": dict(
        hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.SHUFFLE)
    ),
    "blosc zstd 3 (bit shuffle)": dict(
        hdf5plugin.Blosc(cname="zstd", clevel=3, shuffle=hdf5plugin.Blosc.BITSHUFFLE)
    ),
    "blosc2 zstd 1 (byte shuffle) = --compression zstd": dict(
        hdf5plugin.Blosc2(cname="zstd", clevel=1, filters=hdf5plugin.Blosc2.SHUFFLE)
    ),
    "blosc2 lz4 (byte shuffle)": dict(
        hdf5plugin.Blosc2(cname="lz4", clevel=5, filters=hdf5plugin.Blosc2.SHUFFLE)
    ),
    "bitshuffle lz4": dict(hdf5plugin.Bitshuffle(cname="lz4")),
    "zstd 1 (no shuffle)": dict(hdf5plugin.Zstd(clevel=1)),
}


def outputs(path: Path) -> list[tuple[object, tuple]]:
    """(array as stored, chunk shape) of every stored module output of a capture."""
    found = []
    with h5py.File(path, "r") as handle:

        def visit(name, node):
            if isinstance(node, h5py.Dataset) and name.endswith("/output") and node.ndim >= 2:
                found.append((node[()], node.chunks))

        handle["modules"].visititems(visit)
    return found


def measure(arrays, options: dict, work: Path, repeats: int) -> dict:
    raw = sum(array.nbytes for array, _ in arrays)
    path = work / "filter.h5"
    writes, reads = [], []
    for _ in range(repeats):
        path.unlink(missing_ok=True)
        start = time.perf_counter()
        with h5py.File(path, "w", libver=("v110", "v110"), rdcc_nbytes=0) as handle:
            for index, (array, chunks) in enumerate(arrays):
                handle.create_dataset(
                    str(index), data=array, chunks=chunks, fletcher32=True, **options
                )
        writes.append(time.perf_counter() - start)
        start = time.perf_counter()
        with h5py.File(path, "r", rdcc_nbytes=0) as handle:
            for index in range(len(arrays)):
                handle[str(index)][()]
        reads.append(time.perf_counter() - start)
    size = path.stat().st_size
    path.unlink()
    return {
        "bytes": size,
        "of_raw": size / raw,
        "write_gb_s": raw / statistics.median(writes) / 1e9,
        "read_gb_s": raw / statistics.median(reads) / 1e9,
    }


def whole_captures(work: Path, repeats: int) -> dict:
    """Workload A captured with each --compression, against the plain forward in the same process."""
    import torch
    from vs_msprobe import load_model, timed

    import hwdiff

    model, ids = load_model(work, "sdpa")
    inputs = hwdiff.load_inputs(ids, max_tokens=None)

    def forward():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    forward()
    plain = timed(forward, repeats)
    result = {"plain_forward_s": plain}
    path = work / "hw-compressed.h5"
    for name in (None, "lz4", "zstd", "lzf", "gzip"):
        seconds = timed(
            lambda: hwdiff.capture(
                model, path, inputs=inputs, batch_size=2, progress=False, compression=name
            ),
            repeats,
            setup=lambda: path.unlink(missing_ok=True),
        )
        result[name or "none"] = {"ratio_to_forward": seconds / plain, "bytes": path.stat().st_size}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/hwdiff-vs-msprobe"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "compression.json")
    args = parser.parse_args()
    import torch
    from vs_msprobe import load_model

    import hwdiff

    msprobe_bytes = json.loads((ROOT / "docs" / "benchmarks.json").read_text())["msprobe"][
        "tensor_dump_output_bytes"
    ]
    model, ids = load_model(args.work, "sdpa")
    bf16 = args.work / "hw-full-bf16.h5"
    hwdiff.capture(
        model.to(torch.bfloat16),
        bf16,
        inputs=hwdiff.load_inputs(ids, max_tokens=None),
        batch_size=2,
        progress=False,
    )
    result = {
        "machine": {"cpus": os.cpu_count()},
        "msprobe_output_bytes": msprobe_bytes,
        "filters": {},
    }
    for label, path in (("float32", args.work / "hw-full.h5"), ("bfloat16", bf16)):
        arrays = outputs(path)
        result["filters"][label] = {"raw_bytes": sum(a.nbytes for a, _ in arrays)}
        for name, options in FILTERS.items():
            row = measure(arrays, options, args.work, args.repeats)
            row["of_msprobe_outputs"] = row["bytes"] / msprobe_bytes
            result["filters"][label][name] = row
            print(
                f"{label:8s} {name:50s} {row['of_raw']:.3f} of raw, {row['of_msprobe_outputs']:.3f} of msprobe, "
                f"write {row['write_gb_s']:.2f} GB/s, read {row['read_gb_s']:.2f} GB/s",
                flush=True,
            )
    result["captures"] = whole_captures(args.work, args.repeats)
    print(json.dumps(result["captures"], indent=1))
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
