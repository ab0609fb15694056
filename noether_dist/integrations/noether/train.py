"""Launch a Noether run with noether_dist: ``noether-train``, made to work under torchrun too.

Noether starts its distributed setup only under SLURM (``SLURM_PROCID``); started by torchrun,
every process believes it is alone (and, on CPU, Noether would not even sync gradients). This
entry point sets the process group up from torchrun's variables BEFORE Noether looks, so that
Noether's own rank, world size, seeds, samplers and DDP see the real job, then runs Noether's
``noether-train`` unchanged::

    torchrun --nproc-per-node=4 -m noether_dist.integrations.noether.train configs/train.yaml [overrides]
    torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 \\
        -m noether_dist.integrations.noether.train configs/train.yaml
    srun --ntasks-per-node=8 python -m noether_dist.integrations.noether.train configs/train.yaml

Under srun (no torchrun) Noether's own SLURM path sets everything up; this entry point only
passes through, except for one race it removes on either launcher: Noether 2026.4.0 has every
rank of a resumed run replace the stage's ``ancestor`` symlink (``PathProvider.link``), so on
two or more ranks one of them fails with FileExistsError at random; here rank 0 alone links. With torchrun, leave ``devices`` unset in the config (one device per
process: ``CUDA_VISIBLE_DEVICES`` is narrowed to this process's local rank).
"""

from __future__ import annotations

import logging
import os

__all__ = ["prepare_torchrun", "link_ancestor_on_rank0", "main"]

log = logging.getLogger(__name__)


def prepare_torchrun(env: dict[str, str] | None = None) -> bool:
    """Set the process group up from torchrun's variables (idempotent); True when this is
    a torchrun worker of a job with more than one process."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" not in env and not ("RANK" in env and "WORLD_SIZE" in env and "SLURM_PROCID" not in env):
        return False
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return False
    # torchrun inside a SLURM allocation: Noether would take the SLURM path and start its own
    # process group; this process belongs to torchrun's job.
    env.pop("SLURM_PROCID", None)
    local = int(env.get("LOCAL_RANK", "0"))
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    # Noether expects exactly one visible device per process (set before CUDA initialises).
    if len(visible) > 1:
        env["CUDA_VISIBLE_DEVICES"] = visible[local % len(visible)]
    elif not visible and "CUDA_VISIBLE_DEVICES" not in env:
        env["CUDA_VISIBLE_DEVICES"] = str(local)
    from ...dist.comm import init_distributed

    init_distributed()
    return True


def link_ancestor_on_rank0() -> None:
    """Make Noether's ``PathProvider.link`` (the ``ancestor`` symlink of a resumed run, a
    convenience nothing reads back) run on rank 0 only (idempotent)."""
    from noether.core.distributed import is_rank0
    from noether.core.providers import PathProvider

    link = PathProvider.link
    if getattr(link, "_noether_dist_rank0", False):
        return

    def rank0_link(self: PathProvider, ancestor: PathProvider) -> None:
        if is_rank0():
            link(self, ancestor)

    rank0_link._noether_dist_rank0 = True  # type: ignore[attr-defined]
    PathProvider.link = rank0_link  # type: ignore[method-assign]


def main() -> None:
    """Entry point: prepare torchrun, then run Noether's ``noether-train``."""
    prepare_torchrun()
    link_ancestor_on_rank0()
    from noether.training.cli import main_train  # rewrites sys.argv for hydra on import

    main_train.main()


if __name__ == "__main__":
    main()
