"""The directory form of the capture contract: one capture file per rank plus a manifest.

A multi-rank capture (:mod:`hwdiff.capturing.distributed`) is a directory::

    run/rank0.h5 … rank{N-1}.h5   each a capture file (schema hwdiff/capture/1) written by one rank,
                                   with root attributes rank, world_size, local_rank, local_device,
                                   process_group_backend, parallel ("data" / "tensor"), run_id,
                                   parallel_sequences; data parallel: the rank's own sequences,
                                   whole batches rank, rank + N, … of batch_size
    run/manifest.h5                written last by rank 0: a capture file itself (same schema and
                                   root attributes, complete = true) whose /inputs hold the whole input
                                   set and whose activations are HDF5 virtual datasets over the rank
                                   files: data parallel concatenates the ranks' rows back into input
                                   order, tensor parallel concatenates column-parallel shards
                                   (``placement = "Shard(-1)"``) along the last axis and reads
                                   replicated outputs from rank 0. Root ``rank_files`` (JSON) lists
                                   each rank's file, capture id, device and rows; /parallel/rank_of_row
                                   says which rank computed each sequence.

So every reader of a capture file reads the manifest unchanged, with the checksums of the rank files
(HDF5 applies their filters through the virtual datasets). HDF5 would fill the rows of a missing
source file with the fill value without a word: :func:`check_ranks` opens and matches every rank file
before the manifest is read, and refuses a missing, incomplete or foreign one (the fill value is NaN
anyway, so a file lost after opening shows as NaN, never as a plausible number).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..common import outputs
from ..errors import CaptureFormatError
from .h5 import create_checked
from .tokens import Inputs

MANIFEST = "manifest.h5"
SHARD_LAST = "Shard(-1)"
_RANK_KEYS = (
    "rank",
    "local_rank",
    "local_device",
    "capture_id",
    "created_utc",
    "inputs_fingerprint",
    "inputs_source",
    "capture_seconds",
)


def capture_file(name: str) -> bool:
    """Whether a directory entry is one of a multi-rank capture's own files (manifest, rank files)."""
    return name == MANIFEST or (
        name.startswith("rank") and name.endswith(".h5") and name[4:-3].isdigit()
    )


def rank_file(rank: int) -> str:
    return f"rank{rank}.h5"


def manifest_of(path: str | os.PathLike) -> Path:
    """The manifest of a capture directory; refuses a directory without one in one line."""
    folder = Path(path)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        ranks = sorted(p.name for p in folder.glob("rank*.h5"))
        found = (
            f" (it holds {', '.join(ranks[:4])}{'…' if len(ranks) > 4 else ''})" if ranks else ""
        )
        raise CaptureFormatError(
            f"{folder} is a directory without {MANIFEST}{found}: not a finished multi-rank capture (rank 0 writes "
            "the manifest last, after every rank committed its file); capture again"
        )
    return manifest


def check_target(target: Path) -> None:
    """Refuse, before any work, an output directory that is a file or a folder of something else
    (a capture directory may be replaced; an empty folder may be filled)."""
    if target.exists() and not target.is_dir():
        raise outputs.OutputError(
            f"output {target} is an existing file: a multi-rank capture writes a directory; "
            "choose another -o"
        )
    if target.suffix == ".h5" and not target.is_dir():
        raise outputs.OutputError(
            f"output {target}: a multi-rank capture writes a directory (one file per rank and "
            f"{MANIFEST}); give a directory name such as {target.with_suffix('')}/"
        )
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise outputs.OutputError(
            f"output {target} is a non-empty directory that is not a capture; choose another "
            "-o (a multi-rank capture replaces only an earlier capture directory)"
        )
    others = (
        sorted(path.name for path in target.iterdir() if not capture_file(path.name))
        if target.is_dir()
        else []
    )
    if (target / MANIFEST).is_file() and others:
        raise outputs.OutputError(
            f"output {target} is an earlier capture directory that also holds {others[0]}"
            f"{f' and {len(others) - 1} more' if len(others) > 1 else ''}: replacing it would "
            "delete them; move them out or choose another -o"
        )
    outputs.check_outputs([], [], folders=[target])


