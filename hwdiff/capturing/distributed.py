"""Capture under ``torch.distributed``: ranks, the data- and tensor-parallel split, and the run directory.

Every rank of a process group writes its own capture file (``rankR.h5``) into one directory; rank 0
writes the manifest last (:mod:`hwdiff.store.ranks`), once every rank has committed its file, and
renames the directory into place. A run that fails or loses a rank leaves no directory a reader
accepts, and an earlier capture at that path is left as it was (:mod:`hwdiff.common.outputs`).

- Data parallel (the default): rank ``r`` of ``N`` takes batches ``r, r + N, …`` of the inputs, so
  every batch is computed exactly as in one process.
- Tensor parallel (:func:`tensor_parallel`): q/k/v/gate/up column-wise, o/down row-wise with
  ``torch.distributed.tensor.parallel``; every rank runs every batch and stores its shard of the
  column-parallel outputs (attribute ``placement = "Shard(-1)"``); replicated outputs are read from rank 0.

The ranks meet through the process group's key-value store and poll it from Python, so a rank that
waits for a dead peer still answers SIGTERM (torchrun's way of stopping the others) at once.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..common import outputs
from ..errors import HwdiffError
from ..store.ranks import (  # the ``placement`` attribute of a column-parallel output's datasets
    SHARD_LAST,
    check_target,
)
from .inputs import Inputs

log = logging.getLogger(__name__)

COLWISE = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
)
ROWWISE = ("self_attn.o_proj", "mlp.down_proj")
BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
WAIT_SECONDS = (
    1800.0  # how long a rank waits for the others at the end of a run (torch's default timeout)
)
_SHARDED: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, str]]" = weakref.WeakKeyDictionary()
_runs = [
    0
]  # captures started by this process: the same sequence on every rank names each run's keys


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the process group (recorded in its capture file)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    def meta(self, parallel: str, device: torch.device) -> dict[str, Any]:
        """Root attributes of this rank's capture file."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "local_rank": self.local_rank,
            "process_group_backend": self.backend,
            "local_device": str(device),
            "parallel": parallel,
        }


def rank_info() -> RankInfo | None:
    """This process's rank, when it belongs to an initialised process group of more than one rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return RankInfo(dist.get_rank(), dist.get_world_size(), local, str(dist.get_backend()))


def init_from_env(device: str) -> str:
    """Under torchrun (``WORLD_SIZE`` > 1 in the environment): initialise the default process group
    from the environment, with gloo on the CPU, nccl on CUDA and hccl on Ascend, and return this
    rank's device (``cuda`` / ``npu`` / ``auto`` become index ``LOCAL_RANK``). Else ``device`` as given."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return device
    import torch.distributed as dist

    from .devices import resolve_device

    local = int(os.environ.get("LOCAL_RANK", "0"))
    spec = device.strip().lower()
    kind = resolve_device(spec).type if spec == "auto" else spec.split(":")[0]
    if kind in ("cuda", "npu") and ":" not in spec:
        spec = f"{kind}:{local}"
    chosen = resolve_device(spec)
    if chosen.type != "cpu":
        getattr(torch, chosen.type).set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group(BACKENDS.get(chosen.type, "gloo"))
    return str(chosen)


