"""PACED-RL components: the sharded log-Z table, prompt selection, priority replay."""
