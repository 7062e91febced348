"""Resolve a validated config against one model into an immutable plan: layer x head -> what to run."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

from vllm_sparse.config.errors import SparseConfigError
from vllm_sparse.config.schema import LAYER_KEYWORDS, BudgetSpec, estimator_params
from vllm_sparse.estimators.registry import EstimatorParams, get_estimator
from vllm_sparse.selection.budget import Budget

BUILTIN_DEFAULTS: dict[str, Any] = {
    "block_size": 128,
    "dense_below": 8192,
    "dense_tail": 0,
    "union_tile": None,
    "union_heads": True,
    "min_query_tokens": "auto",
    "min_chunk_work": "auto",
    "dense_above": "auto",
}
# Which prefill chunks can win sparse, by the device the engine runs on (`auto` of `min_query_tokens`
# and `min_chunk_work`; work in token pairs: query tokens x the tokens they see). On CUDA a sparse chunk-layer has a
# fixed cost that grows with the context (estimation, selection, tables, FA3 per KV head): with every chunk sparse,
# follow-up turns lost up to 4x (256 new tokens after 32K cached; H200, vLLM 0.26, Llama-3.1-8B shape, 10%
# antidiagonal plan, eager; benchmarks/RESULTS.md "The serving workload"). The work floor was 96M pairs (that 32K
# break-even, 2026-12-03, before the launch cuts); 64M since 2026-12-07 (H100, CUDA graphs, 8192-token chunks): the
# follow-ups it sends sparse that 96M kept dense won with the costliest antidiagonal estimator (stride 8, bf16:
# 16K + 4096 1.28x, 32K + 2048 1.52x, 32K + 2560 1.42x) and with the stride-16 int8 one (1.42x / 1.53x / 1.51x), and
# a prompt's [8K, 16K) chunk (100.67M pairs, 4,096 over 96M) no longer goes dense when decode rows share its step
# (12 concurrent 32K prompts, 8K chunks: 1.29x -> 1.35x dense). The 32M probe won too (16K + 2048 1.18x, int8 only).
# On CPU the path is the exact torch
# reference, a correctness vehicle never faster than vLLM's own kernel, so no floor would make it win;
# its tests exercise every chunk.
AUTO_MIN_QUERY_TOKENS = {"cuda": 2048, "cpu": 16}
# `dense_above` (`backend/density_guard.py`): a layer whose sparse chunks read more than this share of their causal
# KV blocks runs dense for a while. On CUDA a sparse chunk-layer pays estimation and selection (antidiagonal at
# stride 8: roughly 7-13% of a 16K chunk's dense attention at 128K, int8 / bf16 products) on top of attention over
# what it keeps, so it breaks even near 0.83-0.89 kept; 0.8 leaves a margin. On CPU the sparse path is the exact
# torch reference, slower than dense at any density, and its tests exercise every chunk: off.
AUTO_DENSE_ABOVE = {"cuda": 0.8, "cpu": 1.0}
# Steps with sparse chunks a layer stays dense before it runs sparse to measure again (two or three of every ~35
# such steps then measure: at a density near 1 they cost ~1% of the step more than dense).
DENSE_ABOVE_PROBE_STEPS = 32


def chunk_work(q_len, seq_len):
    """Causal attention work of a prefill chunk in token pairs: each of its q_len query tokens sees the
    request's tokens before it and itself (ints, or int64 tensors of chunks)."""
    return q_len * (seq_len - q_len) + q_len * (q_len + 1) // 2
