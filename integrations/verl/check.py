"""Check that a checkout of the verl fork (zhshgmail/verl, branch feature/npu-aqn-test) gives every
norm, at every step of a run, the σ of an hwdiff sigma.yaml.

    python integrations/verl/check.py --verl /path/to/verl --sigma sigma.yaml --model tiny-qwen2
    python integrations/verl/check.py --sigma sigma.yaml --model M --overrides lines.txt   # lines you pass

What it runs, all from the checkout's own files (no Ray, vLLM, Hydra or GPU needed):
1. The fork's ``ppo_trainer.yaml`` trainer defaults, with ``--base-config`` (an older
   ``trainer.noise_injection`` block of yours) merged on top, then hwdiff's ``++`` lines (the ones
   ``hwdiff calibrate --export verl`` prints for sigma.yaml, or ``--overrides``) applied with Hydra's
   rules (``++`` sets or adds; a dict merges into a dict, anything else replaces).
2. ``RayPPOTrainer``'s own statements that read ``trainer.noise_injection``, size the run
   (``_create_dataloader``'s total steps), copy the settings into the rollout config
   (``init_workers``), set the rollout's step (``fit``'s loop, after the actor update, ``_validate``),
   executed from ray_trainer.py's source on a stand-in trainer; the rollout config built as the
   fork's ``RolloutConfig`` dataclass (rollout.py).
3. ``vLLMAsyncRollout``'s own noise code (vllm_rollout.py: its config parsing, clean-weight cache,
   restore and ``_aqn_apply_noise``) and ``generate_expert_gaussian_noise`` (noise_injection.py) on
   ``--model`` at every weight sync of a simulated run — 2 epochs with ``trainer.total_training_steps``
   set to one epoch, validation every few steps, and a second run resumed from a checkpoint halfway.
   The fork's ``torch.normal`` is read through a probe that returns the requested std as a constant,
   so each norm's σ is read exactly from its weight change (float64 copy of the model).
Each norm's σ at each sync ÷ sigma.yaml's σ at that step must be 1 within 1e-5 (0 where sigma.yaml
has 0, and 0 on validation rollouts). Exits non-zero with one line on the first miss; an
unpatched checkout always fails, with the first norm it gets wrong and the patch to apply.
Not run: Ray's dispatch (the worker's one-line forward of ``update_noise_injection_step`` is
reproduced), vLLM's weight loading (a full sync reloads the clean weights, later syncs take the
fork's LoRA path: restore from its cache), Hydra's config composition beyond the override rules above.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import copy
import dataclasses
import importlib.util
import io
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # integrations/checkout.py, shared by both checks
from checkout import CheckFailed, norm_names, std_probe_torch, patch_state as _patch_state  # noqa: E402, I001

UPSTREAM_COMMIT = "cfb21db5062f6092e70db67f53f77e80cd899cf3"
PATCH = HERE / "aqn-delivery.patch"
TRAINER = "verl/trainer/ppo/ray_trainer.py"
ROLLOUT_CONFIG = "verl/workers/config/rollout.py"
NOISE = "verl/utils/noise_injection.py"
ROLLOUT = "verl/workers/rollout/vllm_rollout/vllm_rollout.py"
TRAINER_YAML = "verl/trainer/config/ppo_trainer.yaml"
PATCHED = (TRAINER, ROLLOUT_CONFIG, NOISE)
TOLERANCE = 1e-5


def patch_state(verl: Path) -> str:
    """``"patched"``, ``"unpatched"`` or ``"modified"`` (:func:`checkout.patch_state`)."""
    return _patch_state(verl, PATCHED, PATCH, "a checkout of the fork")


# ---------------------------------------------------------------- config (Hydra's override rules)
class Node(dict):
    """An OmegaConf-like node: attribute access, ``.get``."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        self[key] = value


def node(value):
    if isinstance(value, dict):
        return Node({k: node(v) for k, v in value.items()})
    if isinstance(value, list):
        return [node(v) for v in value]
    return value


