"""qru: quantization-robust LLM unlearning.

Layers import downward only (checked by ``lint-imports``, contracts in pyproject.toml), top to bottom:

1. ``qru.cli`` (and ``qru.__main__``): the command line;
2. ``qru.demo``: the end-to-end experiment and sweeps;
3. workflows, independent of each other: ``qru.train`` (unlearning, pre-training), ``qru.eval``
   (MUSE / TOFU), ``qru.quant.export`` and ``qru.quant.gguf_export`` (merge-then-quantize exports),
   ``qru.quant.survival`` (does an update survive quantization);
4. ``qru.data``: the one record reader and the one QA template;
5. ``qru.model``: the Llama, its checkpoints, tokenizer and LoRA;
6. quantization formats and layouts: ``qru.quant.layout`` (quantized checkpoint tensors), then
   ``qru.quant.qlinear`` and ``qru.quant.codes``, then ``qru.quant.formats``;
7. ``qru.kernels`` (one op per file, each with its pure-torch reference; ``qru.kernels.qtensor`` holds the
   one packed-weight type, :class:`QTensor`, that every layer above passes) and ``qru.io`` (atomic outputs).

A module may import from its own layer's package and from any layer below it, never above; imports
inside functions follow the same rule (none exists to dodge a cycle).
"""

__version__ = "0.1.0"
