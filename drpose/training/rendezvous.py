"""A free TCP port for a process group's rendezvous, so that runs on one machine do not collide.

``python -m drpose.training.rendezvous`` prints one (the Makefile hands it to the deepspeed launcher).
"""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    print(free_port())
