"""Check that a QeRL checkout (NVlabs/QeRL) gives every norm of a rollout model, at every step, the σ
of an hwdiff sigma.yaml.

    python integrations/qerl/check.py --qerl /path/to/QeRL --sigma sigma.yaml --model tiny-qwen2 --tree vllm

What it runs, from the checkout's own files (no vLLM, TRL or GPU needed):
1. ``qerl.py``'s ``main`` statements that decide whether AQN runs (``noise_scheduler``) and, patched,
   read hwdiff's QeRL export (``--sigma-config``); the σ arguments it passes to ``GRPOTrainer``.
2. ``GRPOTrainer.__init__``'s statements that keep them, and the AQN block of
   ``_move_peft_model_to_vllm`` (the sync QeRL runs before each step's generation; its ``llm_model``
   is ``--model``) with QeRL's own ``generate_gaussian_noise``, for every step of two epochs
   (``update_step`` restarts each epoch as QeRL's trainer sets it; ``state.global_step`` does not).
   The module's ``torch.normal`` is read through a probe returning the requested std as a constant,
   so each norm's σ is read exactly from its weight change (float64 copy of the model).
``--tree vllm`` runs it on a vLLM-style copy of the model (vLLM's class names: ``RMSNorm``;
``tests/vllm_standin.py``; Qwen2 and Llama only), which is what QeRL injects into. Each norm's σ ÷ sigma.yaml's must be 1
within 1e-5 (0 where sigma.yaml has 0). One line and a non-zero exit on the first miss; when the
checkout injects nothing at all, it says so.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import importlib.util
import io
import logging
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # integrations/checkout.py, shared by both checks
from checkout import CheckFailed, norm_names, std_probe_torch, patch_state as _patch_state  # noqa: E402, I001

UPSTREAM_COMMIT = "e8c6e7979e8aed97ee93eaabeab899ad07fe7040"
PATCH = HERE / "aqn-delivery.patch"
NOISE = "trl_trainer/noise_scheduler.py"
TRAINER = "trl_trainer/grpo_trainer.py"
MAIN = "qerl.py"
PATCHED = (MAIN, TRAINER, NOISE, "utils/configs.py")
TOLERANCE = 1e-5


def patch_state(qerl: Path) -> str:
    """``"patched"``, ``"unpatched"`` or ``"modified"`` (:func:`checkout.patch_state`)."""
    return _patch_state(qerl, PATCHED, PATCH, "a QeRL checkout")


def _lines(qerl: Path, name: str) -> tuple[list[str], ast.Module]:
    text = (qerl / name).read_text()
    return text.splitlines(), ast.parse(text)


def _mentions(lines: list[str], node: ast.AST, *words: str) -> bool:
    source = "\n".join(lines[node.lineno - 1 : node.end_lineno])
    return any(word in source for word in words)


def _code(stmts: list[ast.stmt], filename: str):
    return compile(
        ast.fix_missing_locations(ast.Module(body=stmts, type_ignores=[])), filename, "exec"
    )


def _function(tree: ast.Module, name: str, cls: str | None = None) -> ast.FunctionDef:
    scope = (
        tree.body
        if cls is None
        else next(n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    )
    return next(n for n in scope if isinstance(n, ast.FunctionDef) and n.name == name)


@contextlib.contextmanager
def qerl_modules(qerl: Path):
    """QeRL's noise_scheduler.py as ``trl_trainer.noise_scheduler``, its ``torch.normal`` read by a probe."""
    spec = importlib.util.spec_from_file_location("trl_trainer.noise_scheduler", qerl / NOISE)
    noise = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(noise)
    noise.torch = std_probe_torch()
    package = types.ModuleType("trl_trainer")
    package.noise_scheduler = noise
    saved = {name: sys.modules.get(name) for name in ("trl_trainer", "trl_trainer.noise_scheduler")}
    sys.modules.update({"trl_trainer": package, "trl_trainer.noise_scheduler": noise})
    try:
        yield noise
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def trainer_arguments(qerl: Path, model_args: types.SimpleNamespace) -> tuple[bool, dict]:
    """``qerl.py``'s decision to inject and the σ keyword arguments it gives ``GRPOTrainer``."""
    lines, tree = _lines(qerl, MAIN)
    main = _function(tree, "main")
    build = next(i for i, s in enumerate(main.body) if _mentions(lines, s, "AutoModelForCausalLM"))
    scope = {"model_args": model_args}
    exec(
        _code(
            [s for s in main.body[:build] if _mentions(lines, s, "noise_scheduler", "sigma")],
            str(qerl / MAIN),
        ),
        scope,
    )
    call = next(
        n
        for n in ast.walk(main)
        if isinstance(n, ast.Call) and _mentions(lines, n.func, "GRPOTrainer")
    )
    kwargs = {
        k.arg: eval(compile(ast.Expression(k.value), str(qerl / MAIN), "eval"), scope)  # noqa: S307
        for k in call.keywords
        if k.arg
        in ("sigma_start", "sigma_end", "num_stages", "noise_scheduler", "sigma_multipliers")
    }
    return bool(scope.get("noise_scheduler")), kwargs


