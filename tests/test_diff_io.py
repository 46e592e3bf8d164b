"""load_diff: a diff read back from diff.h5 or its JSON summary is the DiffResult that was written, and
summary() of it is the file's summary byte for byte (what keeps every file written from a loaded diff,
sigma.yaml and the report included, as it was)."""

import dataclasses
import json
import math

import numpy as np
import pytest

import hwdiff
from hwdiff.compare.io import from_summary, load_diff
from hwdiff.compare.output import summary
from hwdiff.errors import HwdiffError

from .test_families import FAST, build, ids_file

# Fields the summary does not hold, so a loaded diff cannot have them: the values at a slot's largest
# error (kept only in a flagged outlier, and checked there below).
NOT_STORED = {("Metrics", "max_ref"), ("Metrics", "max_target")}


def mismatches(a, b, where="result", ignore=NOT_STORED):
    """Where two values differ, compared field by field through dataclasses (fields with
    ``compare=False``, such as DiffResult.arrays, left out), tuples, lists, dicts and numpy arrays;
    NaN equals NaN, so a field that is NaN on both sides (an exact module's fit skew, an unknown input
    error) counts as equal. Returns a list of 'path: a != b' lines (empty: equal)."""
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        if type(a) is not type(b):
            return [f"{where}: {type(a).__name__} != {type(b).__name__}"]
        found = []
        for f in dataclasses.fields(a):
            if f.compare and (type(a).__name__, f.name) not in ignore:
                found += mismatches(
                    getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}", ignore
                )
        return found
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        same = a.shape == b.shape and np.array_equal(
            a, b, equal_nan=a.dtype.kind == "f" and b.dtype.kind == "f"
        )
        return [] if same else [f"{where}: arrays differ"]
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and type(a) is type(b):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items != {len(b)}"]
        return [
            line
            for i, (x, y) in enumerate(zip(a, b))
            for line in mismatches(x, y, f"{where}[{i}]", ignore)
        ]
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return [f"{where}: keys {list(a)} != {list(b)}"]
        return [
            line for key in a for line in mismatches(a[key], b[key], f"{where}[{key!r}]", ignore)
        ]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b and type(a) is type(b) else [f"{where}: {a!r} != {b!r}"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Two real diffs of a tiny MoE model (routers, a shared expert) and the files each wrote:
    "local" — bf16 sdpa vs bf16 eager with a replay (--local) and a float32 golden, the same precision;
    "budget" — float32 vs bf16, different precisions (the budget rule, ULP in the finer dtype)."""
    root = tmp_path_factory.mktemp("diff_io")
    build("qwen2_moe").save_pretrained(root / "model")
    cap = {"inputs": ids_file(root), "batch_size": 4, "progress": False}
    ref_model = hwdiff.load_model(str(root / "model"), dtype="bfloat16", attn_implementation="sdpa")
    tgt_model = hwdiff.load_model(
        str(root / "model"), dtype="bfloat16", attn_implementation="eager"
    )
    fp32_model = hwdiff.load_model(
        str(root / "model"), dtype="float32", attn_implementation="eager"
    )
    ref = hwdiff.capture(ref_model, root / "ref.h5", record_inputs=True, **cap).path
    tgt = hwdiff.capture(
        tgt_model, root / "tgt.h5", record_inputs=True, **cap
    ).path  # input slots compared
    golden = hwdiff.capture(fp32_model, root / "fp32.h5", **cap).path
    local = hwdiff.replay(tgt_model, ref, root / "local.h5", progress=False).path
    pairs = {
        "local": ((ref, tgt), {"local": local, "golden": golden}),
        "budget": ((golden, tgt), {}),
    }
    done = {}
    for name, (sides, extra) in pairs.items():
        h5, js = root / f"diff_{name}.h5", root / f"diff_{name}.json"
        done[name] = (hwdiff.diff(*sides, out=h5, json_path=js, **extra, **FAST), h5, js)
    return done


@pytest.mark.parametrize("pair", ["local", "budget"])
@pytest.mark.parametrize("kind", ["h5", "json"])
def test_a_loaded_diff_is_the_result_written(written, pair, kind):
    result, h5, js = written[pair]
    loaded = load_diff(h5 if kind == "h5" else js)
    assert mismatches(loaded, result) == []
    # what the round trip had to rebuild is there: every nested type of the pair
    assert (
        loaded.rl_impact is not None
        and loaded.correlation is not None
        and loaded.growth is not None
    )
    assert loaded.first_difference is not None and loaded.routing
    if pair == "local":
        assert loaded.local is not None and loaded.golden is not None
        assert any(
            layer.local is not None and layer.local.verdict is not None for layer in loaded.layers
        )
        assert any(layer.golden is not None for layer in loaded.layers)
        assert any(layer.slot == "input" for layer in loaded.layers)
    else:
        assert any(layer.ulp_fine is not None for layer in loaded.layers)
        assert {layer.verdict.rule for layer in loaded.layers} == {"budget"}
    for old, new in zip(
        result.layers, loaded.layers
    ):  # kept in the summary only where an outlier is flagged
        if new.verdict.outlier is not None:
            assert (new.metrics.max_ref, new.metrics.max_target) == (
                old.metrics.max_ref,
                old.metrics.max_target,
            )


@pytest.mark.parametrize("pair", ["local", "budget"])
def test_summary_of_a_loaded_diff_is_the_file_byte_for_byte(written, pair):
    _, h5, js = written[pair]
    text = js.read_text()
    for path in (h5, js):
        assert json.dumps(summary(load_diff(path)), indent=1) == text


def test_arrays_come_from_diff_h5_only(written):
    result, h5, js = written["local"]
    loaded = load_diff(h5)
    assert list(loaded.arrays) == list(result.arrays)
    for key, arrays in result.arrays.items():
        assert sorted(loaded.arrays[key]) == sorted(arrays)
        assert all(
            np.array_equal(loaded.arrays[key][name], value) for name, value in arrays.items()
        )
    assert load_diff(js).arrays == {} and load_diff(h5, arrays=False).arrays == {}
    assert load_diff(result) is result


def test_non_finite_values_come_back_as_documented(written):
    """JSON null stands for every non-finite float; each comes back as what the field can mean
    (hwdiff.compare.io's docstring): these are the values the diff itself computes in those cases."""
    result = written["local"][0]
    index, layer = next(
        (i, l)
        for i, l in enumerate(result.layers)
        if l.slot == "output" and l.local is not None and l.metrics.rmse > 0 and l.metrics.bias
    )
    m = layer.metrics
    metrics = dataclasses.replace(
        m,
        rel_l2=math.inf,
        sqnr_db=-math.inf,
        ulp=dataclasses.replace(m.ulp, max=math.inf),
        ref_rms=math.nan,
    )
    verdict = dataclasses.replace(
        layer.verdict,
        bias_z=math.copysign(math.inf, m.bias),
        bias_effect=abs(m.bias) / m.rmse,
        roundings=math.nan,
    )
    local_verdict = dataclasses.replace(
        layer.local.verdict, bias_z=-math.inf, bias_outward=-1e-3, bias_effect=1.0
    )
    changed = dataclasses.replace(
        layer,
        metrics=metrics,
        verdict=verdict,
        local=dataclasses.replace(layer.local, total_rel_l2=math.inf, verdict=local_verdict),
    )
    odd = dataclasses.replace(
        result, layers=result.layers[:index] + (changed,) + result.layers[index + 1 :]
    )
    data = json.loads(json.dumps(summary(odd)))
    row = data["modules"][index]
    assert (
        row["rel_l2"] is None
        and row["sqnr_db"] is None
        and row["ulp"]["max"] is None
        and row["ref_rms"] is None
    )
    assert row["verdict"]["bias_z"] is None and row["local_verdict"]["bias_z"] is None
    assert mismatches(from_summary(data), odd) == []


def test_bad_files_are_one_line_errors(tmp_path, written):
    js = written["budget"][2]
    with pytest.raises(HwdiffError, match="no such diff file"):
        load_diff(tmp_path / "missing.h5")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(HwdiffError, match="is not a diff summary \\(invalid JSON"):
        load_diff(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"schema": "hwdiff/sigma/2"}))
    with pytest.raises(HwdiffError, match="is not a diff summary of schema hwdiff/diff-summary/1"):
        load_diff(tmp_path / "other.json")
    (tmp_path / "cut.json").write_text(
        json.dumps({**json.loads(js.read_text()), "modules": [{"name": "x"}]})
    )
    with pytest.raises(HwdiffError, match="cut.json is a malformed diff summary"):
        load_diff(tmp_path / "cut.json")
    with pytest.raises(HwdiffError, match="is not a complete diff file of schema hwdiff/diff/1"):
        load_diff(written["local"][0].reference["path"])  # a capture, not a diff
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(HwdiffError, match="is not a readable diff file"):
        load_diff(tmp_path / "junk.h5")


def test_an_early_summary_without_verdicts_loads():
    """data/reference/ keeps a summary from before per-module verdicts, RL blocks and first differences:
    it loads, each module's verdict the one rule of that version, rebuilt from what it stored."""
    from .conftest import ROOT

    path = ROOT / "data/reference/tiny-qwen2-cuda-vs-cpu-bf16.diff.json"
    stored = json.loads(path.read_text())
    loaded = load_diff(path)
    assert [(l.name, l.exact, l.diverges, l.beyond_rounding_frac) for l in loaded.layers] == [
        (m["name"], m["exact"], m["diverges"], m["beyond_rounding_frac"]) for m in stored["modules"]
    ]
    assert (
        loaded.first_divergence.name == stored["first_divergence"]["name"]
        and loaded.first_difference is None
    )
    assert loaded.rl_impact is None and "without the RL block" in loaded.rl_absent
    assert all(math.isnan(l.metrics.ref_rms) for l in loaded.layers)
