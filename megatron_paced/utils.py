"""Small helpers shared across the package: derived RNG seeds and free ports.

``derive_seed`` is splitmix64 over a tuple of ints: every random draw of the run (a selection
step's tie-breaking, a replay draw, ...) seeds its own generator from (run seed, step, stream,
...), so a draw never depends on how many draws came before it, which is what makes a resumed
run, and the same run on another layout, draw the same numbers.

Usage::

    gen = torch.Generator().manual_seed(derive_seed(seed, step, REPLAY_STREAM))
    port = free_port()                    # a free TCP port on 127.0.0.1
"""

from __future__ import annotations

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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now ("" for every interface)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
