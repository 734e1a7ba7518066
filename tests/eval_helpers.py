"""A tiny random-weights Llama plus a tokenizer trained on a slice of the shared data,
saved as a checkpoint directory, built once per test session (a few seconds)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

_CACHE: dict[str, Path] = {}


def corpus(shared_data: Path) -> list[str]:
    tofu = [json.loads(line) for line in open(shared_data / "tofu" / "full.json", encoding="utf-8")][:400]
    muse = shared_data / "muse-news"
    texts = [d["question"] + "\n" + d["answer"] for d in tofu]
    for name in ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl"):
        texts += [d["question"] + "\n" + d["answer"] for d in json.load(open(muse / "knowmem" / f"{name}.json"))]
    texts += [d["prompt"][:3000] for d in json.load(open(muse / "verbmem" / "forget.json"))[:10]]
    return texts


def tiny_checkpoint(shared_data: Path, root: Path, name: str = "tiny", seed: int = 0) -> Path:
    """``root/name``: config.json, model.safetensors and tokenizer.model of a tiny Llama."""
    key = f"{root}/{name}/{seed}"
    if key in _CACHE:
        return _CACHE[key]
    from qru.model.config import LlamaConfig
    from qru.model.llama import Llama
    from qru.model.tokenizer import Tokenizer

    out = root / name
    tok_path = root / "tokenizer.model"
    tok = Tokenizer(tok_path) if tok_path.is_file() else Tokenizer.train(corpus(shared_data), 512, tok_path, seed=0)
    torch.manual_seed(seed)
    cfg = LlamaConfig.preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=512)
    model = Llama(cfg)
    model.init_weights(seed=seed)
    # Larger output weights give a peaked next-token distribution, so greedy text varies.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(out)
    tok.save(out / Tokenizer.FILE_NAME)
    _CACHE[key] = out
    return out


def left_pad_rows(rows, pad=0):
    """Test inputs: token rows (lists or tensors) left-padded with ``pad`` -> (ids, mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask
