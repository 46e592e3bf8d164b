"""What both consumer checks (verl/check.py, qerl/check.py) share: their one-line failure and whether
a checkout carries hwdiff's patch, decided on a scratch copy (the checkout itself is not touched)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import types
from pathlib import Path


class CheckFailed(SystemExit):
    """The check's verdict or a refusal: one line on stderr, exit status 1."""

    def __init__(self, message: str):
        super().__init__(f"check: {message}")


def patch_state(checkout: Path, files: tuple[str, ...], patch: Path, what: str) -> str:
    """``"patched"``, ``"unpatched"`` or ``"modified"`` (the patch neither applies nor is applied) by
    ``git apply --check`` on a scratch copy of ``files``; ``what`` names the checkout in the refusal
    when one of them is missing."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in files:
            if not (checkout / name).is_file():
                raise CheckFailed(f"{checkout} is not {what}: {name} is missing")
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(checkout / name, Path(tmp) / name)
        subprocess.run(["git", "init", "-q", tmp], check=True)

        def applies(*flags: str) -> bool:
            return (
                subprocess.run(
                    ["git", "apply", "--check", *flags, str(patch)], cwd=tmp, capture_output=True
                ).returncode
                == 0
            )

        if applies("-R"):
            return "patched"
        if applies():
            return "unpatched"
    return "modified"  # neither: another commit or local changes; the simulated run decides


def std_probe_torch() -> types.ModuleType:
    """torch, except that ``torch.normal(mean, std, size)`` returns ``std`` everywhere (float64): put in
    place of a consumer's noise module's ``torch``, its draws read back the σ it asked for, exactly."""
    import torch

    class TorchProbe(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def normal(mean=0.0, std=1.0, size=None, dtype=None, **_):
            return torch.full(tuple(size), float(std), dtype=torch.float64)

    return TorchProbe("torch")


def norm_names(model) -> list[str]:
    """The RMSNorms whose σ a check compares: the class name says RMSNorm and the weight is 1-D (the rule
    hwdiff's injector matches by; written here so the checks do not take it from hwdiff)."""
    return [
        n
        for n, m in model.named_modules()
        if "rmsnorm" in type(m).__name__.lower()
        and getattr(m, "weight", None) is not None
        and m.weight.dim() == 1
    ]
