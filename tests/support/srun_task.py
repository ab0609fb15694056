"""``python -m tests.support.srun_task``: one task of ``srun -n N`` that forms the process
group from srun's variables alone (``init_distributed``), all-reduces, all-gathers through
``Comm`` and prints one ``OK rank=... world=... sum=... ranks=[...] backend=...`` line."""

from __future__ import annotations


def main() -> None:
    """Form the group from the environment, check it with two collectives, print the result."""
    import torch
    import torch.distributed as dist

    from noether_dist.dist.comm import Comm, init_distributed

    env = init_distributed(timeout_s=60)
    assert env.launcher == "slurm", env
    total = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(total)
    ranks = Comm(timeout_s=60).all_gather(env.rank)
    print(f"OK rank={env.rank} world={dist.get_world_size()} sum={total.item()} ranks={ranks} "
          f"backend={dist.get_backend()}", flush=True)


if __name__ == "__main__":
    main()
