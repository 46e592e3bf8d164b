"""``python -m hwdiff`` for torchrun tests, where the rank named by ``HWDIFF_TEST_KILL_RANK`` kills
itself with SIGKILL right after its first batch (a rank that dies mid-capture, as an out-of-memory
kill would). Used by tests/test_distributed.py only; the library has no such hook."""

import os
import signal
import sys

from hwdiff import cli
from hwdiff.capturing import run as capturing  # where capture() looks _run_batches up

_run_batches = capturing._run_batches


def _dying(model, *args, **kwargs):
    if os.environ.get("RANK") == os.environ.get("HWDIFF_TEST_KILL_RANK"):
        model.register_forward_hook(lambda *_: os.kill(os.getpid(), signal.SIGKILL))
    return _run_batches(model, *args, **kwargs)


capturing._run_batches = _dying
sys.exit(cli.main(sys.argv[1:]))
