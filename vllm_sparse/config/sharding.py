"""Which of the plan's heads one tensor-parallel rank runs.

Config rules and plans number heads as the unsharded model does. vLLM splits a layer's query heads
into `tp_size` contiguous slices, and its KV heads likewise when there are at least `tp_size` of
them; with fewer KV heads than ranks each rank holds one KV head, replicated. Either way rank r's
query heads attend only to the KV heads it holds, so a rank's plan is a contiguous slice of the
layer's head plans, and every GQA group stays on one rank unless there are fewer KV heads than
ranks. Then a group's query heads are spread over the consecutive ranks that hold its KV head
(`group_ranks`), and those ranks exchange what the block union of the whole group needs, so each
attends to the union one device would (`backend/split_groups.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_sparse.config.errors import SparseConfigError


@dataclass(frozen=True)
class HeadShard:
    rank: int
    tp_size: int
    q_heads: range  # global query heads this rank computes
    kv_heads: range  # global KV heads this rank holds
    group_size: int  # query heads per KV head in the unsharded model

    @property
    def splits_groups(self) -> bool:
        """True when a GQA group's query heads are spread over several ranks."""
        return len(self.q_heads) < self.group_size

    @property
    def group_ranks(self) -> range:
        """The ranks that hold this rank's KV heads: itself, or all the ranks its GQA group spans."""
        if not self.splits_groups:
            return range(self.rank, self.rank + 1)
        per_kv = self.group_size // len(self.q_heads)
        first = self.rank - self.rank % per_kv
        return range(first, first + per_kv)

    @property
    def group_q_heads(self) -> range:
        """The query heads (global) that read this rank's KV heads, on whichever ranks they run."""
        return range(self.kv_heads.start * self.group_size, self.kv_heads.stop * self.group_size)

    def local_kv_head(self, local_q_head: int) -> int:
        """The rank-local KV head that rank-local query head reads (vLLM's local GQA layout)."""
        return local_q_head // (len(self.q_heads) // len(self.kv_heads))


def head_shard(num_q_heads: int, num_kv_heads: int, rank: int, tp_size: int, source: str = "plan") -> HeadShard:
    """Rank `rank` of `tp_size`: its query and KV heads, in the unsharded model's numbering."""
    problems = []
    if not 0 <= rank < tp_size:
        problems.append(("tensor_parallel_rank", f"rank {rank} is outside 0-{tp_size - 1}"))
    if num_q_heads % tp_size:
        problems.append(("tensor_parallel_size", f"{num_q_heads} query heads do not split over {tp_size} ranks"))
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        problems.append(("tensor_parallel_size", f"{num_kv_heads} KV heads neither split over nor replicate "
                                                 f"evenly onto {tp_size} ranks"))
    if num_q_heads % num_kv_heads:
        problems.append(("num_kv_heads", f"{num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads"))
    if problems:
        raise SparseConfigError(source, problems)
    q_per = num_q_heads // tp_size
    if tp_size <= num_kv_heads:
        kv_per = num_kv_heads // tp_size
        kv = range(rank * kv_per, (rank + 1) * kv_per)
    else:
        kv_index = rank // (tp_size // num_kv_heads)
        kv = range(kv_index, kv_index + 1)
    return HeadShard(rank, tp_size, range(rank * q_per, (rank + 1) * q_per), kv,
                     num_q_heads // num_kv_heads)
