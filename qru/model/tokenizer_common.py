"""What both tokenizer kinds (:class:`qru.model.tokenizer.Tokenizer`,
:class:`qru.model.bpe_tokenizer.BPETokenizer`) share: id checks for ``decode``, bos/eos wrapping and
the padding of ``encode_batch``."""
from __future__ import annotations

from collections.abc import Sequence

import torch

def plain_ids(tok, ids: Sequence[int] | torch.Tensor) -> list[int]:
    """``ids`` (a list or 1-D tensor) as ints, checked against the vocabulary, without ``tok``'s
    special (control) ids: what either tokenizer kind decodes."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    n = tok.vocab_size
    out = []
    for i in ids:
        i = int(i)
        if not 0 <= i < n:
            raise ValueError(f"token id {i} out of range for vocab_size={n}")
        if i not in tok._special:
            out.append(i)
    return out


def check_batch_args(texts, padding_side, max_len) -> None:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a sequence of str")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")


def wrap_ids(tok, ids: list[int], bos: bool, eos: bool) -> list[int]:
    """``ids`` with ``bos_id`` in front (when asked and the model uses one) and ``eos_id`` behind (when asked)."""
    bos = bos and tok.add_bos
    for flag, name, tid in ((bos, "bos", tok.bos_id), (eos, "eos", tok.eos_id)):
        if flag and tid < 0:
            raise ValueError(f"{name}=True but the model has no {name} piece")
    return ([tok.bos_id] if bos else []) + ids + ([tok.eos_id] if eos else [])


def pad_rows(rows: list[list[int]], pad_id: int, padding_side: str, max_len: int | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    if max_len is not None:
        rows = [r[-max_len:] if padding_side == "left" else r[:max_len] for r in rows]
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        if not r:
            continue
        sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        ids[b, sl] = torch.tensor(r, dtype=torch.long)
        mask[b, sl] = 1
    return ids, mask
