"""The one exception family for user errors.

The CLI prints the message of an :class:`HwdiffError` on one line and exits non-zero without a
traceback; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class HwdiffError(Exception):
    """A problem the user can fix: bad input, a missing backend, an unusable file."""


class DeviceError(HwdiffError):
    """An unknown or unavailable device, or a missing backend package (torch_npu)."""


class ModelSpecError(HwdiffError):
    """A model spec that names no built-in model, local checkpoint or loadable hub id."""


class InputsError(HwdiffError):
    """Token ids or prompts that cannot be read or do not fit the model."""


class CaptureFormatError(HwdiffError):
    """A file that is not a complete hwdiff capture this version understands."""


class SelectionError(HwdiffError):
    """A module selection (regex or kind) that matches nothing in the model."""


class CorruptDataError(CaptureFormatError):
    """A stored dataset whose checksum fails: the file was damaged after it was written."""


class OutputError(HwdiffError):
    """An output that cannot or must not be written: same as an input, unwritable, disk full."""


class SemanticsError(HwdiffError):
    """A module's output cannot be told apart by meaning (which tuple element is what)."""
