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
    answers = page[page.index('class="answers"'):page.index("<h2>Captures")]
    assert "model.layers.0.self_attn" in answers  # where the devices first diverge
    assert "down_proj" in answers  # the worst layers
    assert "σ_end" in answers and "from the sigma file" in answers  # which σ to use
    for title in ("Are QeRL", "Local vs propagated", "Cross-layer correlation", "σ schedule", "bf16 effectiveness"):
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
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,6000", f"--screenshot={shot}",
                    (demo / "report" / "index.html").as_uri()], capture_output=True, timeout=120, check=True)
    assert _png_size(shot) == (1200, 6000) and shot.stat().st_size > 200_000
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile2'}",
                          "--dump-dom", (demo / "report" / "index.html").as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert dom.count("<img") >= 10 and "Where do the devices first diverge?" in dom