def merge(dst: Node, src: dict) -> None:
    """OmegaConf's merge: dicts merge key by key, lists and values replace."""
    for key, value in src.items():
        if isinstance(dst.get(key), dict) and isinstance(value, dict):
            merge(dst[key], value)
        else:
            dst[key] = node(value)


def override_value(text: str):
    """A Hydra override value: Python-literal scalars, quoted strings and lists; anything else a string.
    A list or dict that is not a Python literal (e.g. unquoted strings, which Hydra accepts) is refused
    rather than read as one string, which the fork would match character by character."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if text.strip()[:1] in "[{":
            raise CheckFailed(
                f"cannot read {text[:60]!r} as Hydra would: check.py reads lists and dicts as Python "
                f"literals (quote every string, as hwdiff's ++ lines do)"
            ) from None
        return {"true": True, "false": False, "null": None}.get(text.lower(), text)


def apply_overrides(config: Node, lines: list[str]) -> None:
    for raw in lines:
        line = raw.strip().rstrip("\\").strip().strip("'")
        if not line:
            continue
        if not line.startswith("++") or "=" not in line:
            raise CheckFailed(f"not a '++key=value' Hydra override: {raw.strip()}")
        key, text = line[2:].split("=", 1)
        *path, last = key.split(".")
        target = config
        for part in path:
            target = target.setdefault(part, Node())
        value = node(override_value(text))
        if isinstance(target.get(last), dict) and isinstance(value, dict):
            merge(target[last], value)
        else:
            target[last] = value


def compose(verl: Path, overrides: list[str], base: dict | None) -> Node:
    import yaml

    trainer = yaml.safe_load((verl / TRAINER_YAML).read_text())["trainer"]
    config = node({"trainer": trainer, "actor_rollout_ref": {"rollout": {}}})
    if base:
        merge(config.trainer.setdefault("noise_injection", Node()), base)
    apply_overrides(config, overrides)
    return config


# ---------------------------------------------------------------- the fork's own statements
def _tree(verl: Path, name: str) -> tuple[str, ast.Module]:
    text = (verl / name).read_text()
    return text, ast.parse(text)


def _function(
    tree: ast.Module, cls: str, name: str
) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    for item in tree.body:
        if isinstance(item, ast.ClassDef) and item.name == cls:
            for f in item.body:
                if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.name == name:
                    return f
    return None


def _mentions(text: str | list[str], stmt: ast.AST, *words: str) -> bool:
    """Whether the source lines of ``stmt`` contain one of ``words`` (``text``: the file or its lines)."""
    lines = text.splitlines() if isinstance(text, str) else text
    source = "\n".join(lines[stmt.lineno - 1 : stmt.end_lineno])
    return any(word in source for word in words)


def _code(stmts: list[ast.stmt], filename: str):
    module = ast.Module(body=stmts, type_ignores=[])
    return compile(ast.fix_missing_locations(module), filename, "exec")


def _bind(
    obj,
    text: str,
    tree: ast.Module,
    cls: str,
    names: tuple[str, ...],
    namespace: dict,
    filename: str,
) -> None:
    for name in names:
        function = _function(tree, cls, name)
        if function is None:
            continue
        scope = dict(namespace)
        exec(_code([function], filename), scope)
        setattr(obj, name, types.MethodType(scope[name], obj))


@contextlib.contextmanager
def fork_modules(verl: Path):
    """``verl.utils.noise_injection`` imported from the checkout, with a σ probe for ``torch.normal``;
    ``omegaconf`` / ``verl.base_config`` / ``verl.utils.profiler`` stand-ins for rollout.py's imports."""
    spec = importlib.util.spec_from_file_location("verl.utils.noise_injection", verl / NOISE)
    noise = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(noise)
    noise.torch = std_probe_torch()
    omegaconf = types.ModuleType("omegaconf")
    omegaconf.MISSING = "???"
    omegaconf.open_dict = lambda config: contextlib.nullcontext(config)
    base_config = types.ModuleType("verl.base_config")
    base_config.BaseConfig = type("BaseConfig", (), {})
    profiler = types.ModuleType("verl.utils.profiler")
    profiler.ProfilerConfig = type("ProfilerConfig", (), {})
    verl_pkg, utils = types.ModuleType("verl"), types.ModuleType("verl.utils")
    verl_pkg.utils, utils.noise_injection, utils.profiler = utils, noise, profiler
    stand_ins = {
        "verl": verl_pkg,
        "verl.utils": utils,
        "verl.utils.noise_injection": noise,
        "verl.base_config": base_config,
        "verl.utils.profiler": profiler,
        "omegaconf": omegaconf,
    }
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        yield noise
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class Trainer:
    """Stand-in ``RayPPOTrainer``: the fork's noise statements run on it (``self`` in its source)."""

    def __init__(self, verl: Path, config: Node, steps_per_epoch: int, worker):
        self.verl, self.config = verl, config
        self.train_dataloader = range(steps_per_epoch)
        self.actor_rollout_wg = types.SimpleNamespace(
            execute_all_async=lambda method, **kw: getattr(worker, method)(**kw)
        )
        text, self.tree = _tree(verl, TRAINER)
        self.text = text.splitlines()
        self.hooks: dict[str, object] = {}
        self.namespace = {
            "ray": types.SimpleNamespace(get=lambda value: value),
            "print": lambda *a, **k: None,
            "OmegaConf": None,
            "open_dict": lambda config: contextlib.nullcontext(config),
        }
        _bind(
            self,
            self.text,
            self.tree,
            "RayPPOTrainer",
            ("_aqn_set_rollout_step",),
            self.namespace,
            TRAINER,
        )

    def run(self, stmts: list[ast.stmt]) -> None:
        exec(_code(stmts, str(self.verl / TRAINER)), {**self.namespace, "self": self})

    def hook(self, name: str, find) -> None:
        """Run the statements ``find()`` picks from the fork's source (found and compiled once)."""
        if name not in self.hooks:
            self.hooks[name] = _code(find(), str(self.verl / TRAINER))
        exec(self.hooks[name], {**self.namespace, "self": self})

    def setup(self) -> None:
        """``__init__``'s noise statements around ``_create_dataloader``'s total steps, then ``init_workers``' copy."""
        init = _function(self.tree, "RayPPOTrainer", "__init__")
        split = next(
            i
            for i, s in enumerate(init.body)
            if _mentions(self.text, s, "self._create_dataloader(")
        )
        noise = [
            (i, s) for i, s in enumerate(init.body) if _mentions(self.text, s, "noise_injection")
        ]
        self.run([s for i, s in noise if i < split])
        loader = _function(self.tree, "RayPPOTrainer", "_create_dataloader")
        self.run(
            [
                s
                for s in loader.body
                if isinstance(s, (ast.Assign, ast.If))
                and _mentions(self.text, s, "total_training_steps")
            ]
        )
        self.run([s for i, s in noise if i > split])
        workers = _function(self.tree, "RayPPOTrainer", "init_workers")
        self.run(
            [
                s
                for s in workers.body
                if isinstance(s, ast.If) and _mentions(self.text, s, "noise_injection")
            ]
        )

    def _fit_loop(self) -> ast.For:
        fit = _function(self.tree, "RayPPOTrainer", "fit")
        return next(
            n
            for n in ast.walk(fit)
            if isinstance(n, ast.For) and _mentions(self.text, n.iter, "train_dataloader")
        )

    def before_generation(self) -> None:
        """``fit``'s noise statements at the top of a step, before the step's rollout."""

        def find():
            body = self._fit_loop().body
            step = next(
                i
                for i, s in enumerate(body)
                if isinstance(s, ast.With) and _mentions(self.text, s, '"step"')
            )
            return [s for s in body[:step] if _mentions(self.text, s, "noise", "_aqn")]

        self.hook("before_generation", find)

    def after_update(self) -> None:
        """``fit``'s block after the actor update that sends the step to the rollout workers."""
        self.hook(
            "after_update",
            lambda: [
                n
                for n in ast.walk(self._fit_loop())
                if isinstance(n, ast.If)
                and _mentions(self.text, n.test, "noise_injection_enabled")
                and _mentions(self.text, n, "update_noise_injection_step")
            ],
        )

    def validate(self) -> None:
        """``_validate``'s noise statements before its first validation batch."""

        def find():
            body = _function(self.tree, "RayPPOTrainer", "_validate").body
            first_loop = next(i for i, s in enumerate(body) if isinstance(s, ast.For))
            return [s for s in body[:first_loop] if _mentions(self.text, s, "noise", "_aqn")]

        self.hook("validate", find)


