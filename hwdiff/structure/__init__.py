"""What a model looks like: the one place that knows norms, decoder layers, sub-blocks and token axes.

Everything that needs the network's shape — capture kinds, the token axis of each output, replay's
attention masks, emulation, the AQN injector, the calibrator's norm → sub-block map — asks this
module instead of keeping its own copy of a rule.

- **Norms** are matched by class name, never by isinstance against transformers' classes:
  ``'rmsnorm' in type(m).__name__.lower()`` with a 1-D ``weight`` (HF's ``Qwen2RMSNorm``, vLLM's
  ``RMSNorm`` and vLLM-Ascend's ``AscendRMSNorm`` all match). Some norms compute ``x̂ * (1 + w)``
  with ``w`` stored near 0 (Gemma, Gemma 2/3): their *effective scale* is ``1 + w``. They are
  recognised by class (``Gemma*RMSNorm``) or, for any other class, by calling the module once with
  its weight zeroed (a ``w`` norm then outputs zeros, a ``(1 + w)`` norm does not).
- **LayerNorm** modules (GPT-2's ``ln_1``/``ln_2``/``ln_f``) are a kind of their own; AQN does not
  apply to them (yet): :func:`layernorm_names` lets the injector and calibrator name them.
- **Decoder layers** are the items of a ``layers`` / ``h`` / ``blocks`` list; a module's layer index
  is read from its qualified name (:func:`layer_index`), so it works on a capture's module names
  without the model.
- **Sub-blocks**: each norm's :class:`NormSpec` says where the noise on its weight shows
  (:func:`norm_specs` from a model, :func:`norm_specs_from_names` from a capture's names).
- **Expected norm counts** per family (:func:`expected_norm_count`) and a generic check that every
  decoder layer carries the same set of norms (:func:`check_norm_layout`).
- **Token axis** of a recorded output (:func:`token_axis`) and each layer's **attention mask type**
  (:func:`attention_type`).
- **Call semantics** of modules whose tuple outputs or in-place updates are not "the first tensor":
  fused add+norms called ``norm(x, residual)`` (vLLM's ``RMSNorm`` / ``GemmaRMSNorm``, vLLM-Ascend's
  ``AscendRMSNorm``: :data:`FUSED_NORMS`, :func:`register_fused_norm`) and decoder layers that return
  ``(sub-block output, residual)`` (vLLM's): :func:`output_by_meaning`, :func:`input_by_meaning`; and
  whether a call overwrote its arguments, measured per call (:func:`writes_into_arguments`).

Importing this module does not import torch (calibration reads diff files without it)."""

from __future__ import annotations

from ..common.lazy import reexport
from ..errors import SemanticsError  # noqa: F401  (hwdiff.structure.SemanticsError: defined here before errors.py held every exception)

# every name the module had before it became a package, and the part that holds it now
_EXPORTS = {
    "FINAL_NORM": "norms",
    "KINDS": "norms",
    "NORMS_PER_LAYER": "norms",
    "NormSpec": "norms",
    "_ACTIVATION_MODULES": "norms",
    "_ATTENTION_NAMES": "norms",
    "_LAYER": "norms",
    "_LAYER_ITEM": "norms",
    "_MLP_NAMES": "norms",
    "_OFFSETS": "norms",
    "_VLLM_ACTIVATIONS": "norms",
    "_VLLM_LINEARS": "norms",
    "_layer_kinds": "norms",
    "_probe_offset": "norms",
    "_required_tensor_arguments": "norms",
    "_role": "norms",
    "_sibling": "norms",
    "aqn_needs_rmsnorm": "norms",
    "check_norm_layout": "norms",
    "decoder_layers": "norms",
    "depth_chains": "norms",
    "effective_scale": "norms",
    "expected_norm_count": "norms",
    "find_norms": "norms",
    "is_decoder_layer_name": "norms",
    "is_layernorm": "norms",
    "is_norm": "norms",
    "layer_index": "norms",
    "layernorm_names": "norms",
    "norm_class": "norms",
    "norm_offset": "norms",
    "norm_specs": "norms",
    "norm_specs_from_names": "norms",
    "norm_weight_effective": "norms",
    "offset_from_class": "norms",
    "_is_embedding": "kinds",
    "_is_moe_parent": "kinds",
    "_lineage": "kinds",
    "module_kind": "kinds",
    "DATAFLOW_SCHEMA": "dataflow",
    "DataFlow": "dataflow",
    "NormRole": "dataflow",
    "ROLES": "dataflow",
    "TRACE_TOKENS": "dataflow",
    "_NAME_RULE_ROLES": "dataflow",
    "_SameValue": "dataflow",
    "_Tracer": "dataflow",
    "_ancestors": "dataflow",
    "_block_kind": "dataflow",
    "_changed_last_token": "dataflow",
    "_consumers_of": "dataflow",
    "_layers": "dataflow",
    "_norm_role": "dataflow",
    "_outermost": "dataflow",
    "_row_hook": "dataflow",
    "_row_tensors": "dataflow",
    "_same_level": "dataflow",
    "_same_value_mode": "dataflow",
    "_token_major_rows": "dataflow",
    "_value_key": "dataflow",
    "dataflow_from_trace": "dataflow",
    "dataflow_of_capture": "dataflow",
    "name_rule_disagreements": "dataflow",
    "trace_dataflow": "dataflow",
    "_ATTENTION_LAYER_TYPES": "axes",
    "attention_type": "axes",
    "expert_count": "axes",
    "expert_from_name": "axes",
    "expert_index": "axes",
    "experts_per_token": "axes",
    "padding_only": "axes",
    "routed_tokens": "axes",
    "routing_indices": "axes",
    "row_layout": "axes",
    "token_axis": "axes",
    "FUSED_NORMS": "semantics",
    "FusedNorm": "semantics",
    "_DETECTED": "semantics",
    "_PARAMS": "semantics",
    "_arguments": "semantics",
    "_normed_element": "semantics",
    "_signature": "semantics",
    "_storage": "semantics",
    "_takes_residual": "semantics",
    "_tensors": "semantics",
    "flat_sequences": "semantics",
    "input_by_meaning": "semantics",
    "is_fused_norm": "semantics",
    "is_residual_layer": "semantics",
    "output_by_meaning": "semantics",
    "register_fused_norm": "semantics",
    "writes_into_arguments": "semantics",
}

# `from hwdiff.structure import *` gives the public names, as when it was one module
__all__, __getattr__, __dir__ = reexport(__name__, _EXPORTS)
