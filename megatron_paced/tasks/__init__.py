"""Built-in tasks with exact verifiers (synthetic, controllable difficulty)."""