def check_ranks(manifest: Path, meta: dict[str, Any]) -> None:
    """Every rank file the manifest lists exists, is complete, and is the very file of this run."""
    folder = manifest.parent
    ranks = json.loads(meta["rank_files"])
    for entry in ranks:
        path = folder / entry["file"]
        whole = f"a {len(ranks)}-rank capture is read only whole: copy the whole directory again or capture again"
        if not path.is_file():
            raise CaptureFormatError(
                f"{folder}: rank {entry['rank']}'s file {entry['file']} is missing; {whole}"
            )
        try:
            with h5py.File(path, "r") as handle:
                attrs = {
                    key: handle.attrs.get(key)
                    for key in ("capture_id", "run_id", "rank", "complete")
                }
        except OSError as exc:
            raise CaptureFormatError(
                f"{folder}: {entry['file']} is not a readable capture ({exc}); {whole}"
            ) from exc
        if str(attrs["capture_id"]) != entry["capture_id"] or str(attrs["run_id"]) != str(
            meta.get("run_id")
        ):
            raise CaptureFormatError(
                f"{folder}: {entry['file']} is not the file rank {entry['rank']} wrote in this run (capture id "
                f"{str(attrs['capture_id'])[:8]}…, the manifest expects {entry['capture_id'][:8]}…): it belongs to "
                f"another run; {whole}"
            )
        if not attrs["complete"]:
            raise CaptureFormatError(f"{folder}: {entry['file']} is incomplete; {whole}")


def write_manifest(
    folder: Path,
    world_size: int,
    parallel: str,
    inputs: Inputs,
    positions: np.ndarray | None,
    meta: dict[str, Any],
    rows: list[np.ndarray] | None = None,
) -> Path:
    """Write ``folder/manifest.h5`` over the committed rank files (see the module docstring).

    ``rows``: data parallel, each rank's global rows; None for tensor parallel. ``meta``: root
    attributes that replace rank 0's (capture id, times)."""
    handles = [h5py.File(folder / rank_file(rank), "r") for rank in range(world_size)]
    try:
        with outputs.atomic_output(folder / MANIFEST) as temp:
            out = outputs.open_h5(temp)
            try:
                _check_consistent(handles, inputs, rows)
                _root(out, handles, parallel, meta, rows)
                group = out.create_group("inputs")
                create_checked(group, "input_ids", data=inputs.input_ids.astype(np.int64))
                create_checked(group, "attention_mask", data=inputs.attention_mask.astype(np.int64))
                if positions is not None:
                    create_checked(group, "sample_positions", data=positions.astype(np.int64))
                if rows is not None:
                    owner = np.empty(inputs.shape[0], dtype=np.int64)
                    for rank, mine in enumerate(rows):
                        owner[mine] = rank
                    create_checked(out.require_group("parallel"), "rank_of_row", data=owner)
                for name in ("modules", "logprobs"):
                    if name in handles[0]:
                        _mirror(handles, name, out, Layout(parallel, rows, inputs.shape[0]))
                out.attrs["complete"] = True
                out.flush()
            finally:
                out.close()
    finally:
        for handle in handles:
            handle.close()
    return folder / MANIFEST


def _check_consistent(
    handles: list[h5py.File], inputs: Inputs, rows: list[np.ndarray] | None
) -> None:
    """Every rank ran the same model on its share of the same inputs (a rank given another prompt
    file or checkpoint would make a directory of unrelated pieces)."""
    for rank, handle in enumerate(handles):
        expected = inputs.input_ids if rows is None else inputs.input_ids[rows[rank]]
        if not np.array_equal(handle["inputs/input_ids"][...], expected):
            raise CaptureFormatError(
                f"rank {rank} captured other token ids than rank 0 was given for it: every rank "
                "must read the same --inputs with the same tokenizer and --max-tokens/--limit"
            )
        if handle.attrs.get("model_fingerprint") != handles[0].attrs.get("model_fingerprint"):
            raise CaptureFormatError(
                f"rank {rank} loaded other weights than rank 0 (model fingerprints differ): "
                "every rank must load the same checkpoint"
            )


def _root(
    out: h5py.File,
    handles: list[h5py.File],
    parallel: str,
    meta: dict[str, Any],
    rows: list[np.ndarray] | None,
) -> None:
    first = handles[0].attrs
    for key, value in first.items():
        if key not in _RANK_KEYS:
            out.attrs[key] = value
    entries = [
        {
            "rank": rank,
            "file": rank_file(rank),
            "capture_id": str(h.attrs["capture_id"]),
            "local_device": str(h.attrs.get("local_device", "")),
            "host": str(h.attrs.get("host", "")),
            "sequences": int(len(rows[rank]))
            if rows is not None
            else int(h["inputs/input_ids"].shape[0]),
        }
        for rank, h in enumerate(handles)
    ]
    out.attrs["rank_files"] = json.dumps(entries)
    out.attrs["devices"] = json.dumps([entry["local_device"] for entry in entries])
    out.attrs["parallel"] = parallel
    out.attrs["capture_seconds"] = max(float(h.attrs.get("capture_seconds", 0.0)) for h in handles)
    for key, value in meta.items():
        out.attrs[key] = value
    out.attrs["complete"] = False


