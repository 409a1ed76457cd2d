"""Which data-parallel rank owns which prompt: one rule for the log-Z table and the replay.

Prompt rows ``0 <= row < num_prompts`` (the dataset index) are split in contiguous blocks of
``rows_per_rank = ceil(num_prompts / dp_size)``; ``owner(row) = row // rows_per_rank``, and
rank r owns ``[row_start, row_end)`` (the last block may be shorter, or empty). Blocks keep a
checkpoint's global tensors contiguous, so they re-partition on any DP size.

Usage::

    part = PromptPartition.of(num_prompts=1001, dp_group=ctx.dp_group)
    part.owner_of(torch.tensor([0, 1000]))     # DP4: tensor([0, 3])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class PromptPartition:
    num_prompts: int
    dp_rank: int
    dp_size: int

    @classmethod
    def of(cls, num_prompts: int, dp_group: dist.ProcessGroup | None) -> "PromptPartition":
        if dp_group is None:
            return cls(num_prompts, 0, 1)
        return cls(num_prompts, dist.get_rank(dp_group), dist.get_world_size(dp_group))

    @property
    def rows_per_rank(self) -> int:
        return -(-self.num_prompts // self.dp_size)

    @property
    def row_start(self) -> int:
        return min(self.dp_rank * self.rows_per_rank, self.num_prompts)

    @property
    def row_end(self) -> int:
        return min(self.row_start + self.rows_per_rank, self.num_prompts)

    def owner_of(self, rows):
        """Owning DP rank of each row (a tensor or an int)."""
        return rows // self.rows_per_rank