class Trainer:
    """Stand-in ``GRPOTrainer``: its σ statements and its rollout AQN block, from grpo_trainer.py."""

    def __init__(self, qerl: Path, kwargs: dict, model, noise, total_steps: int):
        lines, tree = _lines(qerl, TRAINER)
        init = _function(tree, "__init__", "GRPOTrainer")
        names = [a.arg for a in init.args.args + init.args.kwonlyargs]
        scope = {"self": self, **{n: kwargs.get(n) for n in names if n != "self"}}
        exec(
            _code(
                [
                    s
                    for s in init.body
                    if isinstance(s, ast.Assign)
                    and _mentions(lines, s, "sigma", "noise_scheduler", "num_stages")
                    and not _mentions(lines, s, "args.")
                ],
                str(qerl / TRAINER),
            ),
            scope,
        )
        sync = _function(tree, "_move_peft_model_to_vllm", "GRPOTrainer")
        self.block = _code(
            [
                s
                for s in sync.body
                if isinstance(s, ast.If) and _mentions(lines, s.test, "noise_scheduler")
            ],
            str(qerl / TRAINER),
        )
        runner = types.SimpleNamespace(model=model)
        self.llm = types.SimpleNamespace(
            llm_engine=types.SimpleNamespace(
                model_executor=types.SimpleNamespace(
                    driver_worker=types.SimpleNamespace(model_runner=runner)
                )
            )
        )
        self.state = types.SimpleNamespace(global_step=0)
        self.update_step, self.total_steps = 0, total_steps
        self.namespace = {
            "np": np,
            "print": lambda *a, **k: None,
            **{n: getattr(noise, n) for n in dir(noise) if not n.startswith("_")},
        }

    def sync(self) -> None:
        exec(self.block, {**self.namespace, "self": self})


def simulate(
    qerl: Path, calibration, export_path: Path, model, model_name: str, epochs: int = 2
) -> tuple[list, int]:
    """σ per norm QeRL adds at each step's sync: [(step, {norm: σ})], and the total steps."""
    model = copy.deepcopy(model).double()
    names = norm_names(model)
    clean = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in names}
    s = calibration.schedule
    model_args = types.SimpleNamespace(
        model_name=model_name,
        sigma_start=s.sigma_start,
        sigma_end=s.sigma_end,
        num_stages=s.num_stages,
        sigma_config=str(export_path),
    )
    with qerl_modules(qerl) as noise, contextlib.redirect_stdout(io.StringIO()):
        inject, kwargs = trainer_arguments(qerl, model_args)
        if not inject:
            raise CheckFailed(
                f"QeRL injects nothing for model name {model_name!r}: it runs AQN only when the name "
                f"contains 'nvfp4'{'' if 'sigma_multipliers' in kwargs else ' (patched: or with --sigma-config)'}"
            )
        per_epoch = 2 * int(kwargs["num_stages"]) // epochs
        total = per_epoch * epochs
        trainer = Trainer(qerl, kwargs, model, noise, total)
        out = []
        for step in range(1, total + 1):
            trainer.state.global_step = step - 1  # optimizer steps done before this step's rollout
            trainer.update_step = (step - 1) % per_epoch + 1  # QeRL's per-epoch counter
            trainer.sync()
            weights = {n: m.weight.detach() for n, m in model.named_modules() if n in clean}
            out.append((step, {n: float((weights[n] - clean[n]).abs().max()) for n in names}))
    return out, total


def check(
    qerl: Path, calibration, model, model_name: str = "model-nvfp4", export_path: Path | None = None
) -> list[str]:
    """Rows of a passing check; CheckFailed (one line) otherwise."""
    from hwdiff.calibration.exporters import export

    state = patch_state(qerl)
    hint = {
        "patched": "",
        "unpatched": f" ({qerl} is not patched: git apply {PATCH})",
        "modified": f" ({PATCH.name} neither applies to {qerl} nor is applied there)",
    }[state]
    missing = set(norm_names(model)) ^ (
        {l.name for l in calibration.layers} | set(calibration.skipped)
    )
    if missing:
        raise CheckFailed(
            f"the model's norms differ from sigma.yaml's ({len(missing)}, first {sorted(missing)[0]})"
        )
    exporters = logging.getLogger("hwdiff.calibration.exporters")
    level = exporters.level
    with tempfile.TemporaryDirectory() as tmp:
        exporters.setLevel(
            logging.ERROR
        )  # its warnings describe QeRL as published: this check says what it finds
        try:
            path = export_path or export(calibration, "qerl", Path(tmp) / "sigma.qerl.yaml")
        finally:
            exporters.setLevel(level)
        runs, total = simulate(qerl, calibration, path, model, model_name)
    names = norm_names(model)
    want_any = any(calibration.schedule_for(n) for n in names)
    if want_any and not any(sigma for _, sigmas in runs for sigma in sigmas.values()):
        raise CheckFailed(
            f"QeRL injects nothing into this model: none of its {len(names)} RMSNorms "
            f"({', '.join(sorted({type(m).__name__ for n, m in model.named_modules() if n in names}))}) "
            f"is selected{hint}"
        )
    worst: dict[int, float] = {}
    for step, sigmas in runs:
        stage = min(calibration.schedule.stage(step, total), calibration.schedule.num_stages - 1)
        for name, got in sigmas.items():
            schedule = calibration.schedule_for(name)
            want = 0.0 if schedule is None else schedule.at(step, total)
            if (got != 0) if want == 0 else abs(got / want - 1) > TOLERANCE:
                raise CheckFailed(
                    f"step {step}/{total} (stage {stage}): {name} gets sigma {got:.6g} in QeRL, sigma.yaml "
                    f"says {want:.6g}{hint}"
                )
            if want:
                worst[stage] = max(worst.get(stage, 0.0), abs(got / want - 1))
    if state == "unpatched":
        raise CheckFailed(
            f"{qerl} is not patched (git apply {PATCH}), though this run matched sigma.yaml"
        )
    rows = [
        f"stage {k}: every norm within {TOLERANCE:g} of sigma.yaml (max |ratio-1| {v:.2g})"
        for k, v in sorted(worst.items())
    ]
    return rows + [
        f"ok: {qerl} gives each of {len(names)} norms sigma.yaml's sigma at every step of {total} (2 epochs)"
    ]


