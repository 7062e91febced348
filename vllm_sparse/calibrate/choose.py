"""From a recall table to a plan: per layer (and per KV head's group of q heads where that reads less),
the candidate estimator + budget that reaches the target recall at the lowest kept density.

Pure functions over measured numbers, no model, no engine. A layer's table holds, per candidate, the
recall of every q head (the share of its dense attention mass in the blocks it reads after union) and
the kept density of every KV head (the share of causal blocks its union reads). The union is formed
per KV head, so the q heads of one KV head form a group whose recall and density depend only on the
candidate the group runs: choosing per group is exact for the measured numbers, while mixing
candidates inside a group would be a guess. Hence "per head" here means per KV head's group of q
heads (on models without GQA, per q head).

A candidate is acceptable for a group when each of its q heads reaches the target recall and its
density is at most `max_density` (above it the sparse path costs more than the dense kernel saves);
no acceptable candidate leaves the group dense (density 1, recall 1). The lowest density wins; ties go
to the higher worst-head recall, then to the earlier candidate. A layer takes one candidate for all its
groups unless choosing per group reads less (and at most `max_density` over the layer). A lower target
never chooses a higher density: every candidate acceptable at the higher target is acceptable at the
lower one.

With `--answer-rows` a candidate must also reach the target on the rows that produce each prompt's answer
(its final query block), in every q head: `require_answer_rows` holds each recall to the lower of the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TOLERANCE = 1e-6  # recall sums of kept-everything candidates land a rounding error below 1


@dataclass(frozen=True)
class LayerTable:
    """Measured figures of one layer: recall[candidate][q head], density[candidate][kv head]."""

    layer: int
    recall: list[list[float]]
    density: list[list[float]]

    @property
    def num_q_heads(self) -> int:
        return len(self.recall[0]) if self.recall else 0

    @property
    def num_kv_heads(self) -> int:
        return len(self.density[0]) if self.density else 0

    def heads_of(self, group: int) -> range:
        per = self.num_q_heads // self.num_kv_heads
        return range(group * per, (group + 1) * per)


@dataclass(frozen=True)
class GroupChoice:
    candidate: int | None  # None: the group stays dense
    recall: tuple[float, ...]  # per q head of the group
    density: float


@dataclass(frozen=True)
class LayerChoice:
    layer: int
    groups: tuple[GroupChoice, ...]  # per KV head
    per_group: bool  # the groups were chosen one by one (their candidates differ)
    why_dense: str = field(default="", compare=False)  # for a dense layer: what the candidates missed

    @property
    def dense(self) -> bool:
        return all(g.candidate is None for g in self.groups)

    @property
    def density(self) -> float:
        return sum(g.density for g in self.groups) / len(self.groups)

    @property
    def recall(self) -> tuple[float, ...]:
        return tuple(r for g in self.groups for r in g.recall)


def _key(table: LayerTable, c: int, groups: range) -> tuple[float, float, int]:
    density = sum(table.density[c][g] for g in groups) / len(groups)
    worst = min(table.recall[c][h] for g in groups for h in table.heads_of(g))
    return density, -worst, c


def _acceptable(table: LayerTable, c: int, groups: range, target: float, max_density: float) -> bool:
    worst = min(table.recall[c][h] for g in groups for h in table.heads_of(g))
    density = sum(table.density[c][g] for g in groups) / len(groups)
    return worst >= target - TOLERANCE and density <= max_density


def _best(table: LayerTable, groups: range, target: float, max_density: float) -> int | None:
    ok = [c for c in range(len(table.recall)) if _acceptable(table, c, groups, target, max_density)]
    return min(ok, key=lambda c: _key(table, c, groups)) if ok else None


def _group(table: LayerTable, g: int, c: int | None) -> GroupChoice:
    heads = table.heads_of(g)
    if c is None:
        return GroupChoice(None, tuple(1.0 for _ in heads), 1.0)
    return GroupChoice(c, tuple(table.recall[c][h] for h in heads), table.density[c][g])


def _why_dense(table: LayerTable, target: float, max_density: float, labels: list[str] | None) -> str:
    name = (lambda c: labels[c]) if labels else (lambda c: f"candidate {c}")
    reach = [c for c in range(len(table.recall)) if min(table.recall[c]) >= target - TOLERANCE]
    if not reach:
        best = max(range(len(table.recall)), key=lambda c: min(table.recall[c]), default=None)
        if best is None:
            return "no candidates"
        return (f"no candidate reaches recall {target:g} in every head (closest: {name(best)}, lowest head "
                f"{min(table.recall[best]):.3f})")
    best = min(reach, key=lambda c: _key(table, c, range(table.num_kv_heads)))
    return (f"the cheapest candidate reaching recall {target:g} ({name(best)}) reads "
            f"{sum(table.density[best]) / table.num_kv_heads:.1%} > max density {max_density:.0%}")


def choose_layer(table: LayerTable, target: float, max_density: float = 0.9, per_group: bool = True,
                 labels: list[str] | None = None) -> LayerChoice:
    """The layer's choice: one candidate for every group, or (when it reads less) one per group."""
    groups = range(table.num_kv_heads)
    uniform = _best(table, groups, target, max_density)
    whole = LayerChoice(table.layer, tuple(_group(table, g, uniform) for g in groups), False)
    if per_group:
        each = LayerChoice(table.layer, tuple(_group(table, g, _best(table, range(g, g + 1), target, max_density))
                                              for g in groups), True)
        if each.density < whole.density - 1e-12 and each.density <= max_density:
            return each
    if whole.dense:
        return LayerChoice(table.layer, whole.groups, False, _why_dense(table, target, max_density, labels))
    return whole


