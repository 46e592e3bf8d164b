import json
import shutil

import h5py
import numpy as np
import pytest
import torch

import hwdiff
from hwdiff.compare.metrics import Accumulator, ulp_distance
from hwdiff.errors import CaptureFormatError, HwdiffError

from .conftest import L, run_cli

CAP = dict(limit=8, max_tokens=32, batch_size=4, progress=False)
BF16_ROUNDING = (
    0.425 * 2.0**-8
)  # RMS relative error of one rounding to bfloat16 (docs/design.md#numbers-to-know)


@pytest.fixture(scope="module")
def captures(tmp_path_factory, tiny_fp32, tiny_bf16):
    root = tmp_path_factory.mktemp("captures")
    return {
        "fp32": hwdiff.capture(tiny_fp32, root / "fp32.h5", record_inputs=True, **CAP).path,
        "bf16": hwdiff.capture(tiny_bf16, root / "bf16.h5", **CAP).path,
    }


def _copy(src, dst, edit=None):
    shutil.copyfile(src, dst)
    if edit is not None:
        with h5py.File(dst, "r+") as handle:
            edit(handle)
    return dst


def _add(handle, name, noise):
    dataset = handle[f"modules/{name}/0/output"]
    dataset[...] = dataset[...] + noise(dataset.shape).astype(dataset.dtype)


def test_bit_identical_captures_are_exact_everywhere(tmp_path, captures):
    twin = _copy(captures["fp32"], tmp_path / "twin.h5")
    result = hwdiff.diff(captures["fp32"], twin, progress=False)
    assert result.exact and result.first_divergence is None and not result.unmatched
    for layer in result.layers:
        assert layer.metrics.equal_frac == 1.0 and layer.metrics.rel_l2 == 0.0, layer.name
        assert layer.fit.best == "none" and "bit-identical" in layer.fit.reason
    proc = run_cli("diff", captures["fp32"], twin, "-q")
    assert proc.returncode == 0 and "first divergence  none" in proc.stdout


def test_planted_gaussian_noise_is_recovered_and_localized(tmp_path, captures):
    sigma = 1e-3
    rng = np.random.default_rng(1)
    planted = ("model.layers.1.self_attn.q_proj", "model.layers.2.mlp.gate_proj")
    noisy = _copy(
        captures["fp32"],
        tmp_path / "noisy.h5",
        lambda h: [_add(h, name, lambda shape: rng.normal(0, sigma, shape)) for name in planted],
    )
    result = hwdiff.diff(captures["fp32"], noisy, progress=False)
    for layer in result.outputs:
        if layer.name in planted:
            gaussian = layer.fit.fits["gaussian"]
            assert layer.fit.best == "gaussian", layer.fit
            assert gaussian.bic < min(layer.fit.fits[name].bic for name in ("student_t", "laplace"))
            assert gaussian.params["sigma"] == pytest.approx(sigma, rel=0.02)
            assert layer.metrics.err_std == pytest.approx(sigma, rel=0.02)
            assert abs(layer.metrics.bias) < 3 * sigma / np.sqrt(layer.metrics.numel)
        else:
            assert layer.exact, layer.name
    assert result.first_divergence.name == planted[0]


def test_planted_student_t_noise_is_identified_with_its_df(tmp_path, captures):
    rng = np.random.default_rng(2)
    noisy = _copy(
        captures["fp32"],
        tmp_path / "t.h5",
        lambda h: _add(
            h, "model.layers.0.mlp.up_proj", lambda shape: 1e-3 * rng.standard_t(3, shape)
        ),
    )
    fit = (
        hwdiff.diff(captures["fp32"], noisy, progress=False).layer("model.layers.0.mlp.up_proj").fit
    )
    assert fit.best == "student_t"
    assert fit.fits["student_t"].params["df"] == pytest.approx(3, rel=0.3)


@pytest.mark.parametrize("same, expected", [(True, 1.0), (False, 0.0)])
def test_planted_correlation_shows_in_the_increments(tmp_path, captures, same, expected):
    rng = np.random.default_rng(3)
    with h5py.File(captures["fp32"]) as handle:
        shape = handle["modules/model.layers.1/0/output"].shape
    first = rng.normal(0, 1e-3, shape)
    second = first if same else rng.normal(0, 1e-3, shape)

    def plant(handle):
        _add(handle, "model.layers.1", lambda _: first)
        _add(handle, "model.layers.3", lambda _: second)

    result = hwdiff.diff(
        captures["fp32"], _copy(captures["fp32"], tmp_path / "c.h5", plant), progress=False
    )
    corr = result.correlation
    assert corr.names == ("model.embed_tokens", *(f"model.layers.{i}" for i in range(L)))
    i, j = corr.names.index("model.layers.1"), corr.names.index("model.layers.3")
    assert corr.increments[i, j] == pytest.approx(expected, abs=0.02)
    assert corr.accumulated[i, j] == pytest.approx(expected, abs=0.02)
    assert "model.layers.0" in corr.exact and np.isnan(corr.accumulated[0, i])


def test_nan_in_the_residual_stream_counts_as_zero_error_in_the_correlation(tmp_path, captures):
    rng = np.random.default_rng(4)
    with h5py.File(captures["fp32"]) as handle:
        shape = handle["modules/model.layers.1/0/output"].shape
    noise = rng.normal(0, 1e-3, shape)

    def plant(handle, poison):
        _add(handle, "model.layers.1", lambda _: noise)
        _add(handle, "model.layers.3", lambda _: noise)
        if poison:
            dataset = handle["modules/model.layers.3/0/output"]
            values = dataset[...]
            values[0, 0, :2] = [np.nan, np.inf]
            dataset[...] = values

    clean, poisoned = (
        hwdiff.diff(
            captures["fp32"],
            _copy(captures["fp32"], tmp_path / f"{p}.h5", lambda h: plant(h, p)),
            progress=False,
        ).correlation
        for p in (False, True)
    )
    i, j = clean.names.index("model.layers.1"), clean.names.index("model.layers.3")
    assert np.isfinite(poisoned.accumulated[i, j]) and np.isfinite(poisoned.increments[i, j])
    assert poisoned.accumulated[i, j] == pytest.approx(
        clean.accumulated[i, j], abs=1e-3
    )  # 2 of ~60k elements


def test_float32_vs_bfloat16_embedding_error_is_one_bf16_rounding(captures):
    result = hwdiff.diff(captures["fp32"], captures["bf16"], progress=False)
    embedding = result.layer("model.embed_tokens")
    assert embedding.metrics.rel_l2 == pytest.approx(BF16_ROUNDING, rel=0.10)
    assert embedding.metrics.ulp.max <= 0.5  # one round-to-nearest: at most half an ulp
    assert not embedding.diverges
    assert (
        result.first_difference.name == "model.embed_tokens"
    )  # everything differs: another precision
    assert result.growth.rel_l2[-1] > result.growth.rel_l2[1]


def _bf16_round(x):
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).bfloat16().double().numpy()