@dataclass(frozen=True, eq=False)
class Layout:
    """How rank datasets map onto the logical one: ``parallel`` "data" (``rows``: each rank's global
    rows) or "tensor"; ``sequences`` of the whole input set."""

    parallel: str
    rows: list[np.ndarray] | None
    sequences: int


def _mirror(handles: list[h5py.File], path: str, parent: h5py.Group, layout: Layout) -> None:
    source = handles[0][path]
    group = parent.create_group(path.rsplit("/", 1)[-1])
    group.attrs.update(dict(source.attrs))
    for key in source:
        link = source.get(key, getlink=True)
        if isinstance(link, h5py.SoftLink):
            group[key] = h5py.SoftLink(link.path)
        elif isinstance(source[key], h5py.Group):
            _mirror(handles, f"{path}/{key}", group, layout)
        else:
            _dataset(handles, f"{path}/{key}", group, key, layout)


def _dataset(
    handles: list[h5py.File], path: str, group: h5py.Group, key: str, layout: Layout
) -> None:
    first = handles[0][path]
    per_row = path.startswith("logprobs/") or path.split("/")[-2].isdigit()
    if not per_row or first.ndim == 0:
        handles[0].copy(
            first, group, name=key
        )  # a norm's weight, a statistics record: the same on every rank
        return
    sources = []
    for rank, handle in enumerate(handles):
        node = handle.get(path)
        same = (
            (lambda shape: shape[1:]) if layout.parallel == "data" else (lambda shape: shape[:-1])
        )
        if node is None or same(node.shape) != same(first.shape):
            found = "nothing" if node is None else f"shape {node.shape}"
            raise CaptureFormatError(
                f"rank {rank} stored {found} at /{path} where rank 0 stored {first.shape}: the "
                "ranks recorded different modules (routed experts are not supported here)"
            )
        sources.append(node)
    sharded = str(first.attrs.get("placement", "")) == SHARD_LAST
    vds = _virtual(sources, first, layout, sharded)
    dataset = group.create_virtual_dataset(key, vds, fillvalue=_fill(first))
    dataset.attrs.update(dict(first.attrs))
    counted = sources if layout.parallel == "data" or sharded else sources[:1]
    for name in ("nan_count", "inf_count"):
        total = sum(int(node.attrs.get(name, 0)) for node in counted)
        if total:
            dataset.attrs[name] = total


def _virtual(
    sources: list[h5py.Dataset], first: h5py.Dataset, layout: Layout, sharded: bool
) -> h5py.VirtualLayout:
    def source(rank: int) -> h5py.VirtualSource:
        node = sources[rank]
        return h5py.VirtualSource(rank_file(rank), node.name, shape=node.shape, dtype=node.dtype)

    if layout.parallel == "data":
        vds = h5py.VirtualLayout(shape=(layout.sequences, *first.shape[1:]), dtype=first.dtype)
        for rank, rows in enumerate(layout.rows or []):
            for start, stop, local in _runs(rows):
                vds[start:stop] = source(rank)[local : local + stop - start]
        return vds
    if not sharded:
        vds = h5py.VirtualLayout(shape=first.shape, dtype=first.dtype)
        vds[...] = source(0)
        return vds
    width = sum(node.shape[-1] for node in sources)
    vds = h5py.VirtualLayout(shape=(*first.shape[:-1], width), dtype=first.dtype)
    offset = 0
    for rank, node in enumerate(sources):
        index = (slice(None),) * (first.ndim - 1) + (slice(offset, offset + node.shape[-1]),)
        vds[index] = source(rank)
        offset += node.shape[-1]
    return vds


def _runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """(global start, global stop, local start) of each run of consecutive global rows."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return [(int(rows[a]), int(rows[b - 1]) + 1, int(a)) for a, b in zip(starts, stops)]


def _fill(dataset: h5py.Dataset) -> Any:
    """NaN where a source could ever be missing (bfloat16 bits 0x7FC0): never a plausible number."""
    if dataset.dtype.kind == "f":
        return np.nan
    if dataset.dtype == np.uint16 and str(dataset.attrs.get("dtype", "")) == "bfloat16":
        return 0x7FC0
    return 0
