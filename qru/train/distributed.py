"""Data-parallel training across processes on PyTorch's FSDP2 (``fully_shard``) and DCP
(``torch.distributed.checkpoint``): process-group set-up, sharding, the rank split of a global
batch, reductions, sharded checkpoints and the gathered final weights.

Launch: ``torchrun --nproc-per-node N -m qru unlearn ...`` (or ``pretrain``). A process started by
torchrun (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` set) trains sharded, even at world size 1;
any other process trains as before, in one process. NCCL on GPUs, gloo on CPU.

- **Sharding.** Every decoder layer is one ``fully_shard`` unit, the root (embeddings, final
  norm, head; tied or not) another. ``--precision bf16`` with fp32 master weights gathers bf16
  parameters and reduces gradients in fp32 (``MixedPrecisionPolicy``); ``--master-dtype bf16``
  is pure bf16 (bf16 weights and optimizer state; the reduction still runs in fp32).
- **Gradient reduction is a sum.** gloo has neither ``AVG`` nor ``PREMUL_SUM`` (FSDP2's default
  ops), so every FSDP unit reduces with a plain SUM and a divide factor of 1, and each rank's loss
  is pre-weighted by its share of the global batch's denominator (:func:`split_batch`): rows for a
  per-sequence mean (NPO, SimNPO), target tokens for a token mean (GA, GDR, KLR, pre-training). The
  sum over ranks is then exactly the one-process loss of the global batch and its gradient.
- **Data.** Every rank reads the same data and draws the same global batch order (the seeded
  ``BatchStream``); rank r takes the r-th contiguous chunk of each global batch. A rank whose chunk
  is empty (a short last batch) runs one real row with weight 0, so every rank runs the same
  collectives.
- **Checkpoints.** DCP, one file per rank, into a stage directory that rank 0 commits with one
  rename (:func:`save_sharded`); DCP reshards on load, so a run may resume at another world size.
  The work directory must be on a file system every rank sees.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from qru.model import lora
from qru.io import fault_point
from qru.model.checkpoint import INDEX, SINGLE, parse_size, pretrained_files, write_pretrained
from qru.train.data import Batch, TokenizedSet, collate

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SHARDED_MARKER = ".metadata"  # the file DCP writes last into a checkpoint directory


class LaunchError(ValueError):
    """A multi-process launch that cannot work (environment, world size, a rank missing data).
    The message names the rank and the problem."""


@dataclass
class Dist:
    """This process's place in the job."""
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str
    mesh: object  # torch.distributed.device_mesh.DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True in a process started by torchrun (or with the same environment variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str) -> int:
    v = os.environ.get(name)
    try:
        return int(v)
    except (TypeError, ValueError):
        raise LaunchError(f"distributed launch: environment variable {name}={v!r} is not an integer "
                          "(start the job with torchrun)") from None


def resolve_device(device: torch.device, local_rank: int) -> torch.device:
    """One device per rank: ``cuda:LOCAL_RANK`` on GPUs, the CPU otherwise."""
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise LaunchError(f"distributed launch: local rank {local_rank} has no GPU (this node has {n}); "
                              "use --nproc-per-node <= the GPU count")
        return torch.device("cuda", local_rank)
    return torch.device(device.type)