def test_float32_vs_bfloat16_names_no_divergence_inside_the_first_decoder_layer(captures):
    """Pure rounding across precisions: each module's error, in units of the error of rounding the
    float32 side to bfloat16 (computed here with torch's own rounding), stays within the budget
    docs/diff.md states (4 roundings + 2 × the largest before it), and hwdiff names nothing there."""
    result = hwdiff.diff(captures["fp32"], captures["bf16"], progress=False)
    seen = 0.0
    with hwdiff.open_capture(captures["fp32"]) as a, hwdiff.open_capture(captures["bf16"]) as b:
        mask = a.attention_mask.astype(bool)
        for layer in result.outputs:
            if not (layer.name == "model.embed_tokens" or layer.name.startswith("model.layers.0")):
                continue
            r = a.activation(layer.name)[mask].astype(np.float64)
            t = b.activation(layer.name)[mask].astype(np.float64)
            one_rounding = np.linalg.norm(_bf16_round(r) - r) / np.linalg.norm(r)
            roundings = np.linalg.norm(t - r) / np.linalg.norm(r) / one_rounding
            assert roundings <= 4 + 2 * seen, layer.name  # the rule, computed independently
            assert layer.verdict.roundings == pytest.approx(roundings, rel=0.05), (
                layer.name
            )  # ε₁ from a sample
            assert layer.verdict.rule == "budget" and not layer.diverges, (
                layer.name,
                layer.verdict,
            )
            seen = max(seen, roundings)
    assert seen > 5  # the error does grow inside the layer: several roundings, all explained
    first = result.first_divergence
    assert first is None or not first.name.startswith(("model.embed_tokens", "model.layers.0."))


def test_attention_kernel_path_diverges_at_layer_0_attention(tmp_path):
    from hwdiff.demo import run_demo

    reference, target = run_demo(tmp_path, limit=6, max_tokens=32, progress=False)
    result = hwdiff.diff(reference, target, progress=False)
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert result.layer(f"model.layers.0.self_attn.{proj}").exact
    assert result.first_divergence.name == "model.layers.0.self_attn"
    assert (
        result.first_divergence.origin == "input"
    )  # seen where o_proj receives the attention core's output


def test_golden_mode_says_which_side_is_off(tmp_path, captures):
    rng = np.random.default_rng(4)
    worse = _copy(captures["bf16"], tmp_path / "worse.h5")
    with h5py.File(worse, "r+") as handle:  # bf16 stored as bits: perturb through float32
        dataset = handle["modules/lm_head/0/output"]
        values = torch.from_numpy(hwdiff.store.decode(dataset[...], "bfloat16").copy())
        values += (
            torch.from_numpy(rng.normal(0, 0.05, values.shape).astype(np.float32)) * values.std()
        )
        dataset[...] = values.bfloat16().view(torch.int16).numpy().view(np.uint16)
    result = hwdiff.diff(captures["bf16"], worse, golden=captures["fp32"], progress=False)
    assert result.layer("lm_head").golden.ratio > 2
    assert result.layer("model.norm").golden.ratio == pytest.approx(1.0)


def test_outputs_json_csv_h5(tmp_path, captures):
    result = hwdiff.diff(
        captures["fp32"],
        captures["bf16"],
        out=tmp_path / "d.h5",
        json_path=tmp_path / "d.json",
        csv_path=tmp_path / "d.csv",
        progress=False,
    )
    summary = json.loads((tmp_path / "d.json").read_text())
    assert summary["schema"] == "hwdiff/diff-summary/1"
    assert {"reference", "target", "unmatched", "correlation", "first_divergence"} <= set(summary)
    assert set(summary["correlation"]) >= {"names", "accumulated", "increments"}
    module = summary["modules"][5]
    required = {
        "name",
        "call",
        "kind",
        "shape",
        "numel",
        "equal_frac",
        "rel_l2",
        "sqnr_db",
        "cosine",
        "one_minus_cos",
        "rmse",
        "max_abs",
        "mean_abs",
        "bias",
        "err_std",
        "ulp",
        "thousandth_frac",
        "five_thousandth_frac",
        "nan_inf",
        "fit",
    }
    assert required <= set(module)
    assert set(module["ulp"]) == {"dtype", "p50", "p99", "max", "le1_frac"}
    assert (
        module["ulp"]["dtype"] == "bfloat16" and module["ulp_fine"]["dtype"] == "float32"
    )  # coarse shown, fine kept
    assert module["ulp_fine"]["max"] > 1000 * module["ulp"]["max"]
    assert {"best", "gaussian", "student_t", "laplace"} <= set(module["fit"])
    assert {"mu", "sigma", "ks_stat", "ks_p", "aic"} <= set(module["fit"]["gaussian"])
    relative = module["fit"]["relative"]  # the same shape as the absolute fit
    assert {"best", "gaussian", "student_t", "laplace"} <= set(relative) and module["fit"][
        "law"
    ] in ("absolute", "relative")
    assert {"mu", "sigma", "ks_stat", "ks_p", "aic", "bic"} <= set(relative["gaussian"])
    assert {"rule", "reasons", "roundings", "budget", "outlier", "bias_z"} <= set(module["verdict"])
    assert (
        summary["first_difference"]["name"] == "model.embed_tokens"
        and "different precision" in summary["divergence_rule"]
    )
    rows = (tmp_path / "d.csv").read_text().splitlines()
    assert len(rows) == 1 + len(result.layers)
    with h5py.File(tmp_path / "d.h5") as handle:
        assert handle.attrs["complete"] and handle.attrs["schema"] == "hwdiff/diff/1"
        assert (
            handle["layers/lm_head/0/output/ulp_hist"][...].sum()
            == result.layer("lm_head").metrics.numel
        )
        assert handle["correlation/increments"].shape == (L + 1, L + 1)
        assert "token_correlation/matrix" in handle


