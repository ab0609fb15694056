"""Talking to other ranks: the one communicator over torch.distributed, preemption agreement, process-mode checks."""
