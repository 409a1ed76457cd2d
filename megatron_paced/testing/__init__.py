"""Test utilities that ship with the package: the multi-process harness (``distributed``)."""