def test_metrics_against_direct_numpy(captures):
    result = hwdiff.diff(captures["fp32"], captures["bf16"], progress=False)
    with hwdiff.open_capture(captures["fp32"]) as a, hwdiff.open_capture(captures["bf16"]) as b:
        mask = a.attention_mask.astype(bool)
        r = a.activation("model.layers.2.mlp.act_fn")[mask].astype(np.float64).ravel()
        t = b.activation("model.layers.2.mlp.act_fn")[mask].astype(np.float64).ravel()
    m = result.layer("model.layers.2.mlp.act_fn").metrics
    e = t - r
    assert m.numel == r.size
    assert m.rel_l2 == pytest.approx(np.linalg.norm(e) / np.linalg.norm(r), rel=1e-9)
    assert m.cosine == pytest.approx(r @ t / np.linalg.norm(r) / np.linalg.norm(t), rel=1e-12)
    assert m.one_minus_cos == pytest.approx(
        1 - r @ t / np.linalg.norm(r) / np.linalg.norm(t), rel=1e-4
    )
    assert m.max_abs == np.abs(e).max() and m.bias == pytest.approx(e.mean(), rel=1e-9)
    assert m.sqnr_db == pytest.approx(-20 * np.log10(m.rel_l2), rel=1e-12)
    # ULP distance in the coarser dtype of the pair (bfloat16: 7 fraction bits, spacing 2^(e−7) at |r| in [2^e, 2^(e+1)))
    exponent = np.floor(np.log2(np.where(r == 0, np.abs(t), np.abs(r))))
    assert m.ulp.max == pytest.approx(
        np.max(np.abs(e) / 2.0 ** (np.maximum(exponent, -126) - 7)), rel=1e-12
    )


def test_ulp_distance_counts_representable_values():
    a = torch.tensor([1.0, 1.0, -1.0, 0.0, -(2.0**-130), 3.0]).bfloat16().float().numpy()
    b = (
        torch.tensor([1.0078125, 0.99609375, -1.0078125, -0.0, 2.0**-130, 3.0])
        .bfloat16()
        .float()
        .numpy()
    )
    # ±2^-130 are subnormal in bf16, where the spacing is 2^-133: 8 steps on each side of zero
    assert ulp_distance(a, b, "bfloat16", "bfloat16").tolist() == [1, 1, 1, 0, 16, 0]
    x = np.array([1.0, 1.0, 3.0], dtype=np.float32)
    y = np.array([1.00390625, 1.0078125, 3.0], dtype=np.float32)  # half and one bf16 ulp above 1
    assert ulp_distance(x, y, "float32", "bfloat16").tolist() == [0.5, 1.0, 0.0]


