"""Verifying a file: :func:`verify_file` reads every dataset of a capture (or a diff.h5, or a
multi-rank directory) and reports each failed checksum and each changed NaN/Inf count by name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py

from ..errors import CorruptDataError
from . import ranks
from .format import SLOTS, nonfinite_counts
from .h5 import _h5_reason, _open_h5, read_checked
from .reader import open_capture, plan_blocks


@dataclass(frozen=True)
class Verification:
    """What :func:`verify_file` found: datasets read, and ``(dataset, problem)`` for each damaged one."""

    path: Path
    datasets: int
    problems: tuple[tuple[str, str], ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        lines = [f"damaged  {name}: {problem}" for name, problem in self.problems]
        state = "every checksum holds" if self.ok else f"{len(self.problems)} damaged"
        return "\n".join([*lines, f"verified {self.path}: {self.datasets} datasets read, {state}"])


def verify_file(path: str | os.PathLike, *, block_elements: int = 1 << 22) -> Verification:
    """Read every dataset of an HDF5 file (a capture or a diff.h5) and check its checksum; for a
    capture also that no activation holds other NaN/Inf counts than recorded when it was written.
    A multi-rank capture directory: its manifest and every rank file (each dataset read once)."""
    if Path(path).is_dir():
        return _verify_directory(Path(path), block_elements)
    handle = _open_h5(Path(path))
    problems: list[tuple[str, str]] = []
    try:
        names: list[str] = []
        handle.visititems(
            lambda name, node: names.append(name) if isinstance(node, h5py.Dataset) else None
        )
        names = [
            name for name in names if not handle[name].is_virtual
        ]  # read through their rank files
        for name in names:
            problem = _verify_dataset(handle[name], block_elements)
            if problem:
                problems.append(("/" + name, problem))
    finally:
        handle.close()
    return Verification(Path(path), len(names), tuple(problems))


def _verify_directory(folder: Path, block_elements: int) -> Verification:
    manifest = ranks.manifest_of(folder)
    with open_capture(folder) as cap:  # refuses a missing or foreign rank file
        files = [manifest] + [
            folder / entry["file"] for entry in json.loads(cap.meta["rank_files"])
        ]
    datasets, problems = 0, []
    for file in files:
        found = verify_file(file, block_elements=block_elements)
        datasets += found.datasets
        problems += [(f"{file.name}:{name}", problem) for name, problem in found.problems]
    return Verification(folder, datasets, tuple(problems))


def _verify_dataset(dataset: h5py.Dataset, block_elements: int) -> str | None:
    counted = [0, 0]
    dtype = str(dataset.attrs.get("dtype", ""))
    try:
        for index in plan_blocks(tuple(dataset.shape), block_elements) if dataset.shape else [()]:
            block = read_checked(dataset, index)
            if dtype and dataset.dtype.kind in "fu":
                nan, inf = nonfinite_counts(block, dtype)
                counted[0] += nan
                counted[1] += inf
    except CorruptDataError as exc:
        return (
            "crc32 mismatch"
            if "crc32" in str(exc)
            else _h5_reason(exc.__cause__)
            if exc.__cause__
            else str(exc)
        )
    recorded = (int(dataset.attrs.get("nan_count", 0)), int(dataset.attrs.get("inf_count", 0)))
    if dtype and tuple(counted) != recorded and dataset.name.split("/")[-1] in SLOTS:
        return (
            f"holds {counted[0]} NaN and {counted[1]} Inf, but {recorded[0]} NaN and {recorded[1]} Inf were "
            "recorded when it was written: its values were changed afterwards"
        )
    return None
