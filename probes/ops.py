#!/usr/bin/env python3
"""Op-level probe: matmul (K = 64 ... 16384), casts, silu, gelu, exp, tanh, softmax, RMSNorm, sum and
mean on seeded inputs exactly representable in every dtype. Run it on each machine and once as the
golden, then `hwdiff diff gpu-ops.h5 npu-ops.h5 --golden golden-ops.h5`. Settings can be overridden
on the command line (--device, --dtype, --output)."""

import argparse
import sys

# ---- settings ------------------------------------------------------------------------------------
DEVICE = "auto"  # cuda:0 on the GPU machine, npu:0 on the Ascend machine
DTYPE = "bfloat16"  # float64 with --device cpu for the golden
OUTPUT = "ops.h5"
ALLOW_TF32 = False  # NVIDIA: TF32 for float32 matmuls (recorded in the file)
ALLOW_HF32 = False  # Ascend: HF32 for float32 matmuls (torch_npu's default: off)
# --------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=DEVICE)
    parser.add_argument("--dtype", default=DTYPE)
    parser.add_argument("--output", default=OUTPUT)
    args = parser.parse_args()

    import torch

    from hwdiff.capturing.devices import resolve_device
    from hwdiff.capturing.probe_ops import probe_ops
    from hwdiff.errors import HwdiffError

    try:
        device = resolve_device(args.device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = ALLOW_TF32
        if device.type == "npu":
            torch.npu.matmul.allow_hf32 = ALLOW_HF32
        result = probe_ops(args.output, device=str(device), dtype=args.dtype)
    except HwdiffError as exc:
        print(f"hwdiff: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(result)
    print(f"ops file: {result.path.resolve()}")