def test_nan_on_one_side_is_reported_not_propagated(tmp_path, captures):
    def plant(handle):
        dataset = handle["modules/model.layers.1.mlp.up_proj/0/output"]
        values = dataset[...]
        values[0, :3, 0] = np.nan
        values[1, 0, 1] = np.inf
        dataset[...] = values

    layer = hwdiff.diff(
        captures["fp32"], _copy(captures["fp32"], tmp_path / "nan.h5", plant), progress=False
    ).layer("model.layers.1.mlp.up_proj")
    assert (layer.metrics.nan_inf.target_nan, layer.metrics.nan_inf.target_inf) == (3, 1)
    assert layer.metrics.nan_inf.ref_nan == 0 and layer.metrics.rel_l2 == 0.0


def test_a_module_missing_on_one_side_is_listed_and_strict_refuses(tmp_path, captures):
    pruned = _copy(
        captures["fp32"],
        tmp_path / "pruned.h5",
        lambda h: h.__delitem__("modules/model.layers.2.mlp.act_fn"),
    )
    result = hwdiff.diff(captures["fp32"], pruned, progress=False)
    assert [(u.name, u.reason) for u in result.unmatched] == [
        ("model.layers.2.mlp.act_fn", "only in the reference")
    ]
    with pytest.raises(HwdiffError, match="could not be compared"):
        hwdiff.diff(captures["fp32"], pruned, strict=True, progress=False)


def test_different_inputs_models_truncated_files_and_stats_are_refused(
    tmp_path, captures, tiny_fp32
):
    other_inputs = hwdiff.capture(
        tiny_fp32, tmp_path / "other.h5", limit=4, max_tokens=32, progress=False
    ).path
    (tmp_path / "keep.json").write_text("previous")
    with pytest.raises(HwdiffError, match="different inputs"):
        hwdiff.diff(
            captures["fp32"], other_inputs, json_path=tmp_path / "keep.json", progress=False
        )
    assert (tmp_path / "keep.json").read_text() == "previous"
    other_model = hwdiff.capture(
        hwdiff.load_model("tiny-qwen2", seed=5), tmp_path / "m.h5", **CAP
    ).path
    with pytest.raises(HwdiffError, match="another model"):
        hwdiff.diff(captures["fp32"], other_model, progress=False)
    assert hwdiff.diff(
        captures["fp32"], other_model, allow_model_mismatch=True, progress=False
    ).layers
    data = captures["fp32"].read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(CaptureFormatError, match="truncated"):
        hwdiff.diff(captures["fp32"], tmp_path / "cut.h5", progress=False)
    stats = hwdiff.capture(tiny_fp32, tmp_path / "s.h5", mode="stats", **CAP).path
    with pytest.raises(HwdiffError, match="stats"):
        hwdiff.diff(captures["fp32"], stats, progress=False)


def test_sample_captures_without_or_with_other_positions_are_refused(tmp_path, tiny_fp32):
    """Sample captures are compared at the positions both kept: a file that lost its
    /inputs/sample_positions is named as damaged (was AttributeError), and positions of another
    shape are refused with the reason (was numpy's broadcast error)."""
    sample = dict(CAP, mode="sample", tokens=4)
    a = hwdiff.capture(tiny_fp32, tmp_path / "a.h5", **sample).path
    b = hwdiff.capture(tiny_fp32, tmp_path / "b.h5", **sample).path
    assert hwdiff.diff(a, b, progress=False).exact

    def drop(handle):
        del handle["inputs/sample_positions"]

    lost = _copy(b, tmp_path / "lost.h5", drop)
    with pytest.raises(CaptureFormatError, match="without its token positions"):
        hwdiff.diff(a, lost, progress=False)
    fewer = hwdiff.capture(tiny_fp32, tmp_path / "c.h5", **dict(sample, tokens=2)).path
    with pytest.raises(HwdiffError, match="kept different token positions"):
        hwdiff.diff(a, fewer, progress=False)


