"""Data-parallel training over torchrun's processes: process-group setup, gathers with gradients, epoch shards.

``torchrun --nproc_per_node N -m encoderlab ...`` starts N processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` set; ``init_from_env`` joins them into one process group (NCCL when training on
CUDA, gloo on CPU) and pins each process to the GPU of its ``LOCAL_RANK``. Without torchrun's variables (or with a
world of one) it sets nothing up and everything here degrades to the single-process case, so a client calls the
same functions either way.

How ``loop.fit`` trains data-parallel (see there): every rank draws the same permutation of the items from the shared
seed, takes its ``shard_indices`` and splits the shard into the same number of batches, so batch ``b`` of the global
run is the union of every rank's batch ``b``. Gradients are averaged by ``average_gradients`` (one flat all-reduce
per optimizer step) rather than by wrapping the model in ``DistributedDataParallel``: the loop's step functions
call any submodule of the model directly, and DDP only synchronizes gradients of a forward that went through its
wrapper; a manual average also leaves state-dict keys alone (no ``module.`` prefix in checkpoints) and reduces once
per accumulation group, which is what DDP's ``no_sync`` would be needed for.

Contrastive losses need the negatives of every rank: ``all_gather_with_grad`` gathers features so that the local
slice keeps its gradient and the gradients other ranks computed for it come back (``losses`` has the global losses).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import EncoderlabError

#: what torchrun sets for every process it starts (LOCAL_RANK picks the GPU)
ENV_VARS: tuple[str, ...] = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
BACKENDS: tuple[str, ...] = ("nccl", "gloo")
#: elements per all-reduce of flattened gradients: big enough to amortize the launch, small enough that the
#: temporary copy stays a fraction of the gradients' memory (DDP's default bucket is 25 MB)
BUCKET_ELEMENTS = 1 << 23

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run; ``backend`` None: a single process without a process group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise EncoderlabError(f"${name} is not set", "launch with torchrun, which sets " + ", ".join(ENV_VARS))
        return default
    try:
        return int(value)
    except ValueError:
        raise EncoderlabError(f"${name} must be an integer, got {value!r}", "launch with torchrun") from None


def _device_of(device: str | torch.device, local_rank: int, backend: str | None) -> torch.device:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` for CUDA (shared GPUs only with gloo), else CPU."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto"
                       else device)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise EncoderlabError(f"device {device!r} asked for, but CUDA is not available", "pass device='cpu'")
    count = torch.cuda.device_count()
    if local_rank >= count:
        if backend != "gloo":  # NCCL refuses two ranks of one communicator on the same GPU
            raise EncoderlabError(f"LOCAL_RANK {local_rank} but only {count} GPU(s) on this node",
                                  f"start at most {count} processes per node (torchrun --nproc_per_node {count})")
        local_rank %= count  # gloo: ranks may share a GPU (a check on a 1-GPU machine)
    return torch.device("cuda", local_rank)


def init_from_env(device: str | torch.device = "auto", *, backend: str | None = None,
                  timeout_s: float = 1800.0) -> DistInfo:
    """Join torchrun's process group (from its environment variables); a single process gets ``DistInfo()``.

    ``device`` is where this rank trains ("auto": CUDA when available); on CUDA each rank is pinned to
    ``cuda:LOCAL_RANK`` and the backend is NCCL, on CPU it is gloo (``backend`` overrides the choice).
    ``timeout_s`` bounds a collective's wait: rank 0 writing a large checkpoint while the others wait at a barrier
    must not trip it (NCCL's default is 10 minutes). Calling it again in an initialised process returns the info.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if backend is not None and backend not in BACKENDS:
        raise EncoderlabError(f"unknown distributed backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
    if world < 1 or not 0 <= rank < world:
        raise EncoderlabError(f"RANK {rank} / WORLD_SIZE {world} is not a valid process", "launch with torchrun")
    if world == 1:  # nothing to synchronize: no process group, no port to bind
        dev = _device_of(device, local_rank, "gloo")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(device=dev)
    if not os.environ.get("MASTER_ADDR"):
        raise EncoderlabError("$MASTER_ADDR is not set", "launch with torchrun, which sets " + ", ".join(ENV_VARS))
    _env_int("MASTER_PORT")  # set and an integer: env:// would fail later with a less helpful message
    if not dist.is_available():
        raise EncoderlabError("this torch build has no torch.distributed", "install a torch build with distributed")
    dev = _device_of(device, local_rank, backend)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if backend == "nccl" and not dist.is_nccl_available():
        raise EncoderlabError("backend nccl is not available in this torch build", "use backend='gloo'")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # before the group: NCCL binds its communicator to the current device
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, backend, dev)


def active() -> bool:
    """Whether a process group with more than one process is initialised (else: single-process training)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    """Number of processes training together (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0, the one that writes files and shows progress (also True for a single process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing for a single process)."""
    if not active():
        return
    if dist.get_backend() == "nccl":  # name the GPU: NCCL would otherwise guess one and may warn or hang
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (a no-op without one), so the process exits without NCCL's warnings."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (bound to port 0 and released): the rendezvous port of a local test run."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def launched(rank: int, world: int, port: int, *, device: str | torch.device = "cpu", backend: str | None = None,
             host: str = "127.0.0.1") -> Iterator[DistInfo]:
    """Run the body as rank ``rank`` of ``world`` local processes, as torchrun would (tests, checks).

    Sets torchrun's variables, calls ``init_from_env``, and on exit leaves the group and restores the environment.
    """
    saved = {name: os.environ.get(name) for name in ENV_VARS}
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR=host,
                      MASTER_PORT=str(port))
    try:
        yield init_from_env(device, backend=backend, timeout_s=120.0)  # a test that hangs should fail, not wait
    finally:
        cleanup()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ---- a command under torchrun -------------------------------------------------------------------------------


@contextlib.contextmanager
def joined(device: str | torch.device = "auto", *, timeout_s: float = 1800.0) -> Iterator[DistInfo]:
    """torchrun's process group for the body (``init_from_env``), left again on the way out, also on an error.

    Without torchrun (``WORLD_SIZE`` unset or 1) nothing is set up and the body gets ``DistInfo()``, whose device
    is not resolved (the caller keeps its own). A group that was initialised before is used and left alone.
    """
    if _env_int("WORLD_SIZE", 1) <= 1:
        yield DistInfo()
        return
    owned = not (dist.is_available() and dist.is_initialized())
    try:
        yield init_from_env(device, timeout_s=timeout_s)
    finally:
        if owned:
            cleanup()


def all_ok(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank (one all-reduce every rank must enter; ``ok`` itself without a group)."""
    if not active():
        return ok
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    failed = torch.tensor([0 if ok else 1], dtype=torch.int32, device=on)
    dist.all_reduce(failed)
    return int(failed.item()) == 0


@contextlib.contextmanager
def together(what: str) -> Iterator[None]:
    """Run the body on every rank; when it raises on one rank, fail on all (``what`` names the step for them).

    Without this a rank whose body failed leaves, and the others wait in their next collective until the group's
    timeout. The body must enter no collective itself: every rank enters exactly one all-reduce, at its end.
    """
    if not active():
        yield
        return
    try:
        yield
    except Exception:
        all_ok(False)  # tell the others, then fail with the real error here
        raise
    if not all_ok(True):
        raise EncoderlabError(f"another process of the run failed while {what}",
                              "its error is on stderr (torchrun's summary names its rank); fix it and run again")


def main_first(fn: Callable[[], T], what: str) -> T:
    """``fn()`` on rank 0, then on the other ranks: rank 0 fills a shared cache (the embedding store), the others
    then read it instead of computing and writing the same again. A failure anywhere fails every rank.

    The others wait for rank 0 in a collective, within the group's timeout (``init_from_env``'s ``timeout_s``).
    """
    with together(what):
        first = fn() if is_main() else None
    with together(what):
        later = None if is_main() else fn()
    return first if is_main() else later  # type: ignore[return-value]


# ---- epoch shards ---------------------------------------------------------------------------------------------


def shard_indices(perm: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s part of an epoch's permutation: every ``world``-th item from ``rank``, all parts equal.

    The remainder (``len(perm) % world`` items, the permutation's last) is dropped, not padded: a padded item would
    appear twice in a global batch, counted twice in the loss and, for a contrastive loss, a false negative of
    itself; dropping at most ``world - 1`` items, a different random few each epoch, leaves nothing out for good.
    Equal parts keep every collective's shapes equal. Strided rather than contiguous parts: when each rank splits
    its part into the same number of batches, the union of the ranks' batch ``b`` is a contiguous block of the
    permutation, the batch a single process would see when the sizes divide evenly.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    if len(perm) < world:
        raise EncoderlabError(f"{len(perm)} items cannot be shared by {world} processes",
                              f"train on at least {world} items or start fewer processes")
    return perm[rank : len(perm) - len(perm) % world : world]


# ---- collectives ------------------------------------------------------------------------------------------------


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient of the gathered tensor and keeps our slice.

    With ``L = sum_r L_r`` (each rank's loss uses every rank's features), ``dL/dx_k = sum_r dL_r/dx_k``: rank r's
    backward produces ``dL_r/d(gathered)``, the all-reduce sums them over r, and rank k keeps rows of its own x.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # all_reduce writes in place; autograd may hand us a shared buffer
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order, differentiable (``x`` itself without a group).

    Every rank must pass the same shape (``shard_indices`` makes batches equal). The gradient reaching ``x`` is the
    sum over ranks of their losses' gradients with respect to it; see ``losses.symmetric_infonce_global`` for how
    that combines with the loop's gradient averaging.
    """
    return _GatherWithGrad.apply(x) if active() else x


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0, without gradient (content ids, labels)."""
    if not active():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def sum_float(value: float, device: torch.device) -> float:
    """The sum of ``value`` over ranks (``device``: where the backend can reduce, CUDA for NCCL)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable values: a metric and its record fields)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order, on every rank (all-gather: ``gather_object`` is not on every backend)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_tensors(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values (parameters at the start, buffers at checkpoints)."""
    if not active():
        return
    for t in tensors:
        dist.broadcast(t, src=0)


@torch.no_grad()
def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Replace each ``.grad`` by its mean over ranks: the gradient of the mean of the ranks' losses.

    Gradients travel flattened, a few large all-reduces per (device, dtype) instead of one per tensor. A parameter
    without a gradient on some rank (unused by its batch) counts as zero there, so every rank issues the same
    collectives; one without a gradient on every rank keeps ``None``, as a single process would leave it (AdamW
    then skips it, weight decay included). Call it on every rank, with the parameters in the same order.
    """
    if not active():
        return
    n = dist.get_world_size()
    groups: dict[tuple[torch.device, torch.dtype], list[torch.nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    for (device, dtype), group in groups.items():
        for bucket in _buckets(group):
            has = torch.tensor([p.grad is not None for p in bucket], dtype=dtype, device=device)
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket]
                             + [has])  # the flags ride along: one all-reduce says who had a gradient
            dist.all_reduce(flat)
            counts, offset = flat[-len(bucket):].tolist(), 0
            for p, count in zip(bucket, counts):
                size = p.numel()
                if count > 0:
                    p.grad = flat[offset : offset + size].view_as(p).div_(n)
                offset += size


def _buckets(params: list[torch.nn.Parameter]) -> Iterator[list[torch.nn.Parameter]]:
    """Consecutive runs of parameters of about ``BUCKET_ELEMENTS`` elements (a larger tensor is its own bucket)."""
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for p in params:
        if bucket and size + p.numel() > BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket
