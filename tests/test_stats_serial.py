"""The serial statistics kernel (one chunk, no parallel region) gives the parallel kernel's parts bit for
bit, and both equal numpy's sums in float64 on the values as stored."""

import numpy as np
import pytest

from hwdiff.common import jit

pytestmark = pytest.mark.skipif(
    not jit.available(), reason=f"compiled kernels unavailable: {jit.why_unavailable()}"
)


def _planted(n: int, stored: str) -> np.ndarray:
    x = (np.random.default_rng(n).standard_normal(n) * 3).astype(np.float32)
    x[::97], x[5::131], x[7::151] = np.nan, np.inf, -np.inf
    if stored == "bfloat16":
        return (x.view(np.uint32) >> 16).astype(np.uint16)
    return x.astype(stored)


@pytest.mark.parametrize("stored", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize(
    "n", [1, 200, jit.CHUNK_ELEMENTS, jit.CHUNK_ELEMENTS + 1, 5 * jit.CHUNK_ELEMENTS + 3]
)
def test_serial_and_parallel_parts_are_identical_and_right(n, stored):
    x = _planted(n, stored)
    parallel, serial = np.zeros((jit.chunks(n), 8)), np.zeros((jit.chunks(n), 8))
    jit.kernels().stats_parts(x, parallel)
    jit.kernels().stats_parts_serial(x, serial)
    assert np.array_equal(parallel, serial, equal_nan=True)
    values = (
        (x.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        if stored == "bfloat16"
        else x.astype(np.float64)
    )
    finite = values[np.isfinite(values)]
    assert serial[:, 0].sum() == finite.size
    assert (
        serial[:, 6].sum() == np.isnan(values).sum()
        and serial[:, 7].sum() == np.isinf(values).sum()
    )
    np.testing.assert_allclose(serial[:, 1].sum(), finite.sum(), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(serial[:, 2].sum(), (finite**2).sum(), rtol=1e-12)
    if finite.size:  # n = 1 plants a single NaN
        assert serial[:, 4].min() == finite.min() and serial[:, 5].max() == finite.max()
    else:
        assert serial[:, 4].min() == np.inf and serial[:, 5].max() == -np.inf