class Worker:
    """The fork's ``AsyncActorRolloutRefWorker.update_noise_injection_step`` (fsdp_workers.py): a forward."""

    def __init__(self):
        self.rollout = None

    def update_noise_injection_step(self, current_step: int):
        if hasattr(self.rollout, "update_noise_injection_step"):
            asyncio.run(self.rollout.update_noise_injection_step(current_step))
        return True


class Rollout:
    """Stand-in ``vLLMAsyncRollout``: its ``__init__`` noise statements and AQN methods, from vllm_rollout.py."""

    METHODS = (
        "_parse_layer_sigma_config",
        "_aqn_cache_clean_weights",
        "_aqn_restore_clean_weights",
        "_aqn_apply_noise",
        "update_noise_injection_step",
    )

    def __init__(self, verl: Path, config):
        import logging

        import torch

        text, tree = _tree(verl, ROLLOUT)
        namespace = {
            "torch": torch,
            "logger": logging.getLogger("fork.vllm_rollout"),
            "print": lambda *a, **k: None,
        }
        _bind(self, text, tree, "vLLMAsyncRollout", self.METHODS, namespace, str(verl / ROLLOUT))
        init = _function(tree, "vLLMAsyncRollout", "__init__")
        stmts = [
            s for s in init.body if _mentions(text, s, "noise_injection", "epoch_ranges", "_aqn_")
        ]
        exec(_code(stmts, str(verl / ROLLOUT)), {**namespace, "self": self, "config": config})
        self.synced = False

    def sync(self, model, clean: dict) -> None:
        """A weight sync: the first a full one (clean weights loaded, cached, noised), later ones the
        fork's LoRA path (restore from its cache, noise)."""
        import torch

        with torch.no_grad():
            if not self.synced:
                for name, module in model.named_modules():
                    if name in clean:
                        module.weight.copy_(clean[name])
                self._aqn_cache_clean_weights(model)
            else:
                self._aqn_restore_clean_weights(model)
        self._aqn_apply_noise(model)
        self.synced = True


def rollout_config(verl: Path, rollout: Node):
    """The rollout section as the fork's ``RolloutConfig`` dataclass (an unknown key fails as it does there)."""
    text, tree = _tree(verl, ROLLOUT_CONFIG)
    module = types.ModuleType("fork_rollout_config")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    try:
        exec(compile(tree, str(verl / ROLLOUT_CONFIG), "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    try:
        return module.RolloutConfig(
            **{k: v for k, v in rollout.items() if k.startswith("noise_injection")}
        )
    except TypeError as exc:
        raise CheckFailed(f"the fork's RolloutConfig refuses the rollout settings: {exc}") from None


# ---------------------------------------------------------------- a simulated run
@dataclasses.dataclass(frozen=True)
class Sync:
    phase: str  # "train" or "validation"
    step: int
    sigmas: dict  # norm → σ the fork added


def simulate(
    verl: Path, config: Node, model, *, steps_per_epoch: int, test_freq: int, start: int = 0
) -> list[Sync]:
    """One run of the fork's trainer and rollout from ``start`` (a checkpoint's global step, 0: fresh)."""
    model = copy.deepcopy(model).double()
    names = norm_names(model)
    clean = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in names}
    worker = Worker()
    trainer = Trainer(verl, config, steps_per_epoch, worker)
    out: list[Sync] = []

    def sync(phase: str, step: int) -> None:
        worker.rollout.sync(model, clean)
        weights = {n: m.weight.detach() for n, m in model.named_modules() if n in clean}
        out.append(
            Sync(phase, step, {n: float((weights[n] - clean[n]).abs().max()) for n in names})
        )

    with fork_modules(verl), contextlib.redirect_stdout(io.StringIO()):
        trainer.setup()
        worker.rollout = Rollout(verl, rollout_config(verl, config.actor_rollout_ref.rollout))
        trainer.global_steps = (
            start  # fit(): _load_checkpoint sets it, then validation before training
        )
        trainer.validate()
        sync("validation", start)
        total = trainer.total_training_steps
        for step in range(start + 1, total + 1):
            trainer.global_steps = step
            trainer.before_generation()
            sync("train", step)
            trainer.after_update()
            if step % test_freq == 0 or step == total:
                trainer.validate()
                sync("validation", step)
    return out


def expected(calibration, name: str, phase: str, step: int, total: int) -> float:
    """σ of ``name`` at ``step`` of ``total`` in sigma.yaml (0 on validation rollouts and for skipped norms)."""
    schedule = calibration.schedule_for(name)
    return 0.0 if phase == "validation" or schedule is None else schedule.at(step, total)


def compare(calibration, runs: list[list[Sync]], total: int, hint: str = "") -> list[str]:
    """Rows per stage (max |σ_fork/σ_yaml − 1|); CheckFailed at the first norm outside the tolerance."""
    stages: dict[int, float] = {}
    for run in runs:
        for sync in run:
            stage = min(
                calibration.schedule.stage(sync.step, total), calibration.schedule.num_stages - 1
            )
            for name, got in sync.sigmas.items():
                want = expected(calibration, name, sync.phase, sync.step, total)
                miss = got != 0 if want == 0 else abs(got / want - 1) > TOLERANCE
                if miss:
                    raise CheckFailed(
                        f"{sync.phase} rollout of step {sync.step}/{total} (stage {stage}): {name} gets "
                        f"sigma {got:.6g} in the fork, sigma.yaml says {want:.6g}{hint}"
                    )
                if want and sync.phase == "train":
                    stages[stage] = max(stages.get(stage, 0.0), abs(got / want - 1))
    return [
        f"stage {k}: every norm within {TOLERANCE:g} of sigma.yaml (max |ratio-1| {v:.2g})"
        for k, v in sorted(stages.items())
    ]


def check(
    verl: Path, calibration, model, overrides: list[str] | None = None, base: dict | None = None
) -> list[str]:
    """Rows of a passing check; CheckFailed (one line) otherwise. ``overrides`` None: hwdiff's lines for ``calibration``."""
    from hwdiff.calibration.exporters import hydra_overrides

    state = patch_state(verl)
    hint = {
        "patched": "",
        "unpatched": f" ({verl} is not patched: git apply {PATCH})",
        "modified": f" ({PATCH.name} neither applies to {verl} nor is applied there)",
    }[state]
    config = compose(verl, hydra_overrides(calibration) if overrides is None else overrides, base)
    block = config.trainer.noise_injection
    for key, kind in (("num_stages", int), ("sigma_start", float), ("sigma_end", float)):
        try:
            kind(block.get(key, 10 if key == "num_stages" else 0.0))
        except (TypeError, ValueError):
            raise CheckFailed(
                f"trainer.noise_injection.{key} = {block.get(key)!r} is not a number (the fork computes "
                f"its schedule from it)"
            ) from None
    k = int(block.get("num_stages", 10))
    total = 2 * k
    config.trainer.total_epochs, config.trainer.total_training_steps = (
        2,
        total,
    )  # 2 epochs, stopped after one
    missing = set(norm_names(model)) ^ (
        {l.name for l in calibration.layers} | set(calibration.skipped)
    )
    if missing:
        raise CheckFailed(
            f"the model's norms differ from sigma.yaml's ({len(missing)}, first {sorted(missing)[0]})"
        )
    fresh = simulate(verl, config, model, steps_per_epoch=total, test_freq=max(k // 2, 1))
    resumed = simulate(
        verl, config, model, steps_per_epoch=total, test_freq=max(k // 2, 1), start=total // 2 + 1
    )
    rows = compare(calibration, [fresh, resumed], total, hint)
    if state == "unpatched":
        raise CheckFailed(
            f"{verl} is not patched (git apply {PATCH}), though this run matched sigma.yaml"
        )
    stages = calibration.schedule.num_stages
    rows.append(
        f"ok: {verl} gives each of {len(norm_names(model))} norms sigma.yaml's sigma at all {stages} stages "
        f"({total} steps, validation rollouts noise-free, resume at step {total // 2 + 1})"
    )
    return rows


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
    ) as exc:  # a bad sigma.yaml, model or input file: one line, as hwdiff's CLI says it
        raise CheckFailed(" ".join(str(exc).split())) from None


def _read_yaml(path: Path, what: str):
    import yaml

    from hwdiff.errors import HwdiffError

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise HwdiffError(f"cannot read {what} {path}: {exc}") from None


def _main(argv: list[str] | None) -> int:
    import hwdiff
    from hwdiff.calibration import load_sigma
    from hwdiff.errors import HwdiffError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--verl",
        type=Path,
        default=HERE / "upstream",
        help="checkout of the fork (default: upstream/, the fork's files as published)",
    )
    parser.add_argument(
        "--sigma", type=Path, help="hwdiff sigma.yaml: the sigma each norm must get"
    )
    parser.add_argument(
        "--model",
        default="tiny-qwen2",
        help="model whose norms sigma.yaml names (default: %(default)s)",
    )
    parser.add_argument(
        "--overrides",
        type=Path,
        help="file with the ++ lines you pass to verl (default: hwdiff's for --sigma)",
    )
    parser.add_argument(
        "--base-config", type=Path, help="YAML trainer.noise_injection block your runs start from"
    )
    args = parser.parse_args(argv)
    if args.sigma is None:
        state = patch_state(args.verl)
        if state == "unpatched":
            raise CheckFailed(f"{args.verl} is not patched: git apply {PATCH}")
        if state == "modified":
            raise CheckFailed(
                f"{PATCH.name} neither applies to {args.verl} nor is applied there: pass --sigma to check "
                f"what this checkout delivers"
            )
        print(
            f"ok: {args.verl} is patched ({PATCH.name}); pass --sigma sigma.yaml --model M to check the sigma"
        )
        return 0
    calibration = load_sigma(args.sigma)
    model = hwdiff.load_model(args.model, dtype="float32")
    try:
        overrides = args.overrides.read_text().splitlines() if args.overrides else None
    except OSError as exc:
        raise HwdiffError(f"cannot read --overrides {args.overrides}: {exc}") from None
    base = (_read_yaml(args.base_config, "--base-config") or {}) if args.base_config else None
    if isinstance(base, dict) and "trainer" in base:
        base = (
            base["trainer"].get("noise_injection", {})
            if isinstance(base["trainer"], dict)
            else base["trainer"]
        )
    if base is not None and not isinstance(base, dict):
        raise HwdiffError(
            f"--base-config {args.base_config}: expected a trainer.noise_injection mapping (or that "
            f"block alone), found {type(base).__name__}"
        )
    print("\n".join(check(args.verl, calibration, model, overrides, base)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