def choose(tables: list[LayerTable], target: float, max_density: float = 0.9, per_group: bool = True,
           labels: list[str] | None = None) -> list[LayerChoice]:
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target recall must be in (0, 1], got {target}")
    return [choose_layer(t, target, max_density, per_group, labels) for t in tables]


def table_from_sums(layer: int, sums: dict, row_quantile: float | None = None) -> LayerTable:
    """The engine's per-layer sums ({"mass", "read", "rows", "tokens", "causal"}, `CalibrationStats.raw`) ->
    a table. Recall is each q head's mean over its queries, or with `row_quantile` q the recall of its
    query block rows that a share q of its queries fall at or below (the rows that lose the most)."""
    tokens, causal = max(1, sums["tokens"]), max(1, sums["causal"])
    if row_quantile:
        recall = [[histogram_quantile(hist, row_quantile) for hist in per_head] for per_head in sums["rows"]]
    else:
        recall = [[m / tokens for m in row] for row in sums["mass"]]
    return LayerTable(layer, recall, [[r / causal for r in row] for row in sums["read"]])


def histogram_quantile(hist: list[float], q: float) -> float:
    """The q-quantile of a histogram over [0, 1] in equal bins, as its bin's lower edge (never above
    the true quantile). The weights are float sums (queries' attention mass), so reaching q * total
    is judged to a relative 1e-6."""
    total = sum(hist)
    if total <= 0:
        return 1.0
    seen = 0.0
    for i, w in enumerate(hist):
        seen += w
        if w > 0 and seen >= q * total * (1 - 1e-6):
            return i / len(hist)
    return 1.0


def lowest(recalls: list[list[list[float]]]) -> list[list[float]]:
    """Several recall[candidate][q head] tables -> the lowest of each entry."""
    return [[min(per_head) for per_head in zip(*per_cand)] for per_cand in zip(*recalls)]


def combine(tables: list[LayerTable]) -> LayerTable:
    """One layer's tables at several lengths -> one: the lowest recall over the lengths (a rule must reach
    the target at each), the mean density."""
    first = tables[0]
    n = len(tables)
    density = [[sum(t.density[c][g] for t in tables) / n for g in range(first.num_kv_heads)]
               for c in range(len(first.density))]
    return LayerTable(first.layer, lowest([t.recall for t in tables]), density)


def require_answer_rows(table: LayerTable, answer: list[list[float]]) -> LayerTable:
    """The table to choose by under `--answer-rows`: per candidate and q head, the lower of the table's
    recall and the answer rows' (`answer`, [candidate][q head]), so a candidate reaching the target
    reaches it on both."""
    return LayerTable(table.layer, lowest([table.recall, answer]), table.density)
