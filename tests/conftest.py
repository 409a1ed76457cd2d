"""Shared test helpers. Tests that import Megatron-Core and switch the CPU compatibility
layer on run in a subprocess, so the pytest process itself keeps a pristine torch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch


def run_python(code: str, *args: str, env: dict[str, str] | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a Python snippet (or ``-m module`` when ``code`` starts with ``-m ``) in a child."""
    command = [sys.executable]
    command += code.split() if code.startswith("-m ") else ["-c", textwrap.dedent(code)]
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
