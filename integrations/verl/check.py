"""Check hwdiff's verl integration against the verl fork (zhshgmail/verl, branch feature/npu-aqn-test).

    python integrations/verl/check.py                     # against the copies in upstream/ (commit below)
    python integrations/verl/check.py --verl /path/verl   # against your checkout of the fork
    python integrations/verl/check.py --sigma-verl demo/sigma.verl.yaml --model tiny-qwen2

1. ``layer-sigma-config.patch`` applies cleanly (``git apply --check``) to the fork's files.
2. The fork's own ``generate_expert_gaussian_noise`` (imported from its noise_injection.py, which
   needs only torch), run with the block of an hwdiff verl export exactly as the fork's rollout
   parses it, gives every norm the σ hwdiff intended: global σ × its layer's multiplier, nothing on
   excluded classes. Exits non-zero, one line, when either check fails.
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
UPSTREAM_COMMIT = "cfb21db5062f6092e70db67f53f77e80cd899cf3"
FILES = ("verl/trainer/ppo/ray_trainer.py", "verl/workers/config/rollout.py", "verl/utils/noise_injection.py")


def patch_applies(verl: Path) -> None:
    """``git apply --check`` of the patch in a scratch copy of the three files (the checkout is not touched)."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in FILES:
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(verl / name, Path(tmp) / name)
        subprocess.run(["git", "init", "-q", tmp], check=True)
        proc = subprocess.run(["git", "apply", "--check", str(HERE / "layer-sigma-config.patch")], cwd=tmp,
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"check: the patch does not apply to {verl}: {proc.stderr.strip()}")


def fork_noise_module(verl: Path):
    spec = importlib.util.spec_from_file_location("fork_noise_injection", verl / "verl/utils/noise_injection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def realized_sigmas(verl: Path, block: dict, model, *, sigma: float, draws: int = 8) -> dict[str, float]:
    """Std of the noise the fork's code adds to each norm weight with ``block``'s settings at a
    constant stage σ (the rollout's parsing: empty lists → None, multiplier keys → str), pooled over
    ``draws`` calls from the clean weights (seeds 0 … draws−1)."""
    import torch

    fork = fork_noise_module(verl)
    layer_config = dict(block["layer_sigma_config"])
    layer_config["layer_multipliers"] = {str(k): v for k, v in layer_config["layer_multipliers"].items()}
    norms = {n: m for n, m in model.named_modules() if "rmsnorm" in type(m).__name__.lower()}
    with torch.no_grad():
        for m in norms.values():  # float32 weights: the fork's bf16 add would round small σ away
            m.weight.data = m.weight.data.float()
    clean = {n: m.weight.detach().double().clone() for n, m in norms.items()}
    power = dict.fromkeys(norms, 0.0)
    for seed in range(draws):
        with torch.no_grad():
            for n, m in norms.items():
                m.weight.data.copy_(clean[n])
            torch.manual_seed(seed)
            fork.generate_expert_gaussian_noise(
                model, step=1, total_step=2, sigma_trend=[sigma],
                target_modules=list(block["target_modules"]) or None,
                exclude_patterns=list(block["exclude_patterns"]) or None,
                layer_types=list(block["layer_types"]) or None, layer_sigma_config=layer_config, verbose=False)
        for n, m in norms.items():
            power[n] += float((m.weight.detach().double() - clean[n]).pow(2).mean()) / draws
    return {n: power[n] ** 0.5 for n in norms}


def intended(block: dict, names: list[str], sigma: float) -> dict[str, float]:
    """σ per norm that hwdiff's export means: 0 on excluded patterns, else σ × its layer's multiplier."""
    import re

    config = block["layer_sigma_config"]
    out = {}
    for name in names:
        if any(pattern in name for pattern in block["exclude_patterns"]):
            out[name] = 0.0
            continue
        match = re.search(r"layers\.(\d+)\.", name)
        key = match.group(1) if match else None
        out[name] = sigma * float(config["layer_multipliers"].get(key, config["default_multiplier"]))
    return out


def check_export(verl: Path, sigma_verl: Path, model_spec: str, draws: int = 8) -> list[str]:
    """Rows of (norm, intended σ, σ the fork applied); raises SystemExit on a mismatch."""
    import yaml

    import hwdiff

    block = yaml.safe_load(sigma_verl.read_text())["trainer"]["noise_injection"]
    if not isinstance(block.get("target_modules"), list):
        raise SystemExit(f"check: target_modules must be a list (null crashes the fork's rollout), got {block.get('target_modules')!r}")
    sigma = 1e-2
    model = hwdiff.load_model(model_spec, dtype="float32")
    applied = realized_sigmas(verl, block, model, sigma=sigma, draws=draws)
    wanted = intended(block, list(applied), sigma)
    sizes = {n: m.weight.numel() for n, m in model.named_modules() if n in applied}
    rows = []
    for name, value in applied.items():
        tolerance = 4 / (2 * sizes[name] * draws) ** 0.5  # four standard errors of a pooled sample std
        ok = value == 0 if wanted[name] == 0 else abs(value / wanted[name] - 1) < tolerance
        rows.append(f"{name:<45} intended {wanted[name]:.4g}  applied {value:.4g}  {'ok' if ok else 'MISMATCH'}")
        if not ok:
            raise SystemExit(f"check: the fork applied sigma {value:.4g} to {name}, hwdiff meant {wanted[name]:.4g}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verl", type=Path, default=HERE / "upstream", help="checkout of the fork (default: upstream/)")
    parser.add_argument("--sigma-verl", type=Path, default=None, help="an hwdiff verl export (SIGMA.verl.yaml) to run")
    parser.add_argument("--model", default="tiny-qwen2", help="model for --sigma-verl (default: %(default)s)")
    args = parser.parse_args(argv)
    patch_applies(args.verl)
    print(f"ok: layer-sigma-config.patch applies to {args.verl}")
    if args.sigma_verl:
        print("\n".join(check_export(args.verl, args.sigma_verl, args.model)))
        print(f"ok: the fork's generate_expert_gaussian_noise applies the sigma of {args.sigma_verl} as intended")
    return 0


if __name__ == "__main__":
    sys.exit(main())
