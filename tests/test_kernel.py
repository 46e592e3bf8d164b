"""The compiled one-pass diff kernel against the numpy reference path (hwdiff.compare.kernel)."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import hwdiff
from hwdiff.common import jit
from hwdiff.compare.metrics import Accumulator, ulp_distance

from .conftest import ROOT

pytestmark = pytest.mark.skipif(
    not jit.available(), reason=f"compiled kernel unavailable: {jit.why_unavailable()}"
)


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round to bfloat16 (nearest even) and widen back to float32, as captures store it."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).bfloat16().float().numpy()


def _hard_pair(shape, seed=0):
    """r, t float32 with every case the metrics treat specially: exact and ±0 ties, zeros in r,
    subnormals, NaN/Inf on either side, ULP distances from 1 to far beyond the exact-count range."""
    rng = np.random.default_rng(seed)
    r = rng.standard_normal(shape).astype(np.float32)
    scale = rng.choice([0.0, 1e-7, 1e-5, 1e-3, 1e-1], size=shape, p=[0.2, 0.3, 0.2, 0.2, 0.1])
    t = (r * (1 + scale * rng.standard_normal(shape))).astype(np.float32)
    flat_r, flat_t = r.reshape(-1), t.reshape(-1)
    flat_r[:6] = [0.0, 0.0, -0.0, 1e-42, 3.0, -2.5]
    flat_t[:6] = [1e-3, -0.0, 0.0, -1e-42, 3.0000002, -2.4]
    flat_r[6:12] = [np.nan, 1.0, np.inf, 2.0, -np.inf, np.inf]
    flat_t[6:12] = [1.0, np.nan, 1.0, -np.inf, -np.inf, np.inf]
    return r, t


def _bf16_stored(x: np.ndarray) -> np.ndarray:
    """bfloat16 as captures store it: the uint16 bit patterns."""
    return (
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        .bfloat16()
        .view(torch.int16)
        .numpy()
        .view(np.uint16)
    )


CASES = {
    "float32": lambda r, t: (r, t, "float32", "float32"),
    "bfloat16 as stored": lambda r, t: (_bf16_stored(r), _bf16_stored(t), "bfloat16", "bfloat16"),
    "bfloat16 stored vs widened": lambda r, t: (_bf16_stored(r), _bf16(t), "bfloat16", "bfloat16"),
    "float32 vs bfloat16 as stored": lambda r, t: (r, _bf16_stored(t), "float32", "bfloat16"),
    "golden labels, bfloat16 as stored": lambda r, t: (r, _bf16_stored(t), "float32", "float32"),
    "bfloat16": lambda r, t: (_bf16(r), _bf16(t), "bfloat16", "bfloat16"),
    "float16": lambda r, t: (r.astype(np.float16), t.astype(np.float16), "float16", "float16"),
    "float64 vs bfloat16": lambda r, t: (r.astype(np.float64), _bf16(t), "float64", "bfloat16"),
    "float32 vs float64": lambda r, t: (r, t.astype(np.float64), "float32", "float64"),
    "float16 vs float64": lambda r, t: (
        r.astype(np.float16),
        t.astype(np.float64),
        "float16",
        "float64",
    ),
    "float32 vs float16": lambda r, t: (r, t.astype(np.float16), "float32", "float16"),
}


def _accumulate(fused, r, t, ref_dtype, target_dtype, mask, light):
    acc = Accumulator(
        ref_dtype, target_dtype, sample_fraction=0.05, seed=3, light=light, fused=fused
    )
    rows = r.shape[0]
    for block in (
        slice(0, rows // 3),
        slice(rows // 3, rows),
    ):  # two blocks, as the differ streams them
        acc.update(r[block], t[block], None if mask is None else mask[block])
    return acc


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("light", [False, True])
@pytest.mark.parametrize("masked", [True, False])
def test_kernel_equals_the_numpy_path(case, light, masked):
    r, t, ref_dtype, target_dtype = CASES[case](*_hard_pair((6, 40, 96)))
    mask = None
    if masked:
        mask = np.ones((6, 40), dtype=bool)
        mask[1, 25:] = False  # right padding
        mask[4, :] = False  # a sequence of padding only in the second block
    numpy_path = _accumulate(False, r, t, ref_dtype, target_dtype, mask, light)
    fused = _accumulate(True, r, t, ref_dtype, target_dtype, mask, light)
    a, b = numpy_path.metrics(), fused.metrics()
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, float) and np.isfinite(x) and x != y:
            assert y == pytest.approx(x, rel=1e-12), field.name
        else:
            assert x == y, field.name  # counts, maxima, ULP statistics, NaN/Inf counts: exactly
    assert np.array_equal(numpy_path.hist, fused.hist)
    assert a.nan_inf.any and a.numel > 0.9 * r.size * (1 if mask is None else mask.mean())
    if not light and ref_dtype == target_dtype == "float32":
        assert (
            a.ulp.max > 1 << 20
        )  # beyond the exactly counted range: the bit-length bins are exercised
    if masked and not light:
        assert np.allclose(
            np.concatenate(numpy_path.token_norms),
            np.concatenate(fused.token_norms),
            rtol=1e-12,
            atol=0,
        )
    assert all(np.array_equal(x, y) for x, y in zip(numpy_path.sample(), fused.sample()))


def test_histogram_bins_cover_every_exact_distance_the_same_way():
    """Integer distances from 0 to 2^20 (the kernel counts small ones exactly and bins the rest
    from their bit length) land in the bins the numpy path gives them."""
    base = np.full(1 << 20, 1.0, dtype=np.float32)
    bits = base.view(np.int32) + np.arange(base.size, dtype=np.int32)
    target = bits.view(np.float32)
    numpy_path = Accumulator("float32", "float32", sample_fraction=0, seed=0, fused=False)
    fused = Accumulator("float32", "float32", sample_fraction=0, seed=0, fused=True)
    numpy_path.update(base, target, None)
    fused.update(base, target, None)
    assert np.array_equal(numpy_path.hist, fused.hist)
    assert fused.metrics().ulp.max == base.size - 1
    assert np.array_equal(
        ulp_distance(base, target, "float32", "float32"), np.arange(base.size, dtype=np.float64)
    )


def test_results_do_not_depend_on_the_thread_count_and_reruns_are_bit_identical():
    import numba

    r, t, ref_dtype, target_dtype = CASES["float32"](*_hard_pair((8, 64, 256), seed=1))
    mask = np.ones((8, 64), dtype=bool)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, before, before):
            numba.set_num_threads(threads)
            acc = _accumulate(True, r, t, ref_dtype, target_dtype, mask, False)
            results.append((acc.metrics(), acc.hist.copy(), np.concatenate(acc.token_norms)))
    finally:
        numba.set_num_threads(before)
    for metrics, hist, norms in results[1:]:
        assert metrics == results[0][0]  # every float bit for bit
        assert np.array_equal(hist, results[0][1]) and np.array_equal(norms, results[0][2])


def test_a_whole_diff_agrees_with_the_numpy_path(tmp_path, tiny_fp32, tiny_bf16):
    """`HWDIFF_JIT=0` selects the numpy path; its JSON summary matches the kernels' (metrics to
    rounding, fits to the optimizer's tolerance)."""
    cap = dict(limit=4, max_tokens=24, batch_size=4, progress=False)
    a = hwdiff.capture(tiny_fp32, tmp_path / "a.h5", **cap).path
    b = hwdiff.capture(tiny_bf16, tmp_path / "b.h5", **cap).path
    hwdiff.diff(a, b, json_path=tmp_path / "fused.json", progress=False)
    env = {**os.environ, "HWDIFF_JIT": "0", "PYTHONPATH": str(ROOT)}
    script = (
        "import sys, hwdiff; from hwdiff.common import jit; assert not jit.available(), 'jit on'; "
        "print(jit.why_unavailable()); hwdiff.diff(sys.argv[1], sys.argv[2], json_path=sys.argv[3], progress=False)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(a), str(b), str(tmp_path / "numpy.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "HWDIFF_JIT=0" in proc.stdout
    fused = json.loads((tmp_path / "fused.json").read_text())
    reference = json.loads((tmp_path / "numpy.json").read_text())
    assert [layer["name"] for layer in fused["modules"]] == [
        layer["name"] for layer in reference["modules"]
    ]
    for x, y in zip(reference["modules"], fused["modules"]):
        _assert_close(x, y, x["name"])


def _assert_close(x, y, where):
    if isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for key in x:
            _assert_close(x[key], y[key], f"{where}.{key}")
    elif isinstance(x, list):
        assert len(x) == len(y), where
        for i, (p, q) in enumerate(zip(x, y)):
            _assert_close(p, q, f"{where}[{i}]")
    elif isinstance(x, float) and isinstance(y, float):
        # Fits are likelihood optimizations (df to the optimizer's 1% tolerance): their compiled EM
        # rounds its sums differently, so they agree to that tolerance; every metric to rounding.
        tolerance = 1e-2 if ".fit." in where else 1e-9
        assert y == pytest.approx(x, rel=tolerance, abs=1e-300), where
    else:
        assert x == y, where


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_compiled_statistics_equal_the_torch_path(dtype):
    from hwdiff.common import jit
    from hwdiff.store import stats

    x = torch.randn(3, 70, 500, generator=torch.Generator().manual_seed(2)).to(dtype)
    x[0, 0, :3] = float("nan")
    x[1, 5, 7], x[2, 9, 9] = float("inf"), -float("inf")
    compiled = stats.partial_stats(x).numpy()
    saved = dict(jit._state)
    try:
        jit._state.update(module=None, why="forced off by the test")
        reference = stats.partial_stats(x).numpy()
    finally:
        jit._state.clear()
        jit._state.update(saved)
    assert (
        compiled[[0, 4, 5, 6, 7]].tolist() == reference[[0, 4, 5, 6, 7]].tolist()
    )  # count, min, max, NaN, Inf
    assert compiled[1:4] == pytest.approx(reference[1:4], rel=1e-12)
    assert compiled[6:8].tolist() == [3, 2]


def test_compiled_student_t_em_equals_the_numpy_iteration():
    from hwdiff.common import jit
    from hwdiff.compare import fit

    x = np.random.default_rng(4).standard_t(3, 20_000) * 1e-3
    compiled = fit._t_em(x, 3.0, 0.0, 1e-3)
    saved = dict(jit._state)
    try:
        jit._state.update(module=None, why="forced off by the test")
        reference = fit._t_em(x, 3.0, 0.0, 1e-3)
    finally:
        jit._state.clear()
        jit._state.update(saved)
    assert compiled[1:] == pytest.approx(reference[1:], rel=1e-9)
    assert compiled[0] == pytest.approx(
        reference[0], rel=1e-6, abs=1e-12
    )  # loc ≈ 0: relative to the scale


def test_a_missing_numba_is_said_once_and_the_numpy_path_is_used(tmp_path):
    """Without numba the diff still runs (numpy path) and says why, once, through logging."""
    blocker = tmp_path / "no_numba"
    blocker.mkdir()
    (blocker / "numba.py").write_text("raise ImportError('numba blocked by the test')\n")
    script = (
        "import logging, numpy as np; logging.basicConfig(level=logging.WARNING); "
        "from hwdiff.compare.metrics import Accumulator; from hwdiff.common import jit; "
        "a = Accumulator('float32', 'float32', sample_fraction=0, seed=0); "
        "b = Accumulator('float32', 'float32', sample_fraction=0, seed=0); "
        "a.update(np.ones(4, np.float32), np.ones(4, np.float32), None); "
        "print(a.fused, b.fused, jit.why_unavailable())"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])}
    env.pop("HWDIFF_JIT", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("False False numba is not importable (numba blocked by the test)")
    assert proc.stderr.count("numba is not importable") == 1


def test_student_t_em_on_distinct_values_with_counts_equals_the_em_on_every_value(monkeypatch):
    """Errors of low-precision outputs are multiples of an ulp: the EM sums per distinct value with
    its count. Same sums, other order: equal to 1e-9, compiled or not; the whole fit (df search
    included) lands on the same df and likelihood."""
    from hwdiff.common import jit
    from hwdiff.compare import fit

    x = np.sort(np.round(np.random.default_rng(5).standard_t(3, 20_000) * 8) * 2.0**-10)
    x = x[x != 0]
    values, counts = np.unique(x, return_counts=True)
    assert values.size * fit.TIES_FACTOR <= x.size
    tied = (values, counts.astype(np.float64))
    every = fit._t_em(x, 3.0, 0.0, 1e-3)
    grouped = fit._t_em(x, 3.0, 0.0, 1e-3, tied=tied)
    saved = dict(jit._state)
    try:
        jit._state.update(module=None, why="forced off by the test")
        grouped_numpy = fit._t_em(x, 3.0, 0.0, 1e-3, tied=tied)
    finally:
        jit._state.clear()
        jit._state.update(saved)
    for other in (grouped, grouped_numpy):
        assert other[1:] == pytest.approx(every[1:], rel=1e-9)
        assert other[0] == pytest.approx(every[0], rel=1e-6, abs=1e-12)
    with_ties = fit.fit_errors(x).fits["student_t"]
    monkeypatch.setattr(fit, "TIES_FACTOR", 10**9)  # never grouped
    without = fit.fit_errors(x).fits["student_t"]
    assert with_ties.params["df"] == pytest.approx(without.params["df"], rel=1e-6)
    assert with_ties.loglik == pytest.approx(without.loglik, rel=1e-9)
