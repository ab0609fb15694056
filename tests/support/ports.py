"""Free TCP ports for test processes (torchrun masters, local servers): the one place tests pick ports.

The operating system hands out a port that nothing listens on; a run given its own port
never clashes with another test run on the same machine. Launches that can choose for
themselves (``torchrun --standalone``, ``run_ranks``' file rendezvous) need none.
"""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