def test_diff_of_nothing_is_refused(captures):
    with pytest.raises(HwdiffError):
        hwdiff.diff(None, captures["bf16"], progress=False)


def test_cli_diff_bad_input_is_one_clear_line(tmp_path, captures):
    (tmp_path / "junk.h5").write_text("junk")
    proc = run_cli("diff", captures["fp32"], tmp_path / "junk.h5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("hwdiff: error:")


def test_accumulator_streams_blocks_like_one_pass():
    rng = np.random.default_rng(5)
    r = rng.normal(size=(6, 10, 8)).astype(np.float32)
    t = (r + rng.normal(0, 1e-3, r.shape)).astype(np.float32)
    mask = np.ones((6, 10), dtype=bool)
    whole = Accumulator("float32", "float32", sample_fraction=1, seed=0)
    whole.update(r, t, mask)
    parts = Accumulator("float32", "float32", sample_fraction=1, seed=0)
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):
        parts.update(r[rows], t[rows], mask[rows])
    a, b = whole.metrics(), parts.metrics()
    assert (
        a.rel_l2 == pytest.approx(b.rel_l2, rel=1e-12) and a.ulp == b.ulp and a.max_abs == b.max_abs
    )


def test_real_h100_capture_against_cpu_from_data_reference():
    """data/reference/ holds tiny-qwen2 captured on an H100 and on its host CPU (bf16) and a CPU float32 golden."""
    from .conftest import ROOT

    ref = ROOT / "data/reference"
    result = hwdiff.diff(
        ref / "tiny-qwen2-cpu-bf16-sdpa.h5",
        ref / "tiny-qwen2-cuda-bf16-sdpa.h5",
        golden=ref / "tiny-qwen2-cpu-fp32-eager.h5",
        progress=False,
    )
    assert result.target["device"] == "cuda:0" and "H100" in result.target["device_name"]
    for name in (
        "model.embed_tokens",
        "model.layers.0.input_layernorm",
        "model.layers.0.self_attn.q_proj",
    ):
        assert result.layer(name).exact
    assert (
        result.first_divergence.name == "model.layers.0.self_attn.o_proj"
    )  # the attention kernels differ
    assert result.layer("model.embed_tokens").golden.reference_rel_l2 == pytest.approx(
        BF16_ROUNDING, rel=0.1
    )
    assert result.layer("lm_head").golden.ratio == pytest.approx(
        1.0, abs=0.05
    )  # neither device is the odd one


def test_one_error_norm_per_real_token(tmp_path, tiny_fp32, tiny_bf16):
    padded = dict(limit=6, max_tokens=None, batch_size=3, progress=False)
    paths = [
        hwdiff.capture(m, tmp_path / f"{i}.h5", **padded).path
        for i, m in enumerate((tiny_fp32, tiny_bf16))
    ]
    result = hwdiff.diff(
        *paths, progress=False, block_elements=5000
    )  # small blocks: some hold padding only
    with hwdiff.open_capture(paths[0]) as cap:
        real = int(cap.attention_mask.sum())
        assert real < cap.attention_mask.size  # the shipped prompts are padded
        r = cap.activation("model.layers.1.mlp.act_fn")[cap.attention_mask.astype(bool)].astype(
            np.float64
        )
    with hwdiff.open_capture(paths[1]) as cap:
        t = cap.activation("model.layers.1.mlp.act_fn")[cap.attention_mask.astype(bool)].astype(
            np.float64
        )
    norms = result.arrays["model.layers.1.mlp.act_fn/0/output"]["token_norms"]
    assert norms.shape == (real,)
    assert np.allclose(norms, np.linalg.norm(t - r, axis=1), rtol=1e-6)


def test_fit_ks_statistics_equal_scipy_on_tied_and_continuous_samples():
    """The KS test evaluates each fitted CDF once per distinct value; with runs of ties (errors that
    are multiples of an ulp) and without, it must give scipy.stats.kstest's numbers."""
    from scipy import stats

    from hwdiff.compare.fit import fit_errors

    rng = np.random.default_rng(6)
    tied = np.round(rng.standard_t(4, 20_000) * 3) * 2.0**-9  # a few dozen distinct values
    continuous = rng.laplace(0, 1e-3, 20_000)
    for sample in (tied, continuous):
        result = fit_errors(sample)
        x = sample[sample != 0]
        params = {name: fit.params for name, fit in result.fits.items()}
        dists = {
            "gaussian": stats.norm(params["gaussian"]["mu"], params["gaussian"]["sigma"]),
            "student_t": stats.t(
                params["student_t"]["df"], params["student_t"]["loc"], params["student_t"]["scale"]
            ),
            "laplace": stats.laplace(params["laplace"]["loc"], params["laplace"]["scale"]),
        }
        for name, dist in dists.items():
            expected = stats.kstest(x, dist.cdf, method="asymp")
            assert result.fits[name].ks_stat == pytest.approx(expected.statistic, rel=1e-12), name
            assert result.fits[name].ks_p == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300), (
                name
            )
            assert result.fits[name].loglik == pytest.approx(
                float(np.sum(dist.logpdf(x))), rel=1e-9
            ), name
    assert len(np.unique(tied)) < 100


def test_fit_and_read_ahead_threads_do_not_change_a_single_number(tmp_path, captures, monkeypatch):
    """On two cores the differ runs inline; with cores to spare, fits and read-ahead use threads.
    Both give the very same summary."""
    outputs = {}
    for threads in ("0,0", "3,1"):
        monkeypatch.setenv("HWDIFF_DIFF_THREADS", threads)
        hwdiff.diff(
            captures["fp32"],
            captures["bf16"],
            json_path=tmp_path / f"{threads}.json",
            progress=False,
        )
        outputs[threads] = json.loads((tmp_path / f"{threads}.json").read_text())
    assert outputs["0,0"]["modules"] == outputs["3,1"]["modules"]
    assert outputs["0,0"]["correlation"] == outputs["3,1"]["correlation"]


def test_the_terminal_table_shows_an_aliased_modules_own_local_error(tmp_path, captures):
    """self_attn's output is o_proj's very tensor (stored once), but its local error (sdpa vs eager in
    the core) is its own: the table must show it on a row of its own, not fold it into o_proj's."""
    from hwdiff.compare.output import format_table

    eager = hwdiff.load_model("tiny-qwen2", dtype="float32", attn_implementation="eager")
    target = hwdiff.capture(eager, tmp_path / "eager.h5", **CAP).path
    local = hwdiff.replay(eager, captures["fp32"], tmp_path / "local.h5", progress=False).path
    result = hwdiff.diff(
        captures["fp32"], target, local=local, json_path=tmp_path / "d.json", progress=False
    )
    modules = {
        m["name"]: m
        for m in json.loads((tmp_path / "d.json").read_text())["modules"]
        if m["slot"] == "output"
    }
    attention, o_proj = (
        modules["model.layers.0.self_attn"],
        modules["model.layers.0.self_attn.o_proj"],
    )
    assert attention["alias_of"] == "model.layers.0.self_attn.o_proj/0/output"
    assert (
        o_proj["local_rel_l2"] == 0 and attention["local_rel_l2"] > 1e-8
    )  # replayed Linear: exact; sdpa vs eager: not
    rows = {
        line.split("  ")[0].strip(): line.split()
        for line in format_table(result, top=200).splitlines()
    }
    header = next(cells for cells in rows.values() if cells[:2] == ["module", "kind"])
    local_column = header.index("local") - len(
        header
    )  # counted from the right: labels may hold spaces
    assert (
        rows["model.layers.0.self_attn (output = .o_proj)"][local_column]
        == f"{attention['local_rel_l2']:.3g}"
    )
    assert rows["model.layers.0.self_attn.o_proj"][local_column] == "0"
