"""The generic training loop, written out by hand in one function, ``train_loop``, and the pieces it
shares with unlearning and pre-training (seeding, the lr schedule, autocast, the eval NLL, the
finite-loss checks, the optimizer).

One optimizer step = ``grad_accum`` micro-batches of the main set (forget set, or the training
set), each paired with the next retain batch (an independent, endlessly reshuffled stream). An
epoch is one pass over the main set; the last step of an epoch may use fewer micro-batches.
The run directory, checkpoints and resume are :mod:`qru.train.state`'s.
"""
from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from qru.io import check_device
from qru.kernels.threads import ADAPTIVE, step_threads
from qru.model.linear import Linear
from qru.model.llama import Llama
from qru.train import distributed as D
from qru.train import losses as L
from qru.train.config import TrainConfigError, TrainOptions
from qru.train.data import Batch, BatchStream, TokenizedSet
from qru.train.state import (CKPT_PREFIX, METRICS, append_metrics, check_resume_config, load_checkpoint,
                             read_metrics, save_checkpoint, set_rng_state)

# Training batches are padded to a multiple of this many tokens: a bounded set of GEMM shapes
# (oneDNN caches a primitive, ~0.7 MB, per new shape; see qru.train.losses.padded_rows).
PAD_MULTIPLE = 16


class NonFiniteLossError(ValueError):
    """A loss term or a gradient became NaN or Inf; raised before the optimizer applies it.
    The message names the step and the loss term or parameter."""


def resolve_device(name: str) -> torch.device:
    return check_device(name, option="device")


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def lr_at(step: int, total: int, base: float, scheduler: str, warmup: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then constant or cosine to 0."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if scheduler == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared tensors counted once)."""
    ps = list(model.parameters())
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)


