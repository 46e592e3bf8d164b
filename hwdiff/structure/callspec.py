"""How a module was called, recorded so that replay can call it again with the same arguments.

With ``record_inputs`` a full capture stores, per module call, the main input as slot ``input`` and
every other tensor argument as a slot ``input.<argument>`` (``input.position_embeddings.0``,
``input.attention_mask``, ``input.arg1`` …), batch rows first like every slot, plus a JSON
``call_spec`` attribute that says where each argument goes and holds the plain values (None, bools,
numbers, strings). A tensor whose first axis is 1 while the batch has more rows (a broadcast
position tensor) is stored expanded to the batch. An argument of any other type makes the call
not replayable, and the spec says why.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

MAIN = "input"
_PLAIN = (type(None), bool, int, float, str)


def main_input_path(args: tuple, kwargs: dict) -> tuple | None:
    """Where the main input is: the first positional tensor, else ``hidden_states``, else any tensor."""
    for index, value in enumerate(args):
        if isinstance(value, torch.Tensor):
            return ("arg", index)
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return ("kw", "hidden_states")
    return next(
        (("kw", key) for key, value in kwargs.items() if isinstance(value, torch.Tensor)), None
    )


def encode_call(
    args: tuple, kwargs: dict, main_slot: bool = True
) -> tuple[dict, list[tuple[str, torch.Tensor]]]:
    """(JSON-able spec, [(slot, tensor)]) of one call; the main input's slot is ``input`` unless
    ``main_slot`` is False (the caller stores another tensor there: every argument is then
    ``input.<argument>``, ``input.arg0`` included)."""
    main = main_input_path(args, kwargs)
    rows = _main_tensor(args, kwargs, main).shape[0] if main is not None else 1
    tensors: list[tuple[str, torch.Tensor]] = []

    def encode(value: Any, path: tuple) -> dict:
        if isinstance(value, torch.Tensor):
            if value.dim() == 0 or value.shape[0] not in (rows, 1):
                return {
                    "unsupported": f"a tensor of shape {tuple(value.shape)} without the batch axis first"
                }
            slot = MAIN if path == main and main_slot else "input." + ".".join(_part(path))
            tensors.append((slot, value))
            return {"slot": slot}
        if isinstance(value, (tuple, list)):
            return {
                "seq": [encode(item, (*path, index)) for index, item in enumerate(value)],
                "type": type(value).__name__,
            }
        if isinstance(value, _PLAIN):
            return {"value": value}
        return {"unsupported": f"an argument of type {type(value).__name__}"}

    spec = {
        "args": [encode(value, ("arg", index)) for index, value in enumerate(args)],
        "kwargs": {key: encode(value, ("kw", key)) for key, value in kwargs.items()},
    }
    return spec, tensors


def _part(path: tuple) -> list[str]:
    """("arg", 1) → ["arg1"]; ("kw", "position_embeddings", 0) → ["position_embeddings", "0"]."""
    head = f"arg{path[1]}" if path[0] == "arg" else str(path[1])
    return [head, *map(str, path[2:])]


def _main_tensor(args: tuple, kwargs: dict, path: tuple) -> torch.Tensor:
    return args[path[1]] if path[0] == "arg" else kwargs[path[1]]


def unsupported(spec: dict) -> str | None:
    """Why a recorded call cannot be replayed, or None."""

    def find(entry: dict) -> str | None:
        if "unsupported" in entry:
            return entry["unsupported"]
        return next((reason for item in entry.get("seq", []) if (reason := find(item))), None)

    entries = [*spec["args"], *spec["kwargs"].values()]
    return next((reason for entry in entries if (reason := find(entry))), None)


def decode_call(spec: dict, load: Callable[[str], torch.Tensor]) -> tuple[list, dict]:
    """Rebuild ``(args, kwargs)`` from a spec, reading each stored tensor through ``load(slot)``."""

    def decode(entry: dict) -> Any:
        if "slot" in entry:
            return load(entry["slot"])
        if "seq" in entry:
            items = [decode(item) for item in entry["seq"]]
            return tuple(items) if entry.get("type") == "tuple" else items
        return entry["value"]

    return [decode(entry) for entry in spec["args"]], {
        key: decode(entry) for key, entry in spec["kwargs"].items()
    }
