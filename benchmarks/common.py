"""Helpers shared by the benchmarks: models of a given size, timing across ranks, raw
writes, resident memory, and the figures (ratios with goals) that run.py reports."""

from __future__ import annotations

import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

MiB = 1 << 20
GiB = 1 << 30


# -- figures -------------------------------------------------------------------------
@dataclass(frozen=True)
class Figure:
    """One reported ratio: ``value = numerator / denominator`` and the goal it is held to."""

    key: str
    value: float
    goal: str
    """e.g. ``>= 0.85``, ``<= 1.10``, ``== 1.0 (+-1%)`` or ``info`` (no goal)."""
    numerator: str
    denominator: str
    note: str = ""

    @property
    def met(self) -> bool | None:
        """True/False against the goal; None for ``info`` figures."""
        if not math.isfinite(self.value):
            return False
        op, _, rest = self.goal.partition(" ")
        if op == "info":
            return None
        bound = float(rest.split()[0])
        if op == ">=":
            return self.value >= bound
        if op == "<=":
            return self.value <= bound
        if op == "==":
            return abs(self.value - bound) <= 0.01 * bound
        raise ValueError(f"unknown goal {self.goal!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (with ``met``)."""
        return {**asdict(self), "met": self.met}


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is zero (a figure that could not be measured)."""
    return a / b if b else float("nan")


def median(values: Iterable[float]) -> float:
    """Median of the values (NaN for none)."""
    values = list(values)
    return statistics.median(values) if values else float("nan")


# -- rank side -----------------------------------------------------------------------
def barrier() -> None:
    """A barrier over the default group (no-op without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds from a barrier before ``fn`` on every rank to a barrier after it, and its value:
    the wall time of the slowest rank, the same on every rank."""
    barrier()
    start = time.perf_counter()
    value = fn()
    barrier()
    return time.perf_counter() - start, value


def layer_dim(total_bytes: int, layers: int, element_size: int, multiple: int = 32) -> int:
    """The width ``d`` of ``layers`` square (d x d) matrices holding about ``total_bytes``."""
    d = int(math.sqrt(total_bytes / (layers * element_size)))
    return max(multiple, d // multiple * multiple)


def build_model(total_bytes: int, *, layers: int = 8, dtype: Any = None, device: str = "cpu", seed: int = 0) -> Any:
    """A stack of bias-free Linear layers with about ``total_bytes`` of parameters,
    FSDP2-sharded over the default process group when there is one (each rank holds
    1/world_size of it), filled with random values that differ per rank."""
    import torch
    import torch.distributed as dist
    from torch import nn

    dtype = dtype or torch.float32
    elem = torch.empty((), dtype=dtype).element_size()
    d = layer_dim(total_bytes, layers, elem)
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(d, d, bias=False, dtype=dtype) for _ in range(layers)])
    if dist.is_available() and dist.is_initialized():
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    model.to_empty(device=device)
    gen_rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    torch.manual_seed(seed * 1000 + gen_rank)
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.uniform_(-1.0, 1.0)
    return model


def local_tensors(state: dict[str, Any]) -> list[Any]:
    """This rank's own tensors of a (possibly DTensor) state dict, in key order."""
    import torch

    out = []
    for key in sorted(state):
        value = state[key]
        if hasattr(value, "to_local"):
            value = value.to_local()
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, dict):
            out.extend(local_tensors(value))
    return out


def nbytes(tensors: Iterable[Any]) -> int:
    """Total bytes of the tensors."""
    return sum(t.numel() * t.element_size() for t in tensors)


def as_bytes_view(tensor: Any) -> memoryview:
    """A flat byte view of a contiguous CPU tensor of any dtype (bf16 included), no copy."""
    import torch

    return memoryview(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())


def raw_write(path: str, tensors: Iterable[Any]) -> int:
    """Write the tensors' bytes to one new file and fsync it: the raw disk baseline."""
    written = 0
    with open(path, "wb") as fh:
        for t in tensors:
            written += fh.write(as_bytes_view(t))
        fh.flush()
        os.fsync(fh.fileno())
    return written


def clear_dir(path: str, rank: int, settle: bool = True) -> None:
    """Rank 0 empties ``path``; then all ranks meet and (``settle``) the page cache is
    written back, so that the next timed step starts from a quiet disk."""
    if rank == 0 and os.path.isdir(path):
        for name in os.listdir(path):
            full = os.path.join(path, name)
            shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) else os.unlink(full)
    barrier()
    if settle:
        os.sync()
        barrier()


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return proc_status_bytes("VmRSS")