def model_sequence_logprobs(model, input_ids: torch.Tensor, loss_mask: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence ``(sum of target log-probs, target count)`` of a causal LM on a batch.

    qru's :class:`Llama` with its own bias-free ``lm_head`` (a :class:`qru.model.linear.Linear`
    without a weight transform) goes through the fused, chunked head
    (:func:`qru.train.losses.hidden_sequence_logprobs`: no (B, T, V) logits, only target positions
    projected); any other model through its logits and :func:`qru.train.losses.sequence_logprobs`.
    """
    head = getattr(model, "lm_head", None)
    if (isinstance(model, Llama) and isinstance(head, Linear) and head.weight_transform is None
            and head.bias is None):
        hidden = model(input_ids, return_hidden=True)
        return L.hidden_sequence_logprobs(hidden, head.weight, input_ids, loss_mask)
    return L.sequence_logprobs(model(input_ids), input_ids, loss_mask)


def _batches(ts: TokenizedSet, bs: int):
    for s in range(0, len(ts), bs):
        yield list(range(s, min(s + bs, len(ts))))


@torch.no_grad()
def eval_nll(model, ts: TokenizedSet, batch_size: int, pad_id: int, device, precision: str,
             d: D.Dist | None = None) -> float:
    """Plain mean token NLL over the targets of ``ts`` (model in eval mode, no gradient). Data
    parallel (``d``): each rank takes its chunk of every batch; the sums are reduced."""
    was = model.training
    model.eval()
    tot, n = 0.0, 0.0
    for idx in _batches(ts, batch_size):
        b = D.rank_batch(d, ts, idx, pad_id).to(device)
        with autocast(device, precision):
            s, c = model_sequence_logprobs(model, b.input_ids, b.loss_mask)
        if b.row_share > 0:  # not an idle rank's stand-in row
            tot -= float(s.sum())
            n += float(c.sum())
    model.train(was)
    D.reshard(model)
    if d is not None:
        tot, n = D.all_sum(d, torch.tensor([tot, n])).tolist()
    return tot / n


@torch.no_grad()
def sequence_logp_table(model, ts: TokenizedSet, batch_size: int, pad_id: int, device, precision: str,
                        d: D.Dist | None = None) -> torch.Tensor:
    """Per-example sequence log-probs (sum over targets) of every example of ``ts``, fp32 on CPU
    (data parallel: each rank fills its chunks, the table is summed over the ranks)."""
    was = model.training
    model.eval()
    out = torch.zeros(len(ts), dtype=torch.float32)
    for idx in _batches(ts, batch_size):
        b = D.rank_batch(d, ts, idx, pad_id).to(device)
        with autocast(device, precision):
            s = model_sequence_logprobs(model, b.input_ids, b.loss_mask)[0].cpu()
        if b.row_share > 0:
            out[b.index] = s
    model.train(was)
    D.reshard(model)
    return D.all_sum(d, out).float() if d is not None else out




class _SigintGuard:
    """First Ctrl-C sets a flag the loop checks after each step (it then checkpoints and stops);
    a second one interrupts at once."""

    def __init__(self):
        self.hit = False
        self._old = None

    def _handler(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True
        print("\nqru: Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr)

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: no handler, plain KeyboardInterrupt semantics
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


StepFn = Callable[[Batch, "Batch | None"], dict]


def check_finite_losses(losses: dict, names: tuple[str, ...], step: int) -> None:
    """Raise :class:`NonFiniteLossError` naming the term(s) if a loss scalar is NaN/Inf (one sync)."""
    present = [k for k in names if losses.get(k) is not None]
    vals = torch.stack([losses[k].detach().float().reshape(()) for k in present])
    if bool(torch.isfinite(vals).all()):
        return
    # the loss terms first, then the total they add up to
    bad = [f"{k} = {float(v)}" for k, v in sorted(zip(present, vals.tolist()), key=lambda kv: kv[0] == "loss")
           if not math.isfinite(v)]
    raise NonFiniteLossError(f"training diverged at step {step}: {', '.join(bad)}; stopped before the optimizer "
                             "step (lower the learning rate or check the loss options)")


def check_finite_grads(named: dict[int, str], params: list[torch.nn.Parameter], max_norm: float, step: int,
                       d: D.Dist | None = None) -> None:
    """Clip the gradients to ``max_norm`` (0: no clipping) as ``clip_grad_norm_`` does, after checking
    their total norm (one sync); raise :class:`NonFiniteLossError` naming the first parameter with a
    NaN/Inf gradient. Sharded (``d``): the norm from the local shards' squares summed over the ranks,
    each rank scaling its own shards."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if d is not None:
        local = [D.local(g) for g in grads]
        norm = D.all_sum(d, torch.stack([g.float().pow(2).sum() for g in local]).sum()).sqrt().float()
        if bool(torch.isfinite(norm)):
            coef = max_norm / (float(norm) + 1e-6)
            if max_norm > 0 and coef < 1.0:
                torch._foreach_mul_(local, coef)
            return
    else:
        norm = torch.nn.utils.get_total_norm(grads)
        if bool(torch.isfinite(norm)):
            if max_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
            return
    for p in params:  # failure path only: find the culprit (in this rank's shards)
        g = D.local(p.grad) if p.grad is not None else None
        if g is not None and not bool(torch.isfinite(g).all()):
            bad = int((~torch.isfinite(g)).sum())
            raise NonFiniteLossError(f"training diverged at step {step}: gradient of {named[id(p)]} has {bad} "
                                     "non-finite value(s) (NaN or Inf); stopped before the optimizer step")
    raise NonFiniteLossError(f"training diverged at step {step}: the gradient norm overflows ({float(norm)}); "
                             "stopped before the optimizer step")


def _reduced(d: D.Dist, losses: dict, names: tuple[str, ...]) -> dict:
    """The loss terms summed over the ranks (each rank's are weighted by its share of the global
    batch, so the sums are the global batch's values); detached."""
    present = [k for k in names if losses.get(k) is not None]
    vals = D.all_sum(d, torch.stack([losses[k].detach().float().reshape(()) for k in present]))
    return dict(zip(present, vals.float()))


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float,
                   groups: list[dict] | None = None) -> torch.optim.AdamW:
    """AdamW, torch's fused single-pass kernel where it applies (floating params on CPU or CUDA;
    what HF's Trainer defaults to on torch >= 2.8), else the multi-tensor one. Same update rule.
    ``groups`` (param groups over exactly ``params``) replaces the single group at ``lr``. Its
    state (``exp_avg``, ``exp_avg_sq``) has each parameter's dtype: bf16 parameters get bf16 state.

    torch's fused kernel updates the parameters without bumping their ``_version`` (torch 2.13);
    :mod:`qru.kernels.linear` keys a trainable weight's packed copy on the optimizer step count too."""
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups if groups is not None else params, lr=lr, weight_decay=weight_decay,
                             fused=fused)


