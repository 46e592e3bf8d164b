"""``hwdiff.capture``: run fixed inputs through a model and write every selected activation to HDF5."""

from __future__ import annotations

from ..common.lazy import reexport

# every name the module had before it became a package (defined there or imported into it), and where it is now
_EXPORTS = {
    "devices": "run",
    "distributed": "run",
    "outputs": "run",
    "__version__": "run",
    "describe": "run",
    "emulation": "run",
    "HwdiffError": "run",
    "InputsError": "run",
    "DEFAULT_MAX_TOKENS": "run",
    "ByteTokenizer": "run",
    "Inputs": "run",
    "check_counts": "run",
    "load_inputs": "run",
    "dtype_name": "run",
    "model_info": "run",
    "record": "run",
    "MODES": "run",
    "compression_options": "run",
    "write_manifest": "run",
    "CaptureWriter": "run",
    "CaptureOptions": "run",
    "CaptureResult": "run",
    "capture": "run",
    "_Job": "run",
    "_write_file": "run",
    "_dataflow": "run",
    "_capture_ranks": "run",
    "_logprobs": "run",
    "_absences": "run",
    "_run_batches": "run",
    "sample_positions": "run",
    "model_device_and_dtype": "run",
    "_resolve_inputs": "run",
    "LazyTokenizer": "run",
    "model_tokenizer": "run",
    "capture_metadata": "run",
}

# `from hwdiff.capturing import *` gives the public names, as when it was one module
__all__, __getattr__, __dir__ = reexport(__name__, _EXPORTS)
