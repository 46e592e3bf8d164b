"""Torch-free basics every stage uses: atomic writes and signal handling (:mod:`.outputs`), JSON-safe
numbers (:mod:`.numbers`), and the optional numba kernels behind one switch (:mod:`.jit`)."""
