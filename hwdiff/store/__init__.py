"""The capture file: the one package that writes and reads the HDF5 contract (docs/design.md#file-contracts).

Layout (schema ``hwdiff/capture/1``)::

    /                       attrs: schema, hwdiff_version, created_utc, device, device_name, dtype,
                            torch_version, backend versions, numerics flags, model_spec,
                            model_fingerprint, model_config (JSON), inputs_fingerprint, mode,
                            batch_size, complete; stats_accumulation (mode "stats": float64, or
                            float32 where the device reduced in float32); dataflow (JSON, schema
                            ``hwdiff/dataflow/1``: each RMSNorm's measured role and sub-block,
                            :func:`hwdiff.structure.trace_dataflow`; absent in older files and for
                            models without RMSNorms: readers fall back to the name rule)
    /inputs/input_ids       int64 [sequences, tokens]
    /inputs/attention_mask  int64 [sequences, tokens]
    /inputs/sample_positions int64 [sequences, K]          (mode "sample" only)
    /module_index           JSON string: per module what a reader would find by walking /modules
                            (kind, class_name, calls, order, call 0's shape/dtype/slots/alias,
                            weight); read instead of ~8 HDF5 objects per module when it lists
                            exactly the groups under /modules (absent in older files)
    /modules/<name>         attrs: kind, class_name, calls, order; ``weight`` dataset for norms
                            (and ``weight_offset``: 1.0 when the norm scales by 1 + weight)
    /modules/<name>/<call>/output   [sequences, tokens, ...] (K positions instead of tokens in
                                    "sample" mode); attrs: dtype, and nan_count /
                                    inf_count when not zero
    /modules/<name>/<call>/input    the module's main input (``record_inputs``); in full mode also
                                    ``input.<argument>`` for its other tensor arguments and a JSON
                                    ``call_spec`` attribute, so that replay can call it again
    /modules/<name>/<call>/output_stats  float64 compound record (mode "stats", instead of output)

    /logprobs               token log-probabilities at the head (every mode; absent in files written
                            before it existed, and when the model has no head): attrs ``topk`` (k),
                            ``compute_dtype`` (float64 where the device has it, else float32),
                            ``head_dtype`` (dtype of the logits), ``source`` (``logits``: the
                            model's output logits; a head module's name when it returned none), ``definition``
    /logprobs/next_token    [sequences, tokens]: log p(input_ids[s, t+1] | tokens ≤ t) under the
                            model (teacher forcing on the fixed inputs); NaN at the last position
    /logprobs/entropy       [sequences, tokens]: −Σ_v p log p of the distribution at position t (nats)
    /logprobs/topk_ids      int64 [sequences, tokens, k]: the k most probable next tokens, best first
    /logprobs/topk_logprobs [sequences, tokens, k]: their log-probabilities
    /generation             greedy generation files only (root ``mode = "generate"``, no modules):
                            ``ids`` int64 [sequences, N] (generated tokens, ``pad`` after ``lengths``),
                            ``lengths`` int64 [sequences], ``logprobs`` [sequences, N] (log-prob of each
                            generated token), ``entropy``, ``topk_ids`` and ``topk_logprobs`` as in
                            /logprobs; attrs ``max_new_tokens``, ``strategy``, ``topk``,
                            ``compute_dtype``, ``head_dtype``, ``pad``

Log-probabilities are log_softmax of the model's output logits (:mod:`hwdiff.capturing.logprobs`) computed on
the capture device in ``compute_dtype`` (never in the model's bfloat16), stored as computed (float64 or float32). All
positions are kept in every mode (they are small: 8 bytes per token plus 16·k), padding included;
readers mask with the attention mask.

bfloat16 is stored as its raw uint16 bit patterns with ``dtype = "bfloat16"``; other float dtypes
natively. Every dataset carries HDF5's Fletcher-32 checksum filter (a scalar dataset, which HDF5
cannot filter, a ``crc32`` attribute instead; the v110 object format checksums the metadata), so a
flipped bit is reported by name instead of read as a number (:func:`verify_file`, ``hwdiff inspect
--verify``). Root attribute ``capture_id`` names the run; a replay records ``replay_of_id``. A slot holding the very tensor another module already returned is an HDF5 soft link to it
(attribute ``<slot>_alias_of`` on the call group). Files are written under a temporary name and
synced and renamed only after ``complete`` is set (:mod:`hwdiff.common.outputs`), so a partial file is
never taken for a whole one and an existing file is replaced only by a complete one.
A multi-rank capture (torchrun) is a directory of such files, one per rank, plus ``manifest.h5``: a
capture file whose activations are HDF5 virtual datasets over the rank files (:mod:`hwdiff.store.ranks`);
:func:`open_capture` reads the directory as one capture and refuses it with a missing or foreign rank
file. Rank files carry root ``rank``, ``world_size``, ``local_rank``, ``local_device``,
``process_group_backend``, ``parallel`` and ``run_id``; a tensor-parallel shard's datasets
``placement = "Shard(-1)"``.
New files use the HDF5 1.10 object format (``libver="v110"``: smaller and quicker to write for many
small groups and attributes; any HDF5 ≥ 1.10 reads them); files written in the older format read alike.

The package, by role (bottom to top): :mod:`~hwdiff.store.format` (the names above and the bfloat16
encoding; no h5py), :mod:`~hwdiff.store.tokens` (the run's token ids, :class:`~hwdiff.store.tokens.Inputs`),
:mod:`~hwdiff.store.stats` (``stats``-mode reductions), :mod:`~hwdiff.store.h5`
(checksummed datasets, attributes, checked reads), :mod:`~hwdiff.store.ranks` (the multi-rank
directory), :mod:`~hwdiff.store.writer`, :mod:`~hwdiff.store.reader`, :mod:`~hwdiff.store.verify` and
:mod:`~hwdiff.store.inspect` (``hwdiff inspect``). The names of ``_EXPORTS`` below are also importable from
``hwdiff.store`` itself, loaded on first use, so that importing the package (or its h5py-free
:mod:`~hwdiff.store.format`) costs nothing until a file is read or written.
"""

from __future__ import annotations

from ..common.lazy import reexport

# name → the submodule that defines it
_EXPORTS = {
    **dict.fromkeys(
        (
            "SCHEMA",
            "SCHEMA_FAMILY",
            "SCHEMA_MAJOR",
            "MODES",
            "COMPRESSIONS",
            "PLUGIN_FILTERS",
            "GENERATE_MODE",
            "LOGPROB_FIELDS",
            "SLOTS",
            "ROUTED",
            "FLAT",
            "EXPERTS",
            "EXPERT_ROWS",
            "CHUNK_BYTES",
            "STATS_FIELDS",
            "encode",
            "decode",
            "decoded",
            "nonfinite_counts",
        ),
        "format",
    ),
    **dict.fromkeys(
        ("compression_options", "set_attrs", "new_group", "create_checked", "read_checked"), "h5"
    ),
    **dict.fromkeys(
        (
            "Record",
            "LogProbRecord",
            "Register",
            "Signature",
            "Alias",
            "CaptureWriter",
            "_chunk_shape",
        ),
        "writer",
    ),
    **dict.fromkeys(
        (
            "ModuleInfo",
            "TokenLogProbs",
            "Generation",
            "Capture",
            "open_capture",
            "plan_blocks",
            "_indexed_modules",
            "_walk_modules",
        ),
        "reader",
    ),
    **dict.fromkeys(("Verification", "verify_file"), "verify"),
}

# `from hwdiff.store import *` gives the public names, as when it was one module
__all__, __getattr__, __dir__ = reexport(__name__, _EXPORTS)
