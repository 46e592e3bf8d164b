#!/usr/bin/env python3
"""Capture a CPU golden reference: the same model and inputs in float32 (or float64), to judge which
of two devices is off (`hwdiff diff GPU.h5 NPU.h5 --golden golden.h5`). Settings can be overridden
on the command line."""

# ---- settings ------------------------------------------------------------------------------------
SETTINGS = dict(
    model="tiny-qwen2",  # must be the same checkpoint as the device captures
    device="cpu",
    dtype="float32",  # float32 or float64: well above the devices' bf16 precision
    attn_impl="eager",  # the plainest kernel path
    inputs=None,  # must be the same inputs as the device captures
    limit=None,
    max_tokens=128,
    batch_size=8,
    mode="full",
    record_inputs=True,
    seed=0,
    compression=None,
    output="capture-cpu-golden.h5",
)
THREADS = None  # torch.set_num_threads; None keeps torch's default (recorded either way)
# --------------------------------------------------------------------------------------------------


def set_flags():
    import torch

    if THREADS:
        torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True, warn_only=True)


if __name__ == "__main__":
    import sys

    from hwdiff.capturing.probe import run_probe

    sys.exit(run_probe(SETTINGS, set_flags, __doc__))
