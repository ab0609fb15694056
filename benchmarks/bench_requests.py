"""S3 requests of a save and a resume as the world size grows, next to plain DCP (rank side).

The state is the issue's: 8 ``Linear(64, 64)`` layers, FSDP2-sharded, AdamW after one step,
and trainer state (common and per rank). Every request the moto server answers is counted
by moto's own recorder (rank 0 starts and stops it between barriers, so every rank's
requests fall inside): two ``Checkpointer.save`` calls, one ``resume`` of ``latest``, and
plain DCP on the same store (``dcp.save`` and one ``dcp.load`` of model and optimizer
through DCP's own fsspec writer and reader).

:func:`classify` sorts the requests by what they touch (listing, ``.metadata``, data file,
commit record, alias) and method, for the tables in benchmarks/README.md.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlparse

from benchmarks.common import barrier

log = logging.getLogger(__name__)

LAYERS, WIDTH = 8, 64
AGENT_TAG = "noether-bench-rank/"


def by_rank(requests: list[dict[str, str]], world_size: int) -> list[int]:
    """Requests per rank (from the rank's tag in the User-Agent); requests without a tag
    are not counted here."""
    out = [0] * world_size
    for req in requests:
        match = re.search(re.escape(AGENT_TAG) + r"(\d+)", req.get("agent", ""))
        if match:
            out[int(match.group(1))] += 1
    return out


def classify(requests: list[dict[str, str]]) -> dict[str, int]:
    """Counts by ``METHOD what``: what is list, metadata, data, commit, alias or other."""
    out: Counter[str] = Counter()
    for req in requests:
        url = urlparse(req["url"])
        query = parse_qs(url.query)
        key = url.path.strip("/").split("/", 1)[1] if "/" in url.path.strip("/") else ""
        if req["method"] == "GET" and (not key or "list-type" in query or "prefix" in query):
            what = "list"
        elif key.endswith(".metadata"):
            what = "metadata"
        elif key.endswith(".distcp"):
            what = "data"
        elif "/_commits/" in f"/{key}":
            what = "commit"
        elif "/_aliases/" in f"/{key}":
            what = "alias"
        else:
            what = "other"
        out[f"{req['method']} {what}"] += 1
    return dict(sorted(out.items()))


def _build(seed: int) -> tuple[Any, Any]:
    import torch
    from torch import nn

    from noether_dist.trainer.model import shard_model

    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
    shard_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, WIDTH)).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def request_counts(rank: int, world_size: int, *, endpoint: str, extra: dict[str, Any], bucket: str,
                   prefix: str = "scale", plain_dcp: bool = True) -> dict[str, Any]:
    """Requests (all ranks together) of two saves, one resume, and plain DCP's save and load,
    each as ``{"total": n, "by_kind": {...}}``; ``loaded_equal`` says the resume restored the
    saved model and optimizer."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from benchmarks.s3 import start_recording, stop_recording
    from noether_dist import Checkpointer, CheckpointerConfig, StorageOptions, TrainingIteration, resume
    from noether_dist.io.storage import open_storage

    # each rank's User-Agent names it, so that the recording tells whose request it was
    extra = {**extra, "config_kwargs": {"user_agent_extra": f"{AGENT_TAG}{rank}"}}
    opts = StorageOptions(endpoint_url=endpoint, extra=dict(extra))
    root = f"s3://{bucket}/{prefix}/ws{world_size}"
    storage = open_storage(root, opts)
    model, opt = _build(seed=0)

    def counted(fn: Callable[[], Any]) -> dict[str, Any]:
        barrier()
        if rank == 0:
            start_recording(endpoint)
        barrier()
        fn()
        barrier()
        requests = stop_recording(endpoint) if rank == 0 else []
        barrier()
        return {"total": len(requests), "by_kind": classify(requests), "by_rank": by_rank(requests, world_size)}

    ck = Checkpointer(CheckpointerConfig(output_dir=root, run_id="r", model_name="m", storage=opts, timeout_s=120),
                      storage=storage)

    def two_saves() -> None:
        for step in (1, 2):
            ck.save(TrainingIteration(0, step, step * 8), model=model, optimizer=opt, trainer_state={"step": step},
                    rank_state={"rank": rank})

    out: dict[str, Any] = {"save2": counted(two_saves)}
    ck.close()
    target, target_opt = _build(seed=1)
    cfg = {"output_dir": root, "resume_run_id": "r"}
    out["resume"] = counted(lambda: resume(cfg, model=target, optimizer=target_opt, model_name="m",
                                           storage=storage, timeout_s=120))
    saved = get_state_dict(model, opt)
    loaded = get_state_dict(target, target_opt)
    out["loaded_equal"] = _equal(saved, loaded)
    if plain_dcp:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

        fs_kwargs = {**extra, "client_kwargs": {"endpoint_url": endpoint}, "use_listings_cache": False,
                     "skip_instance_cache": True}
        path = f"{root}/plain-dcp"
        msd, osd = get_state_dict(model, opt)
        out["dcp_save"] = counted(lambda: dcp.save({"model": msd, "optim": osd},
                                                   storage_writer=FsspecWriter(path, **fs_kwargs)))
        tm, to = _build(seed=2)
        tmsd, tosd = get_state_dict(tm, to)
        out["dcp_load"] = counted(lambda: dcp.load({"model": tmsd, "optim": tosd},
                                                   storage_reader=FsspecReader(path, **fs_kwargs)))
    torch.distributed.barrier() if torch.distributed.is_initialized() else None
    return out


def _equal(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        x = a.to_local() if hasattr(a, "to_local") else a
        y = b.to_local() if hasattr(b, "to_local") else b
        return bool(torch.equal(x, y))
    return a == b


def scale_table(server: Any, world_sizes: list[int], *, timeout_s: float, plain_dcp: bool = True) -> list[dict[str, Any]]:
    """One row per world size: requests of two saves, a resume and plain DCP (parent side)."""
    from tests.support.ranks import run_jobs

    bucket = "nd-bench-scale"
    server.create_bucket(bucket)
    rows = []
    for ws in world_sizes:
        kw = {"endpoint": server.endpoint_url, "extra": server.storage_extra(), "bucket": bucket,
              "plain_dcp": plain_dcp}
        res = run_jobs([(request_counts, kw)], ws, timeout_s=timeout_s)[0][0]
        if not res["loaded_equal"]:
            raise RuntimeError(f"requests ws={ws}: the resumed state differs from the saved one")
        row = {"world_size": ws, "save2": res["save2"]["total"], "resume": res["resume"]["total"],
               "dcp_save": res.get("dcp_save", {}).get("total"), "dcp_load": res.get("dcp_load", {}).get("total"),
               "by_kind": {k: v["by_kind"] for k, v in res.items() if isinstance(v, dict)},
               "by_rank": {k: v["by_rank"] for k, v in res.items() if isinstance(v, dict)}}
        log.info("requests ws=%d: two saves %d, resume %d, dcp.save %s, dcp.load %s; resume %s", ws, row["save2"],
                 row["resume"], row["dcp_save"], row["dcp_load"], row["by_kind"]["resume"])
        rows.append(row)
    return rows
