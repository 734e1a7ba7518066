"""Training: unlearning and pre-training of qru's Llama.

``config`` (run configs and their validation), ``state`` (run directory, checkpoints, resume,
metrics), ``loop`` (the generic loop ``train_loop``), ``unlearn`` (``unlearn(UnlearnConfig)``),
``pretrain`` (``pretrain(PretrainConfig)``), ``losses``, ``data`` (tokenized sets and batches),
``quant_aware``.
"""
