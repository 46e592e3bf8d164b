#!/usr/bin/env python3
"""Capture per-layer activations on a Huawei Ascend NPU (torch_npu + CANN). Every setting can be
overridden on the command line (e.g. --model /data/Qwen2.5-1.5B-Instruct --output npu.h5)."""

# ---- settings ------------------------------------------------------------------------------------
SETTINGS = dict(
    model="tiny-qwen2",  # built-in, local checkpoint dir (e.g. Qwen2.5-1.5B-Instruct) or hub id
    device="npu:0",
    dtype="bfloat16",  # what training / rollout runs in
    attn_impl="sdpa",  # eager | sdpa: the kernel path under test
    inputs=None,  # None = the shipped math word problems; or .jsonl / .npy token ids
    limit=None,
    max_tokens=128,
    batch_size=8,
    mode="full",  # full | sample | stats
    record_inputs=True,  # needed for replay (local error per module)
    seed=0,
    compression=None,
    output="capture-npu.h5",
)
ALLOW_HF32_MATMUL = False  # torch_npu default: off. HF32 is Ascend's TF32 for float32 matmuls
ALLOW_HF32_CONV = True  # torch_npu default: on
DETERMINISTIC = True  # deterministic NPU kernels: bit-identical reruns
# --------------------------------------------------------------------------------------------------


def set_flags():
    import torch

    from hwdiff.capturing.ascend import import_torch_npu

    import_torch_npu()  # clear error when torch_npu / CANN is missing
    torch.npu.matmul.allow_hf32 = ALLOW_HF32_MATMUL
    torch.npu.conv.allow_hf32 = ALLOW_HF32_CONV
    torch.use_deterministic_algorithms(DETERMINISTIC, warn_only=True)


if __name__ == "__main__":
    import sys

    from hwdiff.capturing.probe import run_probe

    sys.exit(run_probe(SETTINGS, set_flags, __doc__))
