"""Does an unlearning update survive weight quantization? Per-linear-layer survival analysis.

For every linear weight ``W`` (base) and update ``ΔW`` (``unlearned − base``, or the merged
LoRA update ``s·B·A`` of an adapter) and every format ``fmt`` (:data:`qru.quant.ALL_FORMATS`),
with ``W' = W + ΔW`` and ``D = deq(Q(W')) − deq(Q(W))``, all in fp32:

``delta_rel_norm``      ``‖ΔW‖ / ‖W‖`` (Frobenius).
``code_flip_frac``      fraction of weights whose stored code differs between ``Q(W)`` and
                        ``Q(W')``: the 4-bit nibble (nf4, fp4, int4, int4_sym, q4_0, q4_1, q4_k,
                        mxfp4), the 5-bit code (q5_0, q5_1) or the 8-bit code (int8, q8_0).
                        It compares code *indices*: when a block's absmax / group scale / int4
                        zero point changes, an unchanged index may decode to a new value (that
                        shows in ``survival_ratio``, not here), and a changed scale can flip codes
                        where ``ΔW = 0``. fp4's and mxfp4's two codes of zero (0 and 8) count as
                        one code.
``survival_ratio``      ``‖D‖ / ‖ΔW‖``.
``cosine``              ``⟨D, ΔW⟩ / (‖D‖ ‖ΔW‖)``; 0 when ``D = 0`` (and ``ΔW ≠ 0``).
``below_half_step_frac``  fraction of weights with ``|ΔW| < step / 2`` (``ΔW = 0`` always
                        counts), ``step`` the local quantization step at ``W`` under ``Q(W)``:
                        int4 / int4_sym: the group scale; int8: the row scale; q8_0, q4_0,
                        q4_1, q5_0, q5_1: ``|d|`` of the block; q4_k: ``d · sc`` of the
                        32-element sub-block; nf4 / fp4 / mxfp4: the block scale times the gap
                        from the level ``W`` is coded to, to the next codebook level in the
                        direction of ``ΔW`` (the only neighbour at the ends of the codebook;
                        ±0 codes are one level). A weight sitting on
                        its level needs ``|ΔW| ≥ step / 2`` to reach the next one; weights off the
                        grid can flip with less, so this is a proxy, not a flip count.
``projection``          ``⟨D, ΔW⟩ / ‖ΔW‖²``: the share of the update that survives, signed.

With calibration activations ``X`` (inputs of the linear in the *base* model, a bounded number
of token rows): ``out_cosine`` = cosine of ``X·Dᵀ`` and ``X·ΔWᵀ``, ``out_rel_err`` =
``‖X·Dᵀ − X·ΔWᵀ‖ / ‖X·ΔWᵀ‖``.

Zero update: a tensor with ``ΔW = 0`` has ``D = 0`` (quantization is deterministic), so
``code_flip_frac = 0``, ``below_half_step_frac = 1``, and ``survival_ratio``, ``cosine``,
``projection``, ``out_cosine``, ``out_rel_err`` are ``None`` (JSON ``null``): there is
nothing to survive. ``delta_rel_norm`` is ``None`` only for ``ΔW ≠ 0`` on an all-zero ``W``.
Likewise the output fields are ``None`` when ``X·ΔWᵀ = 0``.

Aggregates (``by_module_type``, ``by_layer_index``, ``overall``) are the metric of the
*concatenation* of the group's tensors: norms and inner products are summed before the
ratio (``survival = sqrt(Σ‖D‖² / Σ‖ΔW‖²)``, ``projection = Σ⟨D,ΔW⟩ / Σ‖ΔW‖²``, …) and
fractions are element-weighted. So big updates weigh more than the mean of per-tensor ratios
would let them, and ``ΔW = 0`` tensors add nothing but elements to the fractions. Each
aggregate also has ``n_tensors`` and ``numel``. Layer-less tensors (e.g. ``lm_head``) enter
``by_module_type`` and ``overall`` only.

Which tensors: 2-D floating ``*.weight`` tensors of the base checkpoint, except embeddings
(``embed_tokens``) and the modules ``skip`` matches (:func:`qru.quant.qlinear.is_skipped`, the
matcher of ``qru quantize --skip``: a name, suffix or dotted component run such as ``layers.0.mlp``,
or an ``fnmatch`` pattern of the whole name). Row ``name`` is the module name
(``model.layers.0.self_attn.q_proj``).

Streaming: tensors are read one at a time with :class:`qru.model.checkpoint.ShardReader`
and processed in row chunks (block-aligned, so the codes equal whole-tensor quantization);
memory is about one bf16 tensor plus a few fp32 chunks. Sums of squares and inner products
are fp32 cascade sums per chunk (~1e-7 relative), accumulated in float64. Calibration runs the base model one
decoder layer at a time (the layer's weights in fp32, the hidden states of ``calib_rows``
tokens) and analyses that layer's tensors before loading the next. ``Q(W')`` quantizes the
unlearned weight itself (``ΔW`` is ``fp32(W') − fp32(W)``); with an adapter ``W'`` is the fp32
merge ``W + s·B·A`` (not rounded to the checkpoint dtype). With both an unlearned checkpoint
and an adapter, ``W'`` is the adapter merged into the unlearned weights. Nested (double)
absmax quantization is not modelled.

API: :func:`analyze` → ``{format: report}`` (the ``survival.json`` content), :func:`write_outputs`,
:func:`summary_table`, :func:`by_format`. Modules: ``stats`` (sums, metrics, aggregates), ``inputs``
(checkpoints, adapter, calibration), ``analysis`` (:func:`analyze`), ``report`` (outputs); the codes
and local steps are :mod:`qru.quant.codes`.
"""
from __future__ import annotations

from qru.quant.codes import below_half_step, code_flips, codes, local_step
from qru.quant.survival.analysis import analyze
from qru.quant.survival.inputs import (DEFAULT_SKIP, TensorIndex, calib_ids, calib_texts, linear_names,
                                       load_adapter_updates, stream_inputs)
from qru.quant.survival.report import FILES, by_format, summary_table, write_outputs
from qru.quant.survival.stats import (CHUNK_ELEMS, METRICS, OUT_METRICS, Sums, SurvivalError, aggregate, chunk_sums,
                                      layer_index, metrics, module_type, row_chunk)

__all__ = ["CHUNK_ELEMS", "DEFAULT_SKIP", "FILES", "METRICS", "OUT_METRICS", "Sums", "SurvivalError", "TensorIndex",
           "aggregate", "analyze", "below_half_step", "by_format", "calib_ids", "calib_texts", "chunk_sums",
           "code_flips", "codes", "layer_index", "linear_names", "load_adapter_updates", "local_step", "metrics",
           "module_type", "row_chunk", "stream_inputs", "summary_table", "write_outputs"]