def main(argv: list[str] | None = None) -> int:
    if (
        HERE.parents[1] / "hwdiff" / "__init__.py"
    ).is_file():  # check this checkout's hwdiff, not another install
        sys.path.insert(0, str(HERE.parents[1]))
    from hwdiff.errors import HwdiffError

    try:
        return _main(argv)
    except (
        HwdiffError
    ) as exc:  # a bad sigma.yaml, export or model: one line, as hwdiff's CLI says it
        raise CheckFailed(" ".join(str(exc).split())) from None


def vllm_tree(model):
    """The vLLM-style copy of ``model`` (tests/vllm_standin.py), or CheckFailed for a family it does not build."""
    sys.path.insert(0, str(HERE.parents[1]))
    from tests import vllm_standin

    family = type(model).__name__
    if family not in ("Qwen2ForCausalLM", "LlamaForCausalLM"):  # the families from_hf builds
        raise CheckFailed(
            f"--tree vllm builds the vLLM stand-in of Qwen2 and Llama only, not {family}: run with "
            f"--tree hf (the patched QeRL selects norms by class name on either tree)"
        )
    return vllm_standin.from_hf(model)


def read_export(path: Path) -> dict:
    """A QeRL export (``--sigma-qerl``) as the patched QeRL reads it, or HwdiffError (one line) when it cannot."""
    import yaml

    from hwdiff.errors import HwdiffError

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise HwdiffError(f"cannot read QeRL export {path}: {' '.join(str(exc).split())}") from None
    keys = ("sigma_start", "sigma_end", "num_stages", "norm_multipliers")
    if not isinstance(data, dict) or any(key not in data for key in keys):
        raise HwdiffError(
            f"{path} is not an hwdiff QeRL export: expected the keys {', '.join(keys)} "
            f"(hwdiff calibrate --export qerl writes it)"
        )
    try:  # the conversions load_sigma_config (the patch) makes
        float(data["sigma_start"]), float(data["sigma_end"]), int(data["num_stages"])
        {str(name): float(m) for name, m in data["norm_multipliers"].items()}
    except (AttributeError, TypeError, ValueError) as exc:
        raise HwdiffError(f"{path}: malformed QeRL export ({exc})") from None
    return data


def _main(argv: list[str] | None) -> int:
    import hwdiff
    from hwdiff.calibration import load_sigma

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--qerl", type=Path, default=HERE / "upstream", help="QeRL checkout (default: upstream/)"
    )
    parser.add_argument(
        "--sigma", type=Path, required=True, help="hwdiff sigma.yaml: the sigma each norm must get"
    )
    parser.add_argument(
        "--sigma-qerl", type=Path, help="the QeRL export to run (default: written from --sigma)"
    )
    parser.add_argument(
        "--model",
        default="tiny-qwen2",
        help="model whose norms sigma.yaml names (default: %(default)s)",
    )
    parser.add_argument(
        "--model-name", default="model-nvfp4", help="QeRL's --model_name (default: %(default)s)"
    )
    parser.add_argument(
        "--tree",
        choices=("hf", "vllm"),
        default="vllm",
        help="inject into the HF model or a vLLM-style copy (tests/vllm_standin.py; default: %(default)s)",
    )
    args = parser.parse_args(argv)
    calibration = load_sigma(args.sigma)
    if args.sigma_qerl:
        read_export(args.sigma_qerl)
    model = hwdiff.load_model(args.model, dtype="float32")
    if args.tree == "vllm":
        model = vllm_tree(model)
    print("\n".join(check(args.qerl, calibration, model, args.model_name, args.sigma_qerl)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
