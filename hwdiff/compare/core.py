"""``hwdiff.diff``: compare two captures (and optionally each against a golden) slot by slot."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..common import outputs
from ..errors import HwdiffError
from ..store.reader import Capture, open_capture, plan_blocks
from .align import Pair, Unmatched, align, check_comparable
from .correlation import correlate, residual_positions
from .divergence import (
    _growth,
    first_difference,
    first_divergence,
    with_budgets,
    with_local_budgets,
)
from .fit import fit_both
from .metrics import Accumulator, UlpStats, ulp_distance, unit_roundoff
from .results import (
    DiffResult,
    GoldenDiff,
    LayerDiff,
    LocalDiff,
)
from .rl import rl_for
from .routing import _nothing_routed, _routed_mask, _token_mask, compare_routing
from .verdict import BUDGET_ROUNDINGS, judge

_META_KEYS = (
    "device",
    "device_name",
    "dtype",
    "torch_version",
    "model_spec",
    "model_fingerprint",
    "inputs_fingerprint",
    "attn_implementation",
    "mode",
    "hwdiff_version",
    "created_utc",
    "cuda_version",
    "cudnn_version",
    "driver_version",
    "torch_npu_version",
    "cann_version",
    "cuda_matmul_allow_tf32",
    "cudnn_allow_tf32",
    "npu_matmul_allow_hf32",
    "deterministic_algorithms",
    "cpu_threads",
    "emulate",
    "replay_of",
    "layout",
    "layout_map",
    "dataflow",
)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiffOptions:
    """``fit_samples``: at most this many elements per slot (a seeded sample) for the fits and the
    divergence rule; ``block_elements``: elements read per block (bounds memory)."""

    fit_samples: int = 20_000
    seed: int = 0
    strict: bool = False
    allow_model_mismatch: bool = False
    allow_any_local: bool = False
    block_elements: int = 1 << 20
    progress: bool = True
    layout_map: str | None = None  # a layout mapping (:mod:`.layouts`): built-in name or YAML file


def diff(
    reference: str | os.PathLike | Capture,
    target: str | os.PathLike | Capture,
    out: str | os.PathLike | None = None,
    golden: str | os.PathLike | Capture | None = None,
    *,
    local: str | os.PathLike | Capture | None = None,
    json_path: str | os.PathLike | None = None,
    csv_path: str | os.PathLike | None = None,
    **options: Any,
) -> DiffResult:
    """Compare ``target`` against ``reference`` module by module; see docs/diff.md for every metric.

    ``golden`` (a third capture, e.g. CPU float32) adds each side's error against it. ``local`` (a
    replay of the reference's inputs on the target's device, :func:`hwdiff.replay`) adds each module's
    local error, the propagated part and the amplification (:class:`LocalDiff`). ``out`` writes
    diff.h5 (everything, histograms included), ``json_path`` the summary (schema
    ``hwdiff/diff-summary/1``), ``csv_path`` a flat table; each is written atomically. ``options``
    are the fields of :class:`DiffOptions`. An output that is the same file as an input or as another
    output is refused before anything is read; ``local`` must be a replay of ``reference`` unless
    ``allow_any_local``.
    """
    from .output import nonfinite_warning, rl_csv_path, write_outputs

    opts = DiffOptions(**options)
    rl_csv = rl_csv_path(csv_path) if csv_path is not None else None  # written beside --csv
    outputs.check_outputs((reference, target, golden, local), (out, json_path, csv_path, rl_csv))
    with _Opened(reference, target, golden, local) as (ref, tgt, gold, loc):
        if ref is None or tgt is None:
            raise HwdiffError("diff needs a reference and a target capture; one of them is None")
        if opts.layout_map is not None:
            ref, tgt = _mapped(ref, tgt, gold, loc, opts.layout_map, opts.allow_model_mismatch)
        elif {str(ref.meta.get("layout", "")), str(tgt.meta.get("layout", ""))} == {"", "vllm"}:
            vllm = ref if ref.meta.get("layout") == "vllm" else tgt
            raise HwdiffError(
                f"{vllm.path} was captured in vLLM's module layout and the other capture was not: "
                "compare them with --map vllm (layout_map='vllm')"
            )
        check_comparable(
            ref, tgt, allow_model_mismatch=opts.allow_model_mismatch or opts.layout_map is not None
        )
        if ref.is_generation:
            raise HwdiffError(
                "these are greedy generation files: compare them with "
                "hwdiff.compare.generation.diff_generations (the CLI's diff does so itself)"
            )
        for extra, role in ((gold, "golden"), (loc, "local")):
            if extra is not None:
                check_comparable(
                    ref, extra, allow_model_mismatch=opts.allow_model_mismatch, role=role
                )
        if loc is not None and not opts.allow_any_local:
            check_replay_of(ref, loc)
        result = _compare(ref, tgt, gold, loc, opts)
        rl, absent = rl_for(ref, tgt)
        result = dataclasses.replace(result, rl_impact=rl, rl_absent=absent)
    warning = nonfinite_warning(result)
    if warning:
        log.warning("%s", warning)
    write_outputs(result, out=out, json_path=json_path, csv_path=csv_path)
    return result


def _mapped(
    ref: Capture,
    tgt: Capture,
    gold: Capture | None,
    loc: Capture | None,
    layout_map: str,
    allow_model_mismatch: bool,
) -> tuple:
    """Both captures read through the layout mapping; the same weights checked by the norm weights
    both store, since across layouts the model fingerprints differ by construction."""
    from .layouts import check_same_weights, map_captures

    if gold is not None or loc is not None:
        raise HwdiffError(
            "--map compares two captures of different layouts; --golden and --local are not "
            "supported with it (diff each layout's captures without --map)"
        )
    mapped_ref, mapped_tgt = map_captures(ref, tgt, layout_map)
    if not allow_model_mismatch:
        check_same_weights(mapped_ref, mapped_tgt)
    return mapped_ref, mapped_tgt


def check_replay_of(ref: Capture, loc: Capture) -> None:
    """Refuse a ``--local`` capture that is not a replay of ``ref`` (a replay records the capture id
    of its reference; files written before ids existed are matched by the reference's device and dtype)."""
    hint = "make it with `hwdiff replay REFERENCE -o LOCAL`, or pass --allow-any-local (allow_any_local=True)"
    meta = loc.meta
    if not meta.get("replay_of"):
        raise HwdiffError(
            f"--local {loc.path} is not a replay (it was written by a capture, not by hwdiff replay); {hint}"
        )
    mine, theirs = ref.meta.get("capture_id"), meta.get("replay_of_id")
    if mine and theirs:
        if mine != theirs:
            raise HwdiffError(
                f"--local {loc.path} is a replay of another capture ({meta['replay_of']}), not of "
                f"{ref.path} (capture ids {str(theirs)[:8]}… and {str(mine)[:8]}…); {hint}"
            )
        return
    for key in ("device", "dtype"):
        if str(meta.get(f"replay_of_{key}")) != str(ref.meta.get(key)):
            raise HwdiffError(
                f"--local {loc.path} replays a capture of {key} {meta.get(f'replay_of_{key}')}, but "
                f"{ref.path} has {key} {ref.meta.get(key)}; {hint}"
            )


def _compare(
    ref: Capture, tgt: Capture, gold: Capture | None, loc: Capture | None, opts: DiffOptions
) -> DiffResult:
    from tqdm.auto import tqdm

    pairs, unmatched = align(ref, tgt)
    routing = tuple(compare_routing(ref, tgt, pair) for pair in pairs if pair.slot == "routing")
    pairs = [pair for pair in pairs if pair.slot != "routing"]
    if opts.strict and unmatched:
        first = unmatched[0]
        raise HwdiffError(
            f"{len(unmatched)} slot(s) could not be compared (--strict), first "
            f"{first.name}/{first.call}/{first.slot}: {first.reason}"
        )
    mask = ref.attention_mask.astype(bool) if ref.mode == "full" else None
    if ref.mode == "sample":
        sample_positions = ref.sample_positions
        # check_comparable refused a sample capture without them
        assert sample_positions is not None
        mask = np.ones(sample_positions.shape, dtype=bool)
    empty = [pair for pair in pairs if _nothing_routed(ref, tgt, pair, mask)]
    unmatched += [
        Unmatched(
            p.name,
            p.call,
            p.slot,
            "no real token was routed to this expert on both sides (empty "
            "calls): nothing to compare",
        )
        for p in empty
    ]
    pairs = [pair for pair in pairs if pair not in empty]
    layers: dict[tuple[str, int, str], LayerDiff] = {}
    arrays: dict[str, Any] = {}
    pending: dict[tuple[str, int, str], Future] = {}
    aliases: list[tuple[Pair, tuple[str, int, str], Any]] = []
    # The fits of finished slots run on worker threads while the next slots are read and reduced (one
    # worker on two cores: the Student-t EM releases the GIL, and measured on workload A's pair that is
    # 1.95 s against 2.5 s inline), and with cores to spare the next block is read while one is
    # reduced. Each fit is deterministic: the results do not depend on any of this.
    fit_workers, read_ahead = _helpers()
    with (
        _executor(fit_workers, "hwdiff-fit") as fitter,
        _executor(read_ahead, "hwdiff-read") as reader,
    ):
        try:
            for pair in tqdm(
                pairs, desc="diff", unit="slot", disable=not opts.progress, leave=False
            ):
                alias = _alias_key(pair)
                if alias in pending:
                    aliases.append((pair, alias, _local_only(ref, loc, pair, mask, opts)))
                    continue
                pending[(pair.name, pair.call, pair.slot)] = _compare_pair(
                    ref, tgt, gold, loc, pair, mask, opts, fitter, reader
                )
            for key, future in pending.items():
                layers[key], arrays["/".join(map(str, key))] = future.result()
        except BaseException:  # an error or Ctrl-C: drop the queued fits instead of finishing them
            fitter.shutdown(cancel_futures=True)
            raise
    for pair, alias, local_acc in aliases:
        target = layers[alias]
        local = None if local_acc is None else _local_diff(pair, local_acc, target.metrics.rel_l2)
        layers[(pair.name, pair.call, pair.slot)] = dataclasses.replace(
            target,
            name=pair.name,
            call=pair.call,
            slot=pair.slot,
            kind=pair.kind,
            alias_of=pair.alias_of,
            local=local,
        )
    positions = residual_positions(pairs)
    correlation = correlate(ref, tgt, positions, mask, opts.block_elements) if positions else None
    ordered = with_local_budgets(
        with_budgets(_with_inputs(tuple(layers[(p.name, p.call, p.slot)] for p in pairs)))
    )
    return DiffResult(
        reference=_meta(ref),
        target=_meta(tgt),
        golden=_meta(gold) if gold is not None else None,
        layers=ordered,
        unmatched=tuple(unmatched),
        correlation=correlation,
        growth=_growth(ordered, positions),
        first_divergence=first_divergence(ordered),
        first_difference=first_difference(ordered),
        arrays=arrays,
        local=_meta(loc) if loc is not None else None,
        routing=routing,
    )


def _alias_key(pair: Pair) -> tuple[str, int, str] | None:
    if not pair.alias_of:
        return None
    name, call, slot = pair.alias_of.rsplit("/", 2)
    return (name, int(call), slot)


def _origin(index: tuple[slice, ...]) -> tuple[int, ...]:
    """The first index of a block."""
    return tuple(item.start or 0 for item in index)


def _sampling(
    pair: Pair, mask: np.ndarray | None, token_mask: np.ndarray | None, opts: DiffOptions
) -> tuple[float, int]:
    """(fraction of the slot's real elements kept in the fit sample, the slot's sampling seed)."""
    expected = (
        (int(token_mask.sum()) * int(np.prod(pair.shape[token_mask.ndim :])))
        if token_mask is not None
        else int(np.prod(pair.shape))
    )
    return min(1.0, opts.fit_samples / max(expected, 1)), opts.seed + sum(
        map(ord, f"{pair.name}/{pair.call}/{pair.slot}")
    )


def _blocks(pair: Pair, token_mask: np.ndarray | None, opts: DiffOptions):
    """(index, mask of that block or None) over the slot, in the order every reader uses."""
    for index in plan_blocks(pair.shape, opts.block_elements):
        yield (
            index,
            None
            if token_mask is None
            else token_mask[index[0], index[1] if len(index) > 1 else slice(None)],
        )


def _compare_pair(
    ref: Capture,
    tgt: Capture,
    gold: Capture | None,
    loc: Capture | None,
    pair: Pair,
    mask: np.ndarray | None,
    opts: DiffOptions,
    fitter: ThreadPoolExecutor,
    reader: ThreadPoolExecutor,
) -> Future:
    """Stream the slot's blocks through the accumulators here; the fits and the rest of the
    :class:`LayerDiff` (a future of it and its arrays) are finished on ``fitter``; ``reader`` reads
    the next block while this one is reduced."""
    token_mask = _routed_mask(ref, tgt, pair, _token_mask(pair, mask))
    fraction, seed = _sampling(pair, mask, token_mask, opts)
    acc = Accumulator(pair.ref_dtype, pair.target_dtype, sample_fraction=fraction, seed=seed)
    golden_accs = _side_accumulators(gold, pair, ("ref", "target"))
    local_accs = (
        _side_accumulators(loc, pair, ("local",), fraction, seed) if pair.slot == "output" else []
    )
    sources = (
        [ref, tgt]
        + ([gold] if gold is not None and golden_accs else [])
        + ([loc] if loc is not None and local_accs else [])
    )
    stored = acc.fused  # the compiled kernel decodes bfloat16 bits itself, in the same pass

    def read(index: tuple[slice, ...]) -> list[np.ndarray]:
        return [
            source.read(pair.name, pair.call, pair.slot, index, stored=stored) for source in sources
        ]

    for index, block_mask, (r, t, *extra) in _prefetched(
        _blocks(pair, token_mask, opts), read, reader
    ):
        acc.update(r, t, block_mask, _origin(index))
        if golden_accs:
            golden_accs[0].update(extra[0], r, block_mask)
            golden_accs[1].update(extra[0], t, block_mask)
        if local_accs:
            local_accs[0].update(r, extra[-1], block_mask, _origin(index))
    golden = (
        GoldenDiff(golden_accs[0].metrics().rel_l2, golden_accs[1].metrics().rel_l2)
        if golden_accs
        else None
    )
    local = local_accs[0] if local_accs else None
    return fitter.submit(_finish_pair, pair, acc, golden, local, _weight_rms(ref, pair))


def _finish_pair(
    pair: Pair,
    acc: Accumulator,
    golden: GoldenDiff | None,
    local: Accumulator | None,
    weight_rms: float | None,
) -> tuple[LayerDiff, dict[str, np.ndarray]]:
    """The fits, the divergence rule and the arrays of a slot whose blocks are all reduced (no file access)."""
    metrics = acc.metrics()
    sample_r, sample_t = acc.sample()
    errors = sample_t - sample_r
    layer = LayerDiff(
        name=pair.name,
        call=pair.call,
        slot=pair.slot,
        kind=pair.kind,
        shape=pair.shape,
        ref_dtype=pair.ref_dtype,
        target_dtype=pair.target_dtype,
        metrics=metrics,
        fit=fit_both(sample_r, sample_t, exact=metrics.exact),
        verdict=judge(metrics, sample_r, sample_t, pair.ref_dtype, pair.target_dtype),
        golden=golden,
        local=None if local is None else _local_diff(pair, local, metrics.rel_l2),
        weight_rms=weight_rms,
        ulp_fine=_ulp_fine(pair, sample_r, sample_t),
    )
    return layer, _layer_arrays(acc, errors)


def _local_diff(pair: Pair, local: Accumulator, total_rel_l2: float) -> LocalDiff:
    """The local error of a slot and whether it alone is beyond rounding (its own roundings only)."""
    metrics = local.metrics()
    sample_r, sample_l = local.sample()
    verdict = judge(
        metrics, sample_r, sample_l, pair.ref_dtype, pair.target_dtype, budget=BUDGET_ROUNDINGS
    )
    return LocalDiff(
        metrics.rel_l2,
        total_rel_l2,
        math.nan,
        verdict=verdict,
        exact=metrics.exact or not metrics.numel,
    )


def _ulp_fine(pair: Pair, r: np.ndarray, t: np.ndarray) -> UlpStats | None:
    """Different dtypes: the ULP distance in the finer one, over the fit sample."""
    if unit_roundoff(pair.ref_dtype) == unit_roundoff(pair.target_dtype) or not r.size:
        return None
    finer = (
        pair.ref_dtype
        if unit_roundoff(pair.ref_dtype) < unit_roundoff(pair.target_dtype)
        else pair.target_dtype
    )
    u = ulp_distance(r, t, pair.ref_dtype, pair.target_dtype, finer)
    return UlpStats(
        p50=float(np.median(u)),
        p99=float(np.quantile(u, 0.99)),
        max=float(u.max()),
        le1_frac=float(np.mean(u <= 1)),
    )


def _helpers() -> tuple[int, int]:
    """(fit worker threads, read-ahead threads) for this machine; HWDIFF_DIFF_THREADS="F,R" overrides."""
    override = os.environ.get("HWDIFF_DIFF_THREADS")
    if override:
        try:
            fits, reads = (int(part) for part in override.split(","))
        except ValueError:
            raise HwdiffError(
                f"HWDIFF_DIFF_THREADS={override!r}: expected two counts, fit threads and read-ahead "
                "threads, such as 1,0"
            ) from None
        return max(0, fits), max(0, reads)
    cores = os.cpu_count() or 1
    spare = cores - 2
    return max(1 if cores >= 2 else 0, min(4, spare)), 1 if spare > 0 else 0


class _Inline:
    """A stand-in executor that runs each task at once, in the calling thread."""

    def __enter__(self) -> "_Inline":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # delivered by result(), as a thread pool would
            future.set_exception(error)
        return future

    def shutdown(self, **_: object) -> None:
        return None


def _executor(workers: int, name: str):
    return (
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        if workers > 0
        else _Inline()
    )


def _prefetched(blocks, read, reader: ThreadPoolExecutor):
    """(index, block mask, what ``read`` returns for the block) over ``blocks`` (index, mask), the next
    block read on ``reader`` while the caller works on this one (one block ahead: memory stays bounded)."""
    upcoming = None
    for index, block_mask in blocks:
        current, upcoming = upcoming, (index, block_mask, reader.submit(read, index))
        if current is not None:
            yield current[0], current[1], current[2].result()
    if upcoming is not None:
        yield upcoming[0], upcoming[1], upcoming[2].result()


def _weight_rms(ref: Capture, pair: Pair) -> float | None:
    if pair.slot != "output" or not ref.modules[pair.name].has_weight:
        return None
    stored = ref.weight(pair.name)
    if stored is None:  # listed with a weight it does not store: no rms to give
        return None
    weight = stored.astype(np.float64) + ref.modules[pair.name].weight_offset  # effective scale
    return float(np.sqrt(np.mean(weight * weight)))


def _local_only(
    ref: Capture, loc: Capture | None, pair: Pair, mask: np.ndarray | None, opts: DiffOptions
) -> Accumulator | None:
    """The local error of a slot whose other numbers are shared with the slot it links to: a
    replay runs each module by itself, so a parent's local output is not its child's."""
    token_mask = _token_mask(pair, mask)
    accs = (
        _side_accumulators(loc, pair, ("local",), *_sampling(pair, mask, token_mask, opts))
        if pair.slot == "output"
        else []
    )
    if not accs or loc is None:
        return None
    for index, block_mask in _blocks(pair, token_mask, opts):
        accs[0].update(
            ref.read(pair.name, pair.call, pair.slot, index),
            loc.read(pair.name, pair.call, pair.slot, index),
            block_mask,
            _origin(index),
        )
    return accs[0]


def _side_accumulators(
    extra: Capture | None,
    pair: Pair,
    sides: tuple[str, ...],
    sample_fraction: float = 0.0,
    seed: int = 0,
) -> list[Accumulator]:
    """Light accumulators against a third capture (golden or local) that has this slot, else [];
    ``sample_fraction`` > 0 keeps a sample (for the local error's verdict)."""
    if extra is None:
        return []
    info = extra.modules.get(pair.name)
    if info is None or pair.slot not in info.slots or pair.call >= info.calls:
        return []
    shape, dtype = extra.slot_info(pair.name, pair.call, pair.slot)
    if shape != pair.shape:
        return []
    return [
        Accumulator(dtype, dtype, sample_fraction=sample_fraction, seed=seed, light=True)
        for _ in sides
    ]


def _with_inputs(layers: tuple[LayerDiff, ...]) -> tuple[LayerDiff, ...]:
    """Give each output's LocalDiff the error of the module's recorded input (for the amplification)."""
    inputs = {
        (layer.name, layer.call): layer.metrics.rel_l2 for layer in layers if layer.slot == "input"
    }
    return tuple(
        dataclasses.replace(
            layer,
            local=dataclasses.replace(
                layer.local, input_rel_l2=inputs.get((layer.name, layer.call), math.nan)
            ),
        )
        if layer.local is not None
        else layer
        for layer in layers
    )


def _layer_arrays(acc: Accumulator, errors: np.ndarray) -> dict[str, np.ndarray]:
    differing = errors[errors != 0]
    spread = float(np.std(differing)) if differing.size else 0.0
    edges = np.linspace(-6 * spread, 6 * spread, 122) if spread else np.array([-1.0, 1.0])
    counts, _ = np.histogram(errors, bins=edges)
    rng = np.random.Generator(np.random.PCG64(0))
    keep: np.ndarray | list[int] = (
        rng.choice(errors.size, size=min(4096, errors.size), replace=False) if errors.size else []
    )
    return {
        "ulp_hist": acc.hist.copy(),
        "err_hist": counts,
        "err_edges": edges,
        "err_sample": errors[np.sort(keep)].astype(np.float32),
        "token_norms": np.concatenate(acc.token_norms).astype(np.float32)
        if acc.token_norms
        else np.zeros(0),
    }


def _meta(cap: Capture) -> dict[str, Any]:
    meta = {key: cap.meta[key] for key in _META_KEYS if key in cap.meta}
    meta["path"] = str(cap.path)
    return meta


class _Opened:
    """Open what was given as a path; leave Capture objects the caller opened alone."""

    def __init__(self, *items: Any) -> None:
        self.items = items
        self.owned: list[Capture] = []

    def __enter__(self) -> list[Capture | None]:
        opened = []
        try:
            for item in self.items:
                if item is None or isinstance(item, Capture):
                    opened.append(item)
                else:
                    cap = open_capture(item)
                    self.owned.append(cap)
                    opened.append(cap)
        except BaseException:
            self.__exit__()
            raise
        return opened

    def __exit__(self, *exc: object) -> None:
        for cap in self.owned:
            cap.close()


__all__ = ["DiffOptions", "diff", "first_difference", "first_divergence"]