AUTO_MIN_CHUNK_WORK = {"cuda": 64 * 2**20, "cpu": 0}
DECODE_BLOCK_TOKENS = 64  # decode selection block (tokens), unless the config says
DECODE_DENSE_BELOW = 16384  # decode steps with less context stay dense (at least), unless the config says
# Quest bounds each KV page's scores from its keys' min and max, so a larger page loosens them: its pages are 16
# tokens in the paper (Tang et al., 2024) and in every Quest measurement here (vLLM 0.26's pages).
QUEST_PAGE_TOKENS = 16
DEFAULT_ESTIMATOR = ("sink_local", {})
DEFAULT_BUDGET = BudgetSpec(keep_ratio=0.25)


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of a model (unsharded numbering)."""

    name: str
    architectures: tuple[str, ...]
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    # Per layer "full_attention" / "sliding_attention" for hybrid models, else None (all full).
    layer_types: tuple[str, ...] | None = None

    def is_full_attention(self, layer: int) -> bool:
        return self.layer_types is None or self.layer_types[layer] == "full_attention"

    def attention_kind(self, layer: int) -> str:
        """A layer's attention in words (its `layer_types` entry; Llama 4 names its local layers "chunked")."""
        kind = "full_attention" if self.layer_types is None else self.layer_types[layer]
        return {"sliding_attention": "sliding-window", "chunked_attention": "chunked local attention"}.get(
            kind, kind.replace("_", " "))

    @classmethod
    def from_pretrained(cls, model: str) -> ModelShape:
        """The shape of a model directory or name, from its Hugging Face config (tools without an engine)."""
        from transformers import AutoConfig

        try:
            hf_config = AutoConfig.from_pretrained(model)
        except (OSError, ValueError) as e:  # (no such directory, no config.json, an id with no hub to reach)
            raise SparseConfigError(str(model), [("--model", f"cannot read the model's config.json: {e}")],
                                    subject="model") from None
        return cls.from_hf_config(hf_config, model)

    @classmethod
    def from_hf_config(cls, hf_config: Any, name: str) -> ModelShape:
        text = getattr(hf_config, "text_config", None) or hf_config
        n_layers = text.num_hidden_layers
        n_heads = text.num_attention_heads
        layer_types = getattr(text, "layer_types", None)
        archs = tuple(getattr(hf_config, "architectures", None) or ())
        return cls(
            name=str(name),
            architectures=archs,
            num_layers=n_layers,
            num_q_heads=n_heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or n_heads,
            layer_types=tuple(layer_types) if layer_types else None,
        )


@dataclass(frozen=True)
class HeadPlan:
    estimator: str
    params: EstimatorParams
    budget: Budget

    @property
    def reads_columns(self) -> bool:
        """Keeps key columns token by token beside its blocks (`vertical_slash` with `blocks: columns`)."""
        return self.estimator == "vertical_slash" and self.params.blocks == "columns"

    def describe(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.params.model_dump(exclude_none=True).items())
        return f"{self.estimator}({args})"


@dataclass(frozen=True)
class DecodeHeadPlan:
    """One KV head's decode selection (every q head of the group has the same): blocks of the plan's
    `decode_block_tokens`."""

    estimator: str  # "quest" or "tidal"
    top_k_blocks: int
    sink_blocks: int
    local_blocks: int
    selector: bool = False  # tidal: this layer attends fully and chooses the blocks later tidal layers read

    @property
    def kept_blocks(self) -> int:
        return self.top_k_blocks + self.sink_blocks + self.local_blocks

    @property
    def budget(self) -> tuple[int, int, int]:
        return self.top_k_blocks, self.sink_blocks, self.local_blocks

    def describe(self) -> str:
        role = ",selector" if self.selector else ""
        return (f"{self.estimator}(top_k_blocks={self.top_k_blocks},sink={self.sink_blocks},"
                f"local={self.local_blocks}{role})")


