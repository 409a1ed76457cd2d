"""Compatibility layers that let unmodified Megatron-Core run where it was not written for.

See ``megatron_paced.compat.cpu`` and ``patches/README.md``.
"""

from megatron_paced.compat.cpu import (
    cpu_compat_in_this_thread, enable_cpu_compat, is_cpu_compat_enabled,
)

__all__ = ["cpu_compat_in_this_thread", "enable_cpu_compat", "is_cpu_compat_enabled"]