def close() -> None:
    """Destroy the default process group if this module's caller initialised one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- tensor parallel ------------------------------------------------------------------------------
def tensor_parallel(model: torch.nn.Module, size: int) -> torch.nn.Module:
    """Shard a Qwen2/Llama-layout model over ``size`` ranks (the whole default process group):
    q/k/v/gate/up column-wise, o/down row-wise. Returns the model, sharded in place.

    Refuses models without that layout, head or width counts ``size`` does not divide, and a
    ``size`` other than the world size (data and tensor parallel together are not supported).
    """
    info = rank_info()
    world = 1 if info is None else info.world_size
    if size != world:
        raise HwdiffError(
            f"--tp {size} needs exactly {size} ranks (torchrun --nproc_per_node {size}); this process "
            f"group has {world} (data and tensor parallel together are not supported)"
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    layers = _decoder_layers(model)
    _check_divisible(model, size)
    plan: dict[str, Any] = {}
    for prefix in layers:
        plan.update({f"{prefix}.{name}": ColwiseParallel() for name in COLWISE})
        plan.update({f"{prefix}.{name}": RowwiseParallel() for name in ROWWISE})
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (size,))
    for name, style in plan.items():
        parallelize_module(model.get_submodule(name), mesh, style)
    sharded = {f"{prefix}.{name}": SHARD_LAST for prefix in layers for name in COLWISE}
    # the activation between the column- and the row-parallel halves of the MLP sees only its shard too
    sharded.update(
        {
            f"{prefix}.mlp.act_fn": SHARD_LAST
            for prefix in layers
            if isinstance(
                getattr(model.get_submodule(f"{prefix}.mlp"), "act_fn", None), torch.nn.Module
            )
        }
    )
    _SHARDED[model] = sharded
    return model


def sharded_outputs(model: torch.nn.Module) -> dict[str, str]:
    """Module name → placement of the modules whose outputs are shards (empty unless tensor parallel)."""
    return dict(_SHARDED.get(model, {}))


def _decoder_layers(model: torch.nn.Module) -> list[str]:
    names = dict(model.named_modules())
    layers = [
        name for name in names if all(f"{name}.{part}" in names for part in (*COLWISE, *ROWWISE))
    ]
    if not layers:
        raise HwdiffError(
            f"{type(model).__name__} has no decoder layer with self_attn.q/k/v/o_proj and "
            "mlp.gate/up/down_proj: --tp supports the Qwen2/Llama layout only"
        )
    return layers


def _check_divisible(model: torch.nn.Module, size: int) -> None:
    config = getattr(model, "config", None)
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value % size:
            raise HwdiffError(
                f"--tp {size} does not divide the model's {key} ({value}); choose a divisor"
            )


# -- data parallel ------------------------------------------------------------------------------
def batch_rows(sequences: int, batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """Global rows of rank ``rank``: whole batches ``rank, rank + world_size, …`` (int64, in order)."""
    starts = range(rank * batch_size, sequences, world_size * batch_size)
    rows = [np.arange(start, min(start + batch_size, sequences)) for start in starts]
    if not rows:
        batches = -(-sequences // batch_size)
        raise HwdiffError(
            f"{sequences} sequences make {batches} batch(es) of {batch_size} for {world_size} ranks: "
            "every rank needs at least one; use a smaller --batch-size or fewer ranks"
        )
    return np.concatenate(rows).astype(np.int64)


def rank_inputs(inputs: Inputs, rows: np.ndarray) -> Inputs:
    """The rows of ``inputs`` one data-parallel rank computes (same width, so batches are unchanged)."""
    return Inputs(inputs.input_ids[rows], inputs.attention_mask[rows], source=inputs.source)


# -- the run directory ----------------------------------------------------------------------------
class RankRun:
    """One multi-rank capture run: the temporary directory every rank writes into, and its completion.

    ``start`` (every rank, collectively): rank 0 creates the temporary directory and a run id and
    hands both to the others. ``finish``: every rank reports its committed file; rank 0 waits for all,
    writes the manifest and renames the directory onto the target; the others wait for that.
    ``abort``: a rank reports its failure; rank 0 removes the temporary directory.
    """

    def __init__(
        self, target: Path, info: RankInfo, temp: Path, run_id: str, key: str, store: Any
    ) -> None:
        self.target, self.info, self.temp, self.run_id = target, info, temp, run_id
        self._key, self._store = key, store

    @classmethod
    def start(cls, target: str | os.PathLike, info: RankInfo) -> "RankRun":
        target = Path(target)
        check_target(target)
        store, key = _default_store(), f"hwdiff/capture/{_runs[0]}"
        _runs[0] += 1
        if info.rank == 0:
            temp = outputs.temporary(target)
            temp.mkdir()
            value = json.dumps({"temp": str(temp.resolve()), "run_id": uuid.uuid4().hex})
            store.set(f"{key}/start", value)
        else:
            _wait(store, [f"{key}/start"], "rank 0 to create the run directory")
            value = store.get(f"{key}/start").decode()
        start = json.loads(value)
        return cls(target, info, Path(start["temp"]), start["run_id"], key, store)

    @property
    def rank_file(self) -> Path:
        return self.temp / f"rank{self.info.rank}.h5"

    def finish(self, write_manifest: Any) -> Path:
        """Report this rank's file; rank 0 calls ``write_manifest(temp_dir)`` once every rank
        reported, then commits the directory. Returns the final directory on every rank."""
        self._store.set(f"{self._key}/done/{self.info.rank}", "ok")
        if self.info.rank == 0:
            states = self._gather()
            failed = [f"rank {rank}: {state}" for rank, state in enumerate(states) if state != "ok"]
            if failed:
                self._store.set(f"{self._key}/committed", "failed")
                raise HwdiffError(
                    f"{len(failed)} rank(s) failed ({failed[0]}); nothing was written to {self.target}"
                )
            try:
                write_manifest(self.temp)
                outputs.commit_dir(self.temp, self.target)
            except BaseException:
                self._store.set(f"{self._key}/committed", "failed")
                raise
            self._store.set(f"{self._key}/committed", "ok")
            return self.target
        _wait(self._store, [f"{self._key}/committed"], "rank 0 to write the manifest")
        if self._store.get(f"{self._key}/committed").decode() != "ok":
            raise HwdiffError(f"rank 0 could not complete {self.target}; nothing was written")
        return self.target

    def abort(self, why: BaseException) -> None:
        """Tell the other ranks this one failed; rank 0 removes the temporary directory."""
        try:
            self._store.set(
                f"{self._key}/done/{self.info.rank}", f"{type(why).__name__}: {why}"[:500]
            )
            if self.info.rank == 0:
                self._store.set(f"{self._key}/committed", "failed")
        except (
            Exception
        ):  # the store may be gone with a dead rank 0: the directory stays unaccepted anyway
            log.debug("could not report the failure of rank %d", self.info.rank)
        if self.info.rank == 0:
            outputs.discard(self.temp)

    def _gather(self) -> list[str]:
        keys = [f"{self._key}/done/{rank}" for rank in range(self.info.world_size)]
        _wait(self._store, keys, "every rank to finish its capture file")
        return [self._store.get(key).decode() for key in keys]


def _default_store() -> Any:
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _wait(store: Any, keys: list[str], what: str, timeout: float = WAIT_SECONDS) -> None:
    """Poll ``store`` until every key exists, from Python so that SIGTERM interrupts the wait."""
    deadline = time.monotonic() + timeout
    while not store.check(keys):
        if time.monotonic() > deadline:
            raise HwdiffError(
                f"waited {timeout:.0f} s for {what}: a rank is stuck or gone; nothing was written"
            )
        time.sleep(0.05)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