@dataclass(frozen=True)
class LayerPlan:
    index: int
    full_attention: bool
    heads: tuple[HeadPlan | None, ...]  # per q head (unsharded numbering); None = dense
    decode: tuple[DecodeHeadPlan | None, ...] = ()  # per q head; None (or empty) = vLLM's dense decode

    @property
    def is_sparse(self) -> bool:
        return any(h is not None for h in self.heads)

    @property
    def is_sparse_decode(self) -> bool:
        return any(d is not None for d in self.decode)

    @property
    def needs_summaries(self) -> bool:
        """Some head scores pages by their key summaries (Quest); tidal heads read a selector's choice."""
        return any(d is not None and d.estimator == "quest" for d in self.decode)

    def decode_for(self, shard) -> tuple[DecodeHeadPlan | None, ...]:
        """Per local KV head of a tensor-parallel rank: its decode plan (q heads of a KV head agree)."""
        q = self.decode[shard.q_heads.start:shard.q_heads.stop] or (None,) * len(shard.q_heads)
        kv = len(shard.kv_heads)
        return tuple(q[i * (len(q) // kv)] for i in range(kv))

    def heads_for(self, shard) -> tuple[HeadPlan | None, ...]:
        """The plans of the query heads one tensor-parallel rank runs (a `sharding.HeadShard`)."""
        return self.heads[shard.q_heads.start:shard.q_heads.stop]


@dataclass(frozen=True)
class SparsePlan:
    source: str  # where the config came from, for messages
    model: str
    block_size: int
    dense_below: int
    layers: tuple[LayerPlan, ...]
    num_q_heads: int
    num_kv_heads: int
    notes: tuple[str, ...] = field(default=())
    union_tile: int | None = None  # query blocks per union; None = the whole chunk
    min_query_tokens: int | None = None  # prefill chunks with fewer query tokens stay dense; None: auto
    min_chunk_work: int | None = None  # prefill chunks with less work stay dense; None: auto (by device)
    decode_block_tokens: int = DECODE_BLOCK_TOKENS
    decode_dense_below: int = DECODE_DENSE_BELOW
    union_heads: bool = True  # q heads of a KV head attend to their blocks' union; False: each to its own
    explicit: bool = False  # from a config the user named (not discovery): what it asks must run, or stop the start
    # A layer whose sparse chunks lately read more than this share of their causal blocks runs dense for a while
    # (`backend/density_guard.py`); 1: never; None: auto (by device)
    dense_above: float | None = None
    # The last this many query tokens of each sparse prefill chunk attend densely (in whole query blocks); 0: off
    dense_tail: int = 0

    @property
    def is_sparse(self) -> bool:
        """Anything runs sparse: a prefill head or a decode head."""
        return any(layer.is_sparse or layer.is_sparse_decode for layer in self.layers)

    @property
    def is_sparse_decode(self) -> bool:
        return any(layer.is_sparse_decode for layer in self.layers)

    @property
    def decode(self) -> str:
        """The decode policy in a word: the estimators that select pages at decode (`quest`, `tidal`,
        `quest+tidal`), else `dense`."""
        used = {d.estimator for lp in self.layers for d in lp.decode if d is not None}
        return "+".join(e for e in ("quest", "tidal") if e in used) or "dense"

    @property
    def needs_summaries(self) -> bool:
        return any(layer.needs_summaries for layer in self.layers)

    @property
    def is_sparse_prefill(self) -> bool:
        return any(layer.is_sparse for layer in self.layers)

    @property
    def selection_blocks(self) -> tuple[int, ...]:
        """The block sizes (tokens) this plan selects in: sparse prefill's and sparse decode's, each whole KV cache
        pages (`backend/checks.py`)."""
        return (self.block_size,) * self.is_sparse_prefill + (self.decode_block_tokens,) * self.is_sparse_decode

    def page_sizes_within(self, preferred: int) -> tuple[int, int]:
        """KV cache page sizes (vLLM's block size) for this plan, best first: the largest that divides `preferred`
        and every selection block, with Quest decode also at most Quest's page; then without Quest's page (for a
        backend that cannot page that small: the CPU's)."""
        fits = math.gcd(preferred, *self.selection_blocks)
        return math.gcd(fits, QUEST_PAGE_TOKENS) if self.needs_summaries else fits, fits

    def page_size_at_start(self, block_size: int, user_specified: bool) -> int:
        """The KV page size to size reservations by while vLLM builds the model, before it asks the backend for one
        (`backend/capabilities.py`, after the load): a --block-size the user gave, else the plan's answer for the
        size vLLM holds then (its default). The engine gets that or larger, and a smaller page only over-reserves
        (summaries and page tables both shrink as pages grow)."""
        return block_size if user_specified else self.page_sizes_within(block_size)[0]

    def without_prefill(self) -> SparsePlan:
        """The same plan with every layer's prefill on vLLM's attention (its decode setting kept)."""
        return dataclasses.replace(self, layers=tuple(dataclasses.replace(lp, heads=(None,) * len(lp.heads))
                                                      for lp in self.layers))

    def without_decode(self) -> SparsePlan:
        """The same plan with every layer's decode on vLLM's attention."""
        return dataclasses.replace(self, layers=tuple(dataclasses.replace(lp, decode=()) for lp in self.layers))

    def tidal_selector_of(self, index: int) -> int | None:
        """For a layer that reuses a tidal selection: the selector layer it reads (else None)."""
        d = next((d for d in self.layers[index].decode if d is not None), None)
        if d is None or d.estimator != "tidal" or d.selector:
            return None
        return max(i for i in range(index) if any(x is not None and x.selector for x in self.layers[i].decode))

    def layer(self, index: int) -> LayerPlan:
        return self.layers[index]

    def chunk_work_floor(self, device_type: str) -> int:
        """Token pairs (query tokens x the tokens they see) a prefill chunk needs to go sparse on a device."""
        if self.min_chunk_work is not None:
            return self.min_chunk_work
        return AUTO_MIN_CHUNK_WORK.get(device_type, AUTO_MIN_CHUNK_WORK["cuda"])

    @property
    def sparse_context_floor(self) -> int:
        """The least context (a chunk's own tokens included) at which a chunk has a query block past the rows that
        attend densely (`dense_rows`: those whose tokens all lie before position dense_below): a chunk that ends
        before it has none, and run sparse would only estimate and select for rows that read every block (e.g. one
        ending exactly at a block-aligned dense_below)."""
        return self.dense_below // self.block_size * self.block_size + 1

    def dense_above_on(self, device_type: str) -> float:
        """The share of a layer's causal KV blocks above which it runs dense for a while, on a device (1: never)."""
        if self.dense_above is not None:
            return float(self.dense_above)
        return AUTO_DENSE_ABOVE.get(device_type, AUTO_DENSE_ABOVE["cuda"])

    def query_token_floor(self, device_type: str) -> int:
        """Query tokens a prefill chunk needs to go sparse on a device."""
        if self.min_query_tokens is not None:
            return self.min_query_tokens
        return AUTO_MIN_QUERY_TOKENS.get(device_type, AUTO_MIN_QUERY_TOKENS["cuda"])

    @classmethod
    def dense(cls, shape: ModelShape, source: str, reason: str) -> SparsePlan:
        layers = tuple(
            LayerPlan(i, shape.is_full_attention(i), (None,) * shape.num_q_heads) for i in range(shape.num_layers)
        )
        return cls(
            source, shape.name, BUILTIN_DEFAULTS["block_size"], BUILTIN_DEFAULTS["dense_below"], layers,
            shape.num_q_heads, shape.num_kv_heads, (reason,),
        )


def match_entry(cfg, shape: ModelShape, by_name: bool = False) -> int | None:
    """Index of the first model entry that matches by architecture or name glob. `by_name` (shipped plans,
    found by discovery): only an entry whose names match the model's, and whose architectures, where it
    gives some, include the model's: a plan applies to the family it names, not to every model of an
    architecture."""
    for i, entry in enumerate(cfg.models):
        archs = set(entry.match.architectures) & set(shape.architectures)
        if by_name:
            if name_glob(entry, shape) and (archs or not entry.match.architectures):
                return i
        elif archs or name_glob(entry, shape):
            return i
    return None


def name_glob(entry, shape: ModelShape) -> str | None:
    """The first of the entry's name globs that the model's name or path (or its last part) matches."""
    last = shape.name.rstrip("/").split("/")[-1]
    return next((p for p in entry.match.names if fnmatch.fnmatch(shape.name, p) or fnmatch.fnmatch(last, p)), None)


def _expand(selector, limit: int, what: str, shape: ModelShape | None) -> list[int]:
    """Selector -> sorted indices; raises ValueError naming an index beyond the model."""
    items = selector if isinstance(selector, list) else [selector]
    out: set[int] = set()
    for item in items:
        if item == "all":
            out.update(range(limit))
        elif item == "full_attention":
            out.update(i for i in range(limit) if shape.is_full_attention(i))
        elif isinstance(item, int):
            out.add(item)
        else:
            lo, hi = item.split("-")
            # (an open range that starts beyond the model keeps its start, so that the check below names it)
            out.update(range(int(lo), int(hi) + 1 if hi else max(limit, int(lo) + 1)))
    bad = sorted(i for i in out if i >= limit)
    if bad:
        raise ValueError(f"{what} {bad[0]} is beyond the model, which has {limit} {what}s (0-{limit - 1})")
    return sorted(out)


def resolve_plan(cfg, shape: ModelShape, source: str, explicit: bool = False, by_name: bool = False) -> SparsePlan:
    """Validated config file + model shape -> SparsePlan. Raises SparseConfigError listing every problem.

    A config the user named (`explicit`) must have an entry for the model; one found by discovery
    that matches nothing gives a dense plan (with a note). `by_name`: match as discovery does
    (`match_entry`).
    """
    idx = match_entry(cfg, shape, by_name)
    if idx is None:
        what = f"{shape.name} ({', '.join(shape.architectures) or 'no architecture'})"
        if explicit:
            entries = "; ".join(f"models[{i}] matches architectures {e.match.architectures or '-'}, names "
                                f"{e.match.names or '-'}" for i, e in enumerate(cfg.models))
            raise SparseConfigError(source, [("models", f"no entry matches the model {what}: {entries}")])
        return SparsePlan.dense(shape, source, f"no model entry in {source} matches {what}: running dense")
    entry = cfg.models[idx]
    where = f"models[{idx}]"

    def setting(name: str):
        for scope in (entry, cfg.defaults):
            v = getattr(scope, name)
            if v is not None:
                return v
        return BUILTIN_DEFAULTS.get(name)

    problems: list[tuple[str, str]] = []
    notes: list[str] = []
    heads: list[list[HeadPlan | None]] = [[None] * shape.num_q_heads for _ in range(shape.num_layers)]
    # Equal head plans as one object: a layer's heads then group by identity first (`chunk_block_mask`, every step).
    interned: dict[HeadPlan | None, HeadPlan | None] = {}
    # Decode: the most specific `decode` wins (head rule, layer rule, model entry, defaults), on every
    # full-attention layer; (spec, path) per layer and q head.
    base_decode = ((entry.decode, f"{where}.decode") if entry.decode is not None
                   else (cfg.defaults.decode, "defaults.decode"))
    decode: list[list[tuple]] = [[base_decode] * shape.num_q_heads for _ in range(shape.num_layers)]
    owner: dict[int, int] = {}
    for r, rule in enumerate(entry.layers):
        rpath = f"{where}.layers[{r}]"
        try:
            layers = _expand(rule.layers, shape.num_layers, "layer", shape)
        except ValueError as e:
            problems.append((f"{rpath}.layers", str(e)))
            continue
        clash = sorted(i for i in layers if i in owner)
        if clash:
            problems.append((f"{rpath}.layers", f"conflicting rules: layer {clash[0]} is also selected by "
                             f"{where}.layers[{owner[clash[0]]}]; each layer may be selected by one rule"))
            continue
        owner.update({i: r for i in layers})
        head_rule_of: dict[int, int] = {}
        for h, hrule in enumerate(rule.heads):
            try:
                hs = _expand(hrule.heads, shape.num_q_heads, "head", shape)
            except ValueError as e:
                problems.append((f"{rpath}.heads[{h}].heads", str(e)))
                continue
            hclash = sorted(i for i in hs if i in head_rule_of)
            if hclash:
                problems.append((f"{rpath}.heads[{h}].heads", f"conflicting rules: head {hclash[0]} is also "
                                 f"selected by {rpath}.heads[{head_rule_of[hclash[0]]}]"))
                continue
            head_rule_of.update({i: h for i in hs})
        # The layers the rule names by index or range (not by `all` / `full_attention`): a sliding-window one
        # among them is worth a note (or, as a tidal selector, an error).
        items = rule.layers if isinstance(rule.layers, list) else [rule.layers]
        named = set(_expand([x for x in items if x not in LAYER_KEYWORDS], shape.num_layers, "layer", shape))
        for layer in layers:
            by_index = layer in named  # (not `explicit`: that is the whole config's, read below)
            if not shape.is_full_attention(layer):
                selector = [d for d in [rule.decode] + [h.decode for h in rule.heads]
                            if d is not None and d.estimator == "tidal" and d.selector]
                if by_index and selector:  # (its readers would silently read an earlier selector's choice)
                    problems.append((f"{rpath}.decode", f"layer {layer} is a {shape.attention_kind(layer)} layer: it "
                                     "cannot be a tidal selector (its decode stays dense); choose a full-attention "
                                     "layer"))
                elif by_index:
                    notes.append(f"layer {layer} is a {shape.attention_kind(layer)} layer ({rpath}): it stays dense")
                continue
            for q in range(shape.num_q_heads):
                hrule = rule.heads[head_rule_of[q]] if q in head_rule_of else None
                hp = _head_plan(hrule, rule, entry, cfg)
                hp = heads[layer][q] = interned.setdefault(hp, hp)
                wrong = head_plan_problem(hp, setting("block_size")) if hp is not None else None
                if wrong:  # (one line per rule, naming the first layer and head it reaches)
                    field, why = wrong
                    hpath = f"{rpath}.heads[{head_rule_of[q]}].{field}" if hrule is not None else f"{rpath}.{field}"
                    if all(p != hpath for p, _ in problems):
                        problems.append((hpath, f"layer {layer} head {q}: {why}"))
                if hrule is not None and hrule.decode is not None:
                    decode[layer][q] = (hrule.decode, f"{rpath}.heads[{head_rule_of[q]}].decode")
                elif rule.decode is not None:
                    decode[layer][q] = (rule.decode, f"{rpath}.decode")
    decode_plans, block_tokens, decode_below = _decode_plans(decode, shape, problems)
    if setting("dense_tail") and setting("union_tile") is None:  # (one union per chunk: the tail's rows widen all)
        problems.append((f"{where}.dense_tail" if entry.dense_tail is not None else "defaults.dense_tail", (
            f"dense_tail: {setting('dense_tail')} with one block union per prefill chunk (union_tile unset) makes "
            "every row of a sparse chunk read what its tail rows read, every block: set union_tile (1: the tail's "
            "rows alone read every block)")))
    if problems:
        raise SparseConfigError(source, problems)
    layers_out = tuple(
        LayerPlan(i, shape.is_full_attention(i), tuple(heads[i]), decode_plans[i]) for i in range(shape.num_layers)
    )
    return SparsePlan(source, shape.name, setting("block_size"), setting("dense_below"), layers_out,
                      shape.num_q_heads, shape.num_kv_heads, tuple(notes), setting("union_tile"),
                      *(None if setting(k) == "auto" else setting(k) for k in ("min_query_tokens", "min_chunk_work")),
                      block_tokens, decode_below, union_heads=setting("union_heads"), explicit=explicit,
                      dense_above=None if setting("dense_above") == "auto" else setting("dense_above"),
                      dense_tail=setting("dense_tail"))



def _decode_plans(decode, shape: ModelShape, problems: list) -> tuple[list[tuple], int, int]:
    """Per layer, per q head: DecodeHeadPlan or None; and the model's one block size and dense_below.

    Every q head of a KV head must agree (a decode step selects blocks per KV head), and one block
    size and one dense_below hold for the model (one page summary and one threshold per step)."""
    quest = [(spec, path) for layer in range(shape.num_layers) if shape.is_full_attention(layer)
             for spec, path in decode[layer] if spec is not None and spec.estimator != "dense"]
    values = {}
    for name, default in (("block_tokens", DECODE_BLOCK_TOKENS), ("dense_below", None)):
        given = {}
        for spec, path in quest:
            v = getattr(spec, name)
            if v is not None:
                given.setdefault(v, path)
        if len(given) > 1:
            (a, pa), (b, pb) = list(given.items())[:2]
            problems.append((pb, f"decode {name} {b} differs from {a} ({pa}): a model has one decode {name}"))
        values[name] = next(iter(given), default)
    block = values["block_tokens"]
    out: list[tuple] = []
    kept_tokens = 0
    group = max(1, shape.num_q_heads // max(1, shape.num_kv_heads))
    for layer in range(shape.num_layers):
        row: list[DecodeHeadPlan | None] = []
        for q in range(shape.num_q_heads):
            spec, path = decode[layer][q]
            if spec is None or spec.estimator == "dense" or not shape.is_full_attention(layer):
                row.append(None)
                continue
            d = DecodeHeadPlan(spec.estimator, -(-spec.top_k_tokens // block), spec.sink_blocks, spec.local_blocks,
                               spec.selector)
            kept_tokens = max(kept_tokens, d.kept_blocks * block)
            row.append(d)
        for q0 in range(0, shape.num_q_heads, group):
            if len(set(row[q0:q0 + group])) > 1:
                paths = sorted({decode[layer][q][1] for q in range(q0, q0 + group)})
                problems.append((paths[-1], f"layer {layer}: q heads {q0}-{q0 + group - 1} share KV head "
                                 f"{q0 // group} and must have one decode setting (set by {', '.join(paths)})"))
                break
        out.append(tuple(row) if any(row) else ())
    _check_tidal(out, decode, problems)
    below = values["dense_below"]
    if below is None:
        below = max(DECODE_DENSE_BELOW, 2 * kept_tokens)
    return out, block, below


def _check_tidal(plans: list[tuple], decode, problems: list) -> None:
    """TidalDecode reuses a selector layer's blocks in the layers after it, KV head by KV head: a tidal
    layer has one setting for all its heads, the first tidal layer selects, and a layer that reuses
    reads exactly the budget its selector chose."""
    selector = None  # (layer, plan) of the last selector
    for layer, row in enumerate(plans):
        tidal = [d for d in row if d is not None and d.estimator == "tidal"]
        if not tidal:
            continue
        paths = sorted({path for _, path in decode[layer]})
        if len(set(row)) > 1:
            problems.append((paths[-1], f"layer {layer}: tidal decode is set per layer, and its heads have "
                             f"different decode settings (set by {', '.join(paths)})"))
            continue
        plan = row[0]
        if plan.selector:
            selector = (layer, plan)
        elif selector is None:
            problems.append((paths[-1], f"layer {layer} reuses a tidal selection, but no layer before it selects: "
                             "set `selector: true` on the first tidal layer"))
        elif plan.budget != selector[1].budget:
            problems.append((paths[-1], (
                f"layer {layer} reads the blocks selector layer {selector[0]} chose, so its budget must be that "
                f"layer's: top_k {plan.top_k_blocks}, sink {plan.sink_blocks}, local {plan.local_blocks} blocks "
                f"vs {selector[1].top_k_blocks}, {selector[1].sink_blocks}, {selector[1].local_blocks}")))


def head_plan_problem(hp: HeadPlan, block_size: int) -> tuple[str, str] | None:
    """(field, why) where an estimator's settings cannot run as written with this block size and budget."""
    stride = getattr(hp.params, "stride", None)
    if stride and block_size % stride:  # (the kernels would refuse it mid-request)
        return "estimator", f"{hp.estimator} stride {stride} must divide the block size {block_size}"
    sample = getattr(hp.params, "sample_stride", None)
    if sample and getattr(hp.params, "rows", None) == "sampled" and sample > block_size:
        return "estimator", (f"{hp.estimator} sample_stride {sample} exceeds the block size {block_size}: some "
                             "query blocks would be scored by no row")
    blocks = getattr(hp.params, "blocks", None)
    if blocks in ("crossed", "columns") and hp.budget.top_p != 1.0:  # (every crossed block scores alike)
        return "budget", (f"{hp.estimator} blocks: {blocks} keeps the blocks its kept lines cross, which only a "
                          "top_p: 1.0 budget keeps exactly (any other choice among them is arbitrary)")
    return None


def _head_plan(hrule, rule, entry, cfg) -> HeadPlan | None:
    chain = [x for x in (hrule, rule) if x is not None]
    if any(x.dense for x in chain):
        return None

    def first(name):
        for x in chain + [entry, cfg.defaults]:
            v = getattr(x, name)
            if v is not None:
                return v
        return None

    spec = first("estimator")
    if spec is None:
        name, params = DEFAULT_ESTIMATOR[0], get_estimator(DEFAULT_ESTIMATOR[0]).params(**DEFAULT_ESTIMATOR[1])
    else:
        name, params = estimator_params(spec)
    if get_estimator(name).keeps_all:
        return None
    b = first("budget") or DEFAULT_BUDGET
    return HeadPlan(name, params, Budget(**b.model_dump()))
