"""The capture format's names and value encoding: schema, modes, slots, row layouts, filters, and how
a stored array maps to exact values (bfloat16 as its raw uint16 bits). The layout itself is described
in :mod:`hwdiff.store`. No h5py here: the command line and the capture side read these names cheaply.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import stats

SCHEMA = "hwdiff/capture/1"
SCHEMA_FAMILY, SCHEMA_MAJOR = SCHEMA.rsplit("/", 1)
MODES = ("full", "sample", "stats")
# Lossless filters a capture may be written with (docs/benchmarks.md, "Compression"): HDF5's own
# gzip and lzf (byte shuffle first), and Blosc's lz4 with bit shuffle / Blosc2's zstd with byte shuffle
# from the hdf5plugin package (pip install hdf5plugin), which any reader then needs too.
COMPRESSIONS = ("gzip", "lzf", "lz4", "zstd")
PLUGIN_FILTERS = {32001: "blosc", 32026: "blosc2"}  # HDF5 filter id → name, read through hdf5plugin
GENERATE_MODE = (
    "generate"  # root ``mode`` of a greedy generation file (:mod:`hwdiff.capturing.generate`)
)
LOGPROB_FIELDS = ("next_token", "entropy", "topk_ids", "topk_logprobs")
SLOTS = (
    "output",
    "input",
    "routing",
)  # routing: a router's chosen experts per token (int64 [sequences, tokens, k])
ROUTED = "routed"  # slot attribute ``rows``: rows of the tokens routed to one expert, scattered to their token
FLAT = "tokens"  # slot attribute ``rows``: the module saw [sequences·tokens, …] rows, stored [sequences, tokens, …]
EXPERTS = "experts"  # ``rows``: [experts, sequences·tokens, …] (every token at every expert), stored [sequences, tokens, experts, …]
EXPERT_ROWS = (
    "expert-rows"  # ``rows``: [experts·sequences·tokens, …], stored [sequences, tokens, experts, …]
)
CHUNK_BYTES = 4 << 20
STATS_FIELDS = stats.FIELDS


def encode(tensor: Any) -> np.ndarray:
    """Host torch tensor → the numpy array stored: bfloat16 as its raw uint16 bits, else as is."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def decode(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Stored array → exact numpy values: bfloat16 bits widen losslessly to float32."""
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored


def decoded(array: np.ndarray) -> np.ndarray:
    """Values of an array given as stored or already decoded: bfloat16 is the only dtype stored as
    integers (uint16 bit patterns), so a uint16 array is widened and anything else returned as is."""
    return decode(array, "bfloat16") if array.dtype == np.uint16 else array


def nonfinite_counts(stored: np.ndarray, dtype: str) -> tuple[int, int]:
    """(NaN count, Inf count) of a stored array, read from the bits for bfloat16."""
    if dtype == "bfloat16":
        exponent_all_ones = (stored & 0x7F80) == 0x7F80
        nan = int(np.count_nonzero(exponent_all_ones & ((stored & 0x007F) != 0)))
        return nan, int(np.count_nonzero(exponent_all_ones)) - nan
    if stored.dtype.kind != "f":
        return 0, 0
    return int(np.count_nonzero(np.isnan(stored))), int(np.count_nonzero(np.isinf(stored)))
