"""Small helpers shared across the package: derived RNG seeds, free ports, and an
environment without torchrun's variables.

``derive_seed`` is splitmix64 over a tuple of ints: every random draw of the run (a selection
step's tie-breaking, a replay draw, ...) seeds its own generator from (run seed, step, stream,
...), so a draw never depends on how many draws came before it, which is what makes a resumed
run, and the same run on another layout, draw the same numbers.

Usage::

    gen = torch.Generator().manual_seed(derive_seed(seed, step, REPLAY_STREAM))
    port = free_port()                    # a free TCP port on 127.0.0.1
"""

from __future__ import annotations

import contextlib
import random
import socket

_MASK64 = (1 << 64) - 1


def derive_seed(*values: int) -> int:
    """splitmix64 over a tuple of ints: a 63-bit generator seed."""
    x = 0
    for value in values:
        x = (x ^ (value & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


# Ports handed out by free_port: below Linux's default ephemeral range (32768-60999), where
# the kernel picks the local port of every outgoing connection, so that none of those takes
# the port between the check and the bind of the process that will listen on it.
PORT_RANGE = (20000, 32000)


def free_port(host: str = "127.0.0.1", count: int = 1) -> int:
    """The first of ``count`` consecutive TCP ports that are free on ``host`` now ("" for
    every interface), drawn from :data:`PORT_RANGE`."""
    rng = random.Random()
    for _ in range(1000):
        base = rng.randrange(PORT_RANGE[0], PORT_RANGE[1] - count)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    stack.enter_context(socket.socket()).bind((host, port))
        except OSError:
            continue
        return base
    raise OSError(f"no {count} consecutive free ports in {PORT_RANGE} on {host!r}")


# What torchrun and its elastic agent put in a worker's environment. A server started from a
# worker must not inherit them: its own init_process_group (tcp://, env://) and weight-update
# group would meet the trainer's store or rank instead of their own.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                      "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME",
                      "MASTER_ADDR", "MASTER_PORT")
TORCHRUN_PREFIXES = ("TORCHELASTIC_", "TORCH_ELASTIC_")


def is_torchrun_variable(name: str) -> bool:
    return name in TORCHRUN_VARIABLES or name.startswith(TORCHRUN_PREFIXES)