def init(device: torch.device, timeout_s: float = 600.0) -> Dist:
    """Join (or reuse) the default process group: NCCL for CUDA, gloo otherwise."""
    missing = [v for v in ENV_VARS if v not in os.environ and v != "LOCAL_RANK"]
    if missing:
        raise LaunchError(f"distributed launch: environment variable(s) {', '.join(missing)} not set "
                          "(start the job with torchrun --nproc-per-node N -m qru ...)")
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if not 0 <= rank < world:
        raise LaunchError(f"distributed launch: RANK={rank} is not in [0, WORLD_SIZE={world})")
    device = resolve_device(device, local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    elif dist.get_world_size() != world or dist.get_rank() != rank:
        raise LaunchError(f"distributed launch: the process group (rank {dist.get_rank()} of "
                          f"{dist.get_world_size()}) disagrees with RANK={rank}, WORLD_SIZE={world}")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    return Dist(rank, world, local, device, dist.get_backend(), mesh)


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[Dist | None]:
    """``Dist`` when launched by torchrun (the process group is destroyed on exit if this call
    created it), else None."""
    if not launched():
        yield None
        return
    created = not dist.is_initialized()
    d = init(device)
    try:
        yield d
    except BaseException:
        if created and dist.is_initialized():
            dist.destroy_process_group()
        raise
    if created and dist.is_initialized():
        dist.barrier()  # no rank tears gloo down while a partner still talks to it (it aborts the partner)
        dist.destroy_process_group()


def check_batch(d: Dist | None, batch_size: int) -> None:
    """A data-parallel launch needs at least one row of every full global batch per rank."""
    if d is not None and batch_size < d.world:
        raise LaunchError(f"world size mismatch: batch_size {batch_size} is smaller than the world size {d.world} "
                          "(torchrun --nproc-per-node x --nnodes): every rank needs a row of each global batch; "
                          "raise --batch-size or launch fewer processes")


# -- agreement and reductions ---------------------------------------------------------------

def broadcast(d: Dist, obj):
    """Rank 0's ``obj`` on every rank (pickled)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(d: Dist | None, fn: Callable[[], object]):
    """Run ``fn`` on rank 0 only and return its result on every rank; an exception it raises is
    raised on every rank (so no rank waits for a partner that has failed)."""
    if d is None:
        return fn()
    res, err = None, None
    if d.is_main:
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            err = e
    res, err = broadcast(d, (res, err))
    if err is not None:
        raise err
    return res


def check_all(d: Dist | None, fn: Callable[[], object]):
    """Run ``fn`` on every rank and return this rank's result; if it raises on any rank, raise on
    every rank a :class:`LaunchError` naming the rank(s), their hosts and errors (in one process
    the exception propagates as it is)."""
    if d is None:
        return fn()
    res, err = None, None
    try:
        res = fn()
    except Exception as e:  # noqa: BLE001 - reported on every rank below
        err = f"{type(e).__name__}: {e}"
    gathered: list = [None] * d.world
    dist.all_gather_object(gathered, (socket.gethostname(), err))
    bad = [(r, host, e) for r, (host, e) in enumerate(gathered) if e is not None]
    if bad:
        raise LaunchError("; ".join(f"rank {r} (host {host}) failed: {e}" for r, host, e in bad))
    return res


def agree(d: Dist | None, what: str, value) -> None:
    """Raise a :class:`LaunchError` on every rank unless every rank has the same ``value``."""
    if d is None:
        return
    values: list = [None] * d.world
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        detail = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
        raise LaunchError(f"ranks disagree on {what} ({detail}): every rank must see the same data and options")


def all_sum(d: Dist | None, values: torch.Tensor) -> torch.Tensor:
    """Sum of a (small) tensor over the ranks, in fp64 on the CPU."""
    if d is None:
        return values.detach().double().cpu()
    t = values.detach().double().to(d.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def barrier(d: Dist | None) -> None:
    if d is not None:
        dist.barrier()


# -- the rank split of a global batch ----------------------------------------------------------

def split_batch(index: torch.Tensor, target_counts: torch.Tensor, rank: int, world: int
                ) -> tuple[torch.Tensor, float, float]:
    """Rank ``rank``'s rows of the global batch ``index`` (its contiguous chunk) and its shares of
    the global denominators: ``(rows, row_share, token_share)``. ``target_counts`` are the rows'
    target-token counts. An empty chunk gives the first row with both shares 0."""
    parts = torch.arange(len(index)).tensor_split(world)
    mine = parts[rank]
    if mine.numel() == 0:
        return index[:1], 0.0, 0.0
    tokens = float(target_counts.sum())
    return index[mine], mine.numel() / len(index), float(target_counts[mine].sum()) / tokens if tokens else 0.0


def target_counts(ts: TokenizedSet, index: torch.Tensor) -> torch.Tensor:
    """Target-token count of each listed example (position 0 is never a target)."""
    return torch.tensor([int(ts.example(int(i))[1].sum()) for i in index], dtype=torch.int64)


def rank_batch(d: Dist | None, ts: TokenizedSet, index, pad_id: int, multiple: int = 1) -> Batch:
    """This rank's part of the global batch ``index`` (the whole batch in one process), collated,
    with its ``row_share`` / ``token_share`` set (:func:`split_batch`)."""
    index = torch.as_tensor(list(index) if not torch.is_tensor(index) else index, dtype=torch.int64)
    if d is None:
        return collate(ts, index, pad_id, multiple)
    mine, row_share, token_share = split_batch(index, target_counts(ts, index), d.rank, d.world)
    b = collate(ts, mine, pad_id, multiple)
    b.row_share, b.token_share = row_share, token_share
    return b


# -- sharding ---------------------------------------------------------------------------------

def mp_policy(precision: str, master_dtype: str):
    """bf16 compute on fp32 master weights: bf16 gathered parameters, fp32 gradient reduction.
    Otherwise the weights' own dtype (fp32, or pure bf16) with the reduction in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16" and master_dtype == "fp32":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(reduce_dtype=torch.float32)


def shard_model(model: nn.Module, d: Dist, precision: str = "fp32", master_dtype: str = "fp32") -> nn.Module:
    """``fully_shard`` every decoder layer, then the root (embeddings, norm, head), in place;
    gradients are reduced with a plain sum (see the module docstring)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    policy = mp_policy(precision, master_dtype)
    for layer in model.model.layers:
        fully_shard(layer, mesh=d.mesh, mp_policy=policy)
    fully_shard(model, mesh=d.mesh, mp_policy=policy)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return model


def load_sharded_pretrained(d: Dist, build: Callable[[], nn.Module], load: Callable[[], nn.Module],
                            prepare: Callable[[nn.Module], None], precision: str, master_dtype: str) -> nn.Module:
    """A sharded model whose full weights only rank 0 reads: rank 0 ``load()``s the checkpoint on
    the CPU, the others ``build()`` it on the meta device; every rank ``prepare``s it (e.g. LoRA
    swaps), shards it, and rank 0's weights are broadcast into the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if d.is_main:
        model = load()
        full = model.state_dict()
    else:
        with torch.device("meta"):
            model = build()
        full = {}
    prepare(model)
    if d.is_main:
        full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shard_model(model, d, precision, master_dtype)
    if not d.is_main:
        model.to_empty(device=d.device)
    elif d.device.type != "cpu":
        model.to(d.device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    return model


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """Put a sharded model's parameters back in their shards. FSDP2 keeps the root unit
    (embeddings, norm, head) gathered after a forward, for the backward; after a forward-only pass
    (evaluation, reference log-probs) the module would otherwise expose the gathered tensors,
    not the sharded parameters the optimizer and the checkpoints hold."""
    if is_sharded(model):
        model.reshard()


@contextlib.contextmanager
def gathered(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Inside the block, the named parameters of a sharded model are plain, whole CPU tensors on
    every rank (gathered one by one; a collective), e.g. to write a LoRA adapter on rank 0."""
    saved = []
    try:
        for n in names:
            mod_name, _, leaf = n.rpartition(".")
            mod = model.get_submodule(mod_name)
            p = mod._parameters[leaf]
            saved.append((mod, leaf, p))
            mod._parameters[leaf] = nn.Parameter(full(p.detach()).cpu(), requires_grad=False)
        yield
    finally:
        for mod, leaf, p in reversed(saved):
            mod._parameters[leaf] = p


def write_model(model: nn.Module, stage: Path, d: Dist | None, max_shard_size: int | str = "2GB") -> None:
    """The HF checkpoint (``config.json`` + safetensors, the layout of
    :func:`qru.model.checkpoint.write_state_dict`) into ``stage``. Sharded: streamed shard by shard,
    each file's tensors gathered (every rank takes part) and written by rank 0, which holds one
    file's tensors at a time."""
    if d is None:
        write_pretrained(model, stage, max_shard_size)
        return
    sd, extra = pretrained_files(model, model.state_dict())  # sharded tensors: only names, shapes, dtypes read
    limit = parse_size(max_shard_size)
    files: list[list[str]] = [[]]
    used = 0
    for name, t in sd.items():  # the same split as write_state_dict
        nbytes = t.numel() * t.element_size()
        if files[-1] and used + nbytes > limit:
            files.append([])
            used = 0
        files[-1].append(name)
        used += nbytes
    n, weight_map = len(files), {}
    for i, names in enumerate(files, 1):
        tensors = {k: full(sd[k].detach()).cpu().contiguous() for k in names}
        if d.is_main:
            fname = SINGLE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(tensors, str(stage / fname), metadata={"format": "pt"})
            fault_point(f"shard {stage / fname}")
            weight_map.update({k: fname for k in names})
        del tensors
    if d.is_main:
        if n > 1:
            total = sum(t.numel() * t.element_size() for t in sd.values())
            (stage / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                  indent=2))
        for fname, text in extra.items():
            (stage / fname).write_text(text)


def write_adapter(model: nn.Module, stage: Path, d: Dist | None, base_model_name_or_path: str | None = None) -> None:
    """The PEFT adapter into ``stage``; sharded: the adapters gathered, rank 0 writes them."""
    if d is None:
        lora.write_adapter(model, stage, base_model_name_or_path=base_model_name_or_path)
        return
    names = [f"{n}.{w}" for n, _ in lora.lora_modules(model) for w in ("lora_A", "lora_B")]
    with gathered(model, names):
        if d.is_main:
            lora.write_adapter(model, stage, base_model_name_or_path=base_model_name_or_path)


# -- sharded checkpoints ------------------------------------------------------------------------

def _opts(strict: bool = True):
    """Trainable tensors only (a frozen LoRA base is not checkpointed); loading them cannot be strict
    about the frozen keys the state dict leaves out (:func:`load_sharded` checks the trainable ones)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def save_sharded(d: Dist, stage: Path | None, model: nn.Module, optimizer) -> Path:
    """Write the trainable parameters and the optimizer state with DCP, one file per rank, into
    rank 0's ``stage`` directory (broadcast to the others); returns it on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    stage = Path(broadcast(d, str(stage) if d.is_main else None))
    msd, osd = get_state_dict(model, optimizer, options=_opts())
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(stage))
    dist.barrier()
    return stage


def load_sharded(d: Dist, ckpt: Path, model: nn.Module, optimizer) -> None:
    """Restore what :func:`save_sharded` wrote (at any world size: DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_opts())
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}  # tied: both names
    unique = {n for n, p in model.named_parameters() if p.requires_grad}
    if not (unique <= set(msd) <= names):  # what DCP will fill must be exactly the trainable tensors
        raise LaunchError(f"resume: {ckpt}: the state to restore does not match the trainable parameters "
                          f"(differ: {sorted(set(msd) ^ unique)[:5]})")
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(ckpt))  # raises naming a key the checkpoint lacks
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                   options=_opts(strict=False))
