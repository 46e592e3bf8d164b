#!/usr/bin/env python3
"""Capture per-layer activations on an NVIDIA GPU. Every setting can be overridden on the command
line (e.g. --model /data/Qwen2.5-1.5B-Instruct --output gpu.h5); run with --help for the list."""

import os

# ---- settings ------------------------------------------------------------------------------------
SETTINGS = dict(
    model="tiny-qwen2",  # built-in, local checkpoint dir (e.g. Qwen2.5-1.5B-Instruct) or hub id
    device="cuda:0",
    dtype="bfloat16",  # what training / rollout runs in
    attn_impl="sdpa",  # eager | sdpa | flash_attention_2: the kernel path under test
    inputs=None,  # None = the shipped math word problems; or .jsonl / .npy token ids
    limit=None,
    max_tokens=128,
    batch_size=8,
    mode="full",  # full | sample | stats
    record_inputs=True,  # needed for replay (local error per module)
    seed=0,
    compression=None,
    output="capture-cuda.h5",
)
ALLOW_TF32 = False  # TF32 for float32 matmuls / convolutions (bf16 runs are unaffected)
DETERMINISTIC = True  # deterministic cuBLAS / cuDNN algorithms: bit-identical reruns
# --------------------------------------------------------------------------------------------------
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # must be set before CUDA starts


def set_flags():
    import torch

    torch.backends.cuda.matmul.allow_tf32 = ALLOW_TF32
    torch.backends.cudnn.allow_tf32 = ALLOW_TF32
    torch.backends.cudnn.deterministic = DETERMINISTIC
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(DETERMINISTIC, warn_only=True)


if __name__ == "__main__":
    import sys

    from hwdiff.capturing.probe import run_probe

    sys.exit(run_probe(SETTINGS, set_flags, __doc__))