def train_loop(model: torch.nn.Module, step_fn: StepFn, main: TokenizedSet, aux: TokenizedSet | None,
               evals: dict[str, TokenizedSet], opts: TrainOptions, out: Path, pad_id: int,
               device: torch.device, loss_names: tuple[str, ...], extra_state: dict | None = None,
               config_dict: dict | None = None, desc: str = "train", resume: bool | None = None,
               param_groups: list[dict] | None = None, update_probe: Callable[[], dict] | None = None,
               stop_check: Callable[[torch.nn.Module], dict] | None = None,
               eval_extra: Callable[[], dict] | None = None, d: D.Dist | None = None
               ) -> tuple[int, int, str, list[dict]]:
    """Run the optimisation in the run directory ``out`` (``metrics.jsonl`` appended, checkpoints).
    ``step_fn(main_batch, aux_batch)`` returns a dict of scalar losses with ``"loss"`` (the one
    differentiated) and the other ``loss_names``. ``resume`` (default ``opts.resume``): continue from
    the newest complete checkpoint in ``out``. Returns ``(steps_done, total_steps, status,
    metrics_rows)``; status is ``"done"`` or ``"stopped"``. Raises KeyboardInterrupt after
    checkpointing on Ctrl-C. ``param_groups``: AdamW groups of the trainable parameters, each with
    its peak lr as ``base_lr`` (default: one group at ``opts.lr``). ``update_probe() -> dict``: logged
    as ``update`` in every eval row (:class:`UpdateProbe`). ``stop_check(model) -> dict``: called
    after every eval row but the first (end of each epoch); its dict is logged in the row as ``check``,
    and ``{"stop": True, ...}`` ends the run there (status ``"done"``, fewer steps than planned).
    ``eval_extra() -> dict``: merged into every eval row (quant-aware monitoring).
    ``d``: data parallel over the FSDP2-sharded ``model`` (:mod:`qru.train.distributed`): each rank
    runs its chunk of every global batch, losses and metrics are reduced, only rank 0 writes the
    metrics and shows the progress bar, checkpoints are sharded (DCP)."""
    resume = opts.resume if resume is None else resume
    main_rank = d is None or d.is_main
    D.reshard(model)  # the sharded parameters, not a gathered root (:func:`qru.train.distributed.reshard`)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainConfigError("no trainable parameters")
    optimizer = make_optimizer(params, opts.lr, opts.weight_decay, groups=param_groups)
    param_names = {id(p): n for n, p in model.named_parameters()}
    stream = BatchStream(len(main), opts.batch_size, opts.seed)
    aux_stream = BatchStream(len(aux), opts.batch_size, opts.seed + 1) if aux is not None else None
    nb = stream.batches_per_epoch
    steps_per_epoch = -(-nb // opts.grad_accum)
    total = steps_per_epoch * opts.epochs
    metrics_path = out / METRICS
    config_dict = config_dict or {}

    per_step = ADAPTIVE if opts.threads == ADAPTIVE else None  # a fixed count is set for the whole run
    used_threads: list[int] = []  # torch threads of each step since the last logged row

    def run_evals() -> dict:
        with step_threads(per_step):
            out = {f"{k}_nll": eval_nll(model, v, opts.eval_batch_size, pad_id, device, opts.precision, d)
                   for k, v in evals.items()}
        if update_probe is not None:
            out["update"] = update_probe()
        if eval_extra is not None:
            out.update(eval_extra())
        return out

    step = 0
    if resume:
        state = load_checkpoint(out, model, optimizer, d)
        check_resume_config(state.get("config", {}), config_dict)
        step = int(state["step"])
        stream.load_state_dict(state["stream"])
        if aux_stream is not None:
            aux_stream.load_state_dict(state["aux_stream"])
        set_rng_state(state["rng"])
        rows = read_metrics(metrics_path, up_to=step)
    else:
        empty = {k: None for k in loss_names}
        rows = [{"step": 0, "epoch": 0.0, **empty, "lr": lr_at(0, total, opts.lr, opts.scheduler, opts.warmup_steps),
                 "tokens_per_s": None, **run_evals()}]
        if main_rank:
            append_metrics(metrics_path, rows)

    def checkpoint():
        save_checkpoint(out, model, optimizer, {
            "step": step, "stream": stream.state_dict(),
            "aux_stream": aux_stream.state_dict() if aux_stream is not None else None,
            "config": config_dict, "extra": extra_state or {}}, d)

    model.train()
    status = "done"
    acc: dict = {}
    n_acc, tokens, t_log = 0, 0, time.perf_counter()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    bar = tqdm(total=total, initial=step, desc=desc, disable=not (opts.progress and main_rank), dynamic_ncols=True,
               file=sys.stderr) if tqdm else None
    with _SigintGuard() as guard, (bar if bar is not None else contextlib.nullcontext()):
        while step < total:
            with step_threads(per_step) as n_threads:  # "adaptive": the cores free of other jobs now
                in_epoch = step % steps_per_epoch
                n_micro = min(opts.grad_accum, nb - in_epoch * opts.grad_accum)
                lr = lr_at(step, total, opts.lr, opts.scheduler, opts.warmup_steps)
                for g in optimizer.param_groups:
                    g["lr"] = lr_at(step, total, g["base_lr"], opts.scheduler, opts.warmup_steps) if "base_lr" in g else lr
                for _ in range(n_micro):
                    # this rank's part of the global batch (all of it in one process)
                    mb = D.rank_batch(d, main, stream.next(), pad_id, PAD_MULTIPLE)
                    ab = D.rank_batch(d, aux, aux_stream.next(), pad_id, PAD_MULTIPLE) if aux_stream is not None else None
                    for b in (mb, ab):
                        if b is not None and b.row_share > 0:  # an idle rank's stand-in row is not counted
                            tokens += b.num_tokens
                    with autocast(device, opts.precision):
                        losses = step_fn(mb.to(device), ab.to(device) if ab is not None else None)
                    seen = losses if d is None else _reduced(d, losses, loss_names)  # the global batch's values
                    check_finite_losses(seen, loss_names, step + 1)
                    (losses["loss"] / n_micro).backward()
                    for k in loss_names:
                        if seen.get(k) is not None:
                            acc[k] = acc.get(k, 0.0) + seen[k].detach().float() / n_micro
                    del losses, seen
                check_finite_grads(param_names, params, opts.max_grad_norm, step + 1, d)  # and clips
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            used_threads.append(n_threads)
            step += 1
            n_acc += 1
            end_of_epoch = step % steps_per_epoch == 0
            if step % opts.log_every == 0 or end_of_epoch or step == total:
                if d is not None:
                    tokens = int(D.all_sum(d, torch.tensor([float(tokens)])))
                now = time.perf_counter()
                row = {"step": step, "epoch": round(step / steps_per_epoch, 6),
                       **{k: float(acc[k]) / n_acc if k in acc else None for k in loss_names}, "lr": lr,
                       "tokens_per_s": tokens / max(now - t_log, 1e-9)}
                if per_step is not None and used_threads:
                    row["threads"] = sum(used_threads) / len(used_threads)  # mean over the row's steps
                used_threads.clear()
                stop_now = False
                if end_of_epoch:
                    row.update(run_evals())
                    if stop_check is not None:
                        row["check"] = stop_check(model)
                        D.reshard(model)
                        model.train()
                        stop_now = bool(row["check"].get("stop"))
                rows.append(row)
                if main_rank:
                    append_metrics(metrics_path, [row])
                if bar is not None:
                    bar.set_postfix({k: f"{row[k]:.3f}" for k in loss_names if row[k] is not None}
                                    | {"tok/s": f"{row['tokens_per_s']:.0f}"}, refresh=False)
                acc = {}
                n_acc, tokens, t_log = 0, 0, time.perf_counter()
            if bar is not None:
                bar.update(1)
            if end_of_epoch and stop_now:
                break
            if d is not None:  # a Ctrl-C seen by any rank stops every rank at the same step
                guard.hit = bool(D.all_sum(d, torch.tensor([float(guard.hit)])) > 0)
            if step < total and (guard.hit or (opts.save_every and step % opts.save_every == 0)
                                 or (opts.stop_after and step >= opts.stop_after)):
                checkpoint()
                if guard.hit:
                    msg = (f"interrupted at step {step}/{total}; checkpoint in {out / f'{CKPT_PREFIX}{step}'} "
                           "(continue with resume)")
                    print(f"qru: {msg}", file=sys.stderr)
                    raise KeyboardInterrupt(msg)
                if opts.stop_after and step >= opts.stop_after:
                    status = "stopped"
                    break
    if status == "done":  # a finite last step can still leave an Inf weight: never save one as finished
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        bad = torch.tensor([float(not bool(torch.isfinite(D.local(p)).all())) for _, p in named])
        if d is not None:
            bad = D.all_sum(d, bad)
        for (n, _), b in zip(named, bad.tolist()):
            if b:
                raise NonFiniteLossError(f"training diverged at step {step}: parameter {n} has non-finite value(s) "
                                         "after the optimizer step; the model is not saved")
    return step, total, status, rows
