import re
import shutil
import struct
import subprocess

import pytest

from hwdiff.errors import HwdiffError
from hwdiff.reporting import report

from .conftest import run_cli

CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from hwdiff.demo import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["--out", str(out), "-q"]) == 0
    return out


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def test_every_image_of_the_page_is_a_real_png(demo):
    page = (demo / "report" / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) >= 10 and not any(s.startswith("http") for s in sources)
    for source in sources:
        path = demo / "report" / source
        width, height = _png_size(path)
        assert width >= 400 and height >= 250 and path.stat().st_size > 10_000, source
    markdown = (demo / "report" / "report.md").read_text()
    for source in re.findall(r"\]\((figures/[^)]+)\)", markdown):
        assert (demo / "report" / source).is_file()


def test_the_page_answers_the_three_questions_up_front(demo):
    page = (demo / "report" / "index.html").read_text()
    answers = page[page.index('class="answers"') : page.index("<h2>Captures")]
    assert "model.layers.0.self_attn" in answers  # where the devices first diverge
    assert "down_proj" in answers  # the worst layers
    assert "σ_end" in answers and "from the sigma file" in answers  # which σ to use
    for title in (
        "Are QeRL",
        "Local vs propagated",
        "Cross-layer correlation",
        "σ schedule",
        "bf16 effectiveness",
    ):
        assert title in page


def test_report_without_sigma_estimates_it_and_says_so(demo, tmp_path):
    result = report(demo / "diff.h5", tmp_path / "r")
    page = result.index.read_text()
    assert "estimated here from the diff" in page and "qerl.png" in page


def test_a_failed_report_keeps_the_previous_folder(demo, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    (tmp_path / "bad.h5").write_text("not a diff")
    with pytest.raises(HwdiffError):
        report(tmp_path / "bad.h5", out)
    assert (out / "keep.txt").read_text() == "previous"
    proc = run_cli("report", tmp_path / "bad.h5", "-o", out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_page_renders_in_headless_chromium(demo, tmp_path):
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,6000",
            f"--screenshot={shot}",
            (demo / "report" / "index.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert _png_size(shot) == (1200, 6000) and shot.stat().st_size > 200_000
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            f"--user-data-dir={tmp_path / 'profile2'}",
            "--dump-dom",
            (demo / "report" / "index.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert dom.count("<img") >= 10 and "Where do the devices first diverge?" in dom


def _assert_drawn(fig, name):
    """Every axes of a figure (colorbars aside) holds data in data coordinates and has finite limits."""
    import numpy as np

    for ax in fig.axes:
        if getattr(ax, "_colorbar", None) is not None or ax.get_label() == "<colorbar>":
            continue
        lines = [
            line
            for line in ax.lines
            if line.get_transform() is ax.transData
            and np.isfinite(np.asarray(line.get_ydata(), dtype=float)).any()
        ]
        bars = [patch for patch in ax.patches if patch.get_data_transform() is ax.transData]
        assert lines or bars or ax.images, f"{name}: an axes without data ({ax.get_title()!r})"
        for limits, scale in ((ax.get_xlim(), ax.get_xscale()), (ax.get_ylim(), ax.get_yscale())):
            assert np.isfinite(limits).all(), f"{name}: infinite axis limits {limits}"
            assert scale != "log" or min(limits) > 0, f"{name}: a log axis reaching {limits}"


@pytest.fixture
def checked_figures(monkeypatch):
    """The names of the figures drawn; each is checked by _assert_drawn before it is written."""
    from hwdiff.reporting import figures

    drawn, original = [], figures._save

    def save(fig, path, **options):
        _assert_drawn(fig, path.name)
        if path.name in (
            "error_vs_depth.png",
            "one_minus_cos.png",
            "local.png",
        ):  # module names on the depth axis
            labels = [tick.get_text() for ax in fig.axes for tick in ax.get_xticklabels()]
            assert any(label.startswith("L0") for label in labels) and "lm_head" in labels, (
                path.name,
                labels,
            )
        drawn.append(path.name)
        original(fig, path, **options)

    monkeypatch.setattr(figures, "_save", save)
    return drawn


def test_a_bit_identical_diff_has_no_empty_figure_and_says_why(tmp_path, checked_figures):
    import hwdiff

    path = hwdiff.capture(
        hwdiff.load_model("tiny-qwen2"), tmp_path / "a.h5", limit=2, max_tokens=8, progress=False
    ).path
    shutil.copyfile(path, tmp_path / "b.h5")
    hwdiff.diff(path, tmp_path / "b.h5", out=tmp_path / "d.h5", progress=False)
    result = report(tmp_path / "d.h5", tmp_path / "r")
    page = result.index.read_text()
    error_figures = {
        "error_vs_depth.png",
        "one_minus_cos.png",
        "ulp.png",
        "correlation.png",
        "local.png",
        "golden.png",
    }
    assert not error_figures & set(checked_figures) and not any(
        n.startswith("errors_") for n in checked_figures
    )
    assert len(result.figures) == len(
        checked_figures
    )  # whatever is drawn (the Δlogp histogram) was checked
    assert (
        "bit-identical, there is no error to draw" in page
        and "every module output is bit-identical" in page
    )
    assert "no RMSNorm outputs" not in page


@pytest.mark.slow
def test_the_report_of_a_1_5b_width_diff_has_data_in_every_figure(
    tmp_path, monkeypatch, checked_figures
):
    """The Qwen2.5-1.5B architecture at two layers (hidden 1536, intermediate 8960, 12/2 heads,
    vocabulary 151936): the full 28 layers take ~60 s and 7 GB per capture on a CPU — too heavy
    for the test suite — while the widths, which set what the figures draw (ULP ranges of the
    151936-way head, the fits of 8960-wide activations), are those of the real model."""
    import torch

    import hwdiff
    from hwdiff.calibration import calibrate
    from hwdiff.capturing import models

    sizes = dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=2,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
    )
    monkeypatch.setitem(
        models.BUILTIN, "qwen2.5-1.5b-width", lambda attn=None: models._qwen2_config(attn, **sizes)
    )
    cap = dict(limit=1, max_tokens=8, progress=False)
    fp32 = hwdiff.load_model("qwen2.5-1.5b-width", dtype="float32")
    reference = hwdiff.capture(fp32, tmp_path / "fp32.h5", record_inputs=True, **cap).path
    golden = hwdiff.capture(fp32, tmp_path / "golden.h5", emulate=["rmsnorm-order"], **cap).path
    bf16 = fp32.to(torch.bfloat16)  # cast in place, as load_model does after its (slow) seeded init
    del fp32
    target = hwdiff.capture(bf16, tmp_path / "bf16.h5", **cap).path
    local = hwdiff.replay(bf16, reference, tmp_path / "local.h5", progress=False).path
    del bf16
    hwdiff.diff(
        reference, target, golden=golden, local=local, out=tmp_path / "d.h5", progress=False
    )
    result = report(tmp_path / "d.h5", tmp_path / "r", sigma=calibrate(tmp_path / "d.h5"))
    expected = {
        "error_vs_depth.png",
        "one_minus_cos.png",
        "ulp.png",
        "errors_0.png",
        "correlation.png",
        "local.png",
        "golden.png",
        "sigma.png",
        "qerl.png",
    }
    assert expected <= set(checked_figures) and len(result.figures) == len(checked_figures)
    page = result.index.read_text()
    assert "GPU-vs-NPU" not in page and "cpu-vs-cpu" in page and "one roundings" not in page
    assert "<th></th>" not in page and "ULP p99 (coarser dtype)" in page and "(bfloat16)" in page
