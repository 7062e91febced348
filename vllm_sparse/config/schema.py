"""The YAML config format, as pydantic models. `vllm-sparse schema` prints its JSON schema.

    version: 1
    defaults: {block_size: 128, dense_below: 8192, estimator: {...}, budget: {...}}
    models:
      - match: {architectures: [LlamaForCausalLM], names: ["*llama-3*"]}
        layers:
          - layers: all                 # all | full_attention | 3 | "4-10" | [0, "2-5"]
            estimator: {name: sink_local, sink_blocks: 1, local_blocks: 4}
            budget: {keep_ratio: 0.25, sink_blocks: 1, local_blocks: 2}
            heads:                      # optional per-head overrides inside the layer rule
              - {heads: [0, 1], dense: true}
        decode: {estimator: quest, top_k_tokens: 4096, sink_blocks: 1, local_blocks: 2}

`decode` (model entry, `defaults`, layer rule or head rule) makes decode steps over long contexts
read only the KV blocks a query can score high on (Quest), or the blocks an earlier "selector" layer
chose by its exact attention scores (TidalDecode: `{estimator: tidal}` on every decode layer,
`selector: true` on the layers that choose); `decode: dense` (the default) leaves decode to vLLM.
Prefill settings and decode settings are independent.

A setting not given on a head rule comes from its layer rule, then the model entry, then
`defaults`, then the built-in default. Layers no rule selects stay dense.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Annotated, Any, Literal, Union

from pydantic import Field, create_model, field_validator, model_validator

from vllm_sparse.estimators.registry import all_estimators, get_estimator
from vllm_sparse.strict import StrictModel

_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d*)\s*$")  # "4-10", or "4-" (to the last)
LAYER_KEYWORDS = ("all", "full_attention")


_WORK = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)\s*$", re.IGNORECASE)


def parse_work(v: Any) -> int | str | None:
    """`min_chunk_work`: None, "auto", or token pairs as an int >= 0 or "128M" / "1.5G" / "512K"."""
    if v is None or v == "auto":
        return v
    if isinstance(v, bool):
        raise ValueError("give token pairs (e.g. 128M), 0 (off) or auto")
    if isinstance(v, int):
        if v < 0:
            raise ValueError(f"{v} is negative: give token pairs (e.g. 128M), 0 (off) or auto")
        return v
    m = _WORK.match(str(v))
    if not m:
        raise ValueError(f"{v!r} is not a work size: give token pairs (e.g. 128M, 100000000), 0 (off) or auto")
    pairs = float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2).upper()]
    if pairs != int(pairs):  # ("0.5" would read as 0: off)
        raise ValueError(f"{v!r} is {pairs} token pairs: give a whole number (e.g. 128M), 0 (off) or auto")
    return int(pairs)


def _check_selector_item(item: Any, keywords: tuple[str, ...]) -> Any:
    if isinstance(item, bool):
        raise ValueError(f"expected an index, a range 'a-b' or 'a-', or one of {', '.join(keywords)}; got {item!r}")
    if isinstance(item, int):
        if item < 0:
            raise ValueError(f"index {item} is negative")
        return item
    if isinstance(item, str):
        if item in keywords:
            return item
        m = _RANGE.match(item)
        if m:
            lo, hi = int(m.group(1)), m.group(2)
            if hi and lo > int(hi):
                raise ValueError(f"bad range {item!r}: start {lo} is after end {hi}")
            return f"{lo}-{hi}"
        if item.isdigit():
            return int(item)
    raise ValueError(f"expected an index, a range 'a-b' or 'a-', or one of {', '.join(keywords)}; got {item!r}")


def _check_selector(value: Any, keywords: tuple[str, ...]) -> Any:
    if isinstance(value, list):
        if not value:
            raise ValueError("empty list selects nothing")
        return [_check_selector_item(v, keywords) for v in value]
    return _check_selector_item(value, keywords)


Selector = Union[int, str, list[Union[int, str]]]


def _check_block(v: int | None, name: str) -> int | None:
    """A block size in tokens: a power of two in 16..1024."""
    if v is not None and (v < 16 or v > 1024 or v & (v - 1)):
        raise ValueError(f"{name} {v} must be a power of two in 16..1024")
    return v


class BudgetSpec(StrictModel):
    """How many blocks each query block row keeps. Exactly one of top_k, top_p, keep_ratio."""

    top_k: int | None = Field(None, ge=1, description="blocks kept per query block row")
    top_p: float | None = Field(None, gt=0, le=1, description="estimated attention mass kept per row")
    keep_ratio: float | None = Field(None, gt=0, le=1, description="fraction of the row's causal blocks kept")
    min_blocks: int = Field(1, ge=1, description="fewest blocks a query block row keeps (its causal blocks at most)")
    max_blocks: int | None = Field(None, ge=1, description="most blocks a row keeps, never fewer than its sink and "
                                   "local blocks (default: no cap)")
    sink_blocks: int = Field(1, ge=0, description="first blocks always kept")
    local_blocks: int = Field(1, ge=1, description="blocks up to and including the diagonal, always kept")
    share: Literal["head", "group"] = Field(
        "head", description="head: each q head selects its own blocks; group: the q heads of a KV head select "
        "once, from their mean block mass, so the union per KV head keeps what the budget asks")

    @model_validator(mode="after")
    def _one_rule(self):
        rules = [n for n in ("top_k", "top_p", "keep_ratio") if getattr(self, n) is not None]
        if len(rules) != 1:
            raise ValueError(f"give exactly one of top_k, top_p, keep_ratio (got {rules or 'none'})")
        if self.max_blocks is not None:
            if self.max_blocks < self.min_blocks:
                raise ValueError(f"max_blocks {self.max_blocks} < min_blocks {self.min_blocks}")
            if self.max_blocks < self.sink_blocks + self.local_blocks:
                raise ValueError(
                    f"max_blocks {self.max_blocks} < sink_blocks + local_blocks "
                    f"({self.sink_blocks + self.local_blocks}), which are always kept"
                )
        always = self.sink_blocks + self.local_blocks
        if self.top_k is not None:  # (a count the other settings would override: say so, not clamp)
            if self.top_k < always:
                raise ValueError(f"top_k {self.top_k} < sink_blocks + local_blocks ({always}), which are always kept")
            if self.top_k < self.min_blocks:
                raise ValueError(f"top_k {self.top_k} < min_blocks {self.min_blocks}: give one count")
            if self.max_blocks is not None and self.max_blocks < self.top_k:
                raise ValueError(f"max_blocks {self.max_blocks} < top_k {self.top_k}: give one count")
        return self


DECODE_ESTIMATORS = ("quest", "tidal", "dense")


class DecodeSpec(StrictModel):
    """Decode page selection: each decode step of a request whose context reaches `dense_below` reads,
    per KV head, the `top_k_tokens` worth of blocks with the highest Quest upper bound (or, for `tidal`, those its
    selector layer chose from exact scores), plus the first `sink_blocks` and the last `local_blocks` blocks (the
    current token's included)."""

    estimator: Literal["quest", "tidal", "dense"] = Field(
        "quest", description="quest: upper bound of q.k from each block's per-channel key min/max (Quest); "
        "tidal: the blocks the last `selector` layer before this one chose from its exact attention scores "
        "(TidalDecode); dense: this rule's heads read every block")
    selector: bool = Field(
        False, description="tidal only: this layer attends to every block and chooses, per KV head, the blocks "
        "it and the following tidal layers read (TidalDecode's token selection and re-selection layers)")
    top_k_tokens: int = Field(4096, ge=1, description="tokens selected by score per KV head and step "
                              "(rounded up to whole blocks), besides the sink and local blocks")
    sink_blocks: int = Field(1, ge=0, description="first blocks always read")
    local_blocks: int = Field(1, ge=1, description="last blocks always read, the current token's included")
    block_tokens: int | None = Field(
        None, description="selection block in tokens (power of two 16..1024, a multiple of the KV cache block; "
        "default 64); one value per model")
    dense_below: int | None = Field(
        None, ge=1, description="decode steps of a request with fewer tokens of context stay dense (default: "
        "16384, or twice the tokens a step reads if that is more); one value per model")

    @field_validator("block_tokens")
    @classmethod
    def _block(cls, v):
        return _check_block(v, "block_tokens")

    @model_validator(mode="after")
    def _selector_is_tidal(self):
        if self.selector and self.estimator != "tidal":
            raise ValueError(f"selector: true is a tidal setting; estimator is {self.estimator!r}")
        ignored = sorted(self.model_fields_set - {"estimator"})
        if self.estimator == "dense" and ignored:  # (the nearest decode setting applies whole: nothing inherits them)
            raise ValueError(f"estimator dense reads every block, so {', '.join(ignored)} would be ignored: drop them")
        return self


def _decode_setting(v: Any) -> Any:
    """`decode: dense` is short for `decode: {estimator: dense}`."""
    if isinstance(v, str):
        if v not in DECODE_ESTIMATORS:
            raise ValueError(f"decode must be one of {', '.join(DECODE_ESTIMATORS)} or a mapping; got {v!r}")
        return {"estimator": v}
    return v


@lru_cache(maxsize=1)
def estimator_spec_type():
    """Discriminated union of {name: <estimator>, <its params>} over the registered estimators."""
    members = []
    for est in all_estimators():
        model = create_model(
            f"{''.join(w.title() for w in est.name.split('_'))}Estimator",
            __base__=est.params,
            __doc__=est.summary,
            name=(Literal[est.name], ...),
        )
        members.append(model)
    if len(members) == 1:
        return members[0]
    return Annotated[Union[tuple(members)], Field(discriminator="name")]


def estimator_params(spec) -> tuple[str, Any]:
    """Split an estimator spec into (name, params instance of the estimator's own model)."""
    est = get_estimator(spec.name)
    return spec.name, est.params(**spec.model_dump(exclude={"name"}, exclude_unset=True))  # (defaults: the model's)


PROVENANCE_KINDS = ("measured", "published", "calibrated")
AUTO_APPLIED = ("measured", "published")  # kinds discovery applies on its own


class Provenance(StrictModel):
    """What backs a plan: measured here (the command and its figures), a published setting (paper and
    table), or calibrated on the model by `vllm-sparse calibrate` (the command)."""

    kind: Literal["measured", "published", "calibrated"] = Field(
        description="measured: run here, figures in benchmarks/RESULTS.md; published: a paper's setting; "
        "calibrated: written by vllm-sparse calibrate")
    source: str = Field(min_length=1, description="where the figures or the setting are: a RESULTS.md section, "
                        "a paper and table, or the calibration's data and target")
    command: str | None = Field(None, description="the command that measured or calibrated it")

    @model_validator(mode="after")
    def _command(self):
        if self.kind != "published" and not self.command:
            raise ValueError(f"a {self.kind} plan names the command that made it (provenance.command)")
        return self


def _refuse_dense_with_prefill(rule, what: str) -> None:
    """`dense: true` keeps the rule's prefill on vLLM's attention: an estimator or budget beside it would be
    ignored without a word; so would a budget beside an estimator that keeps every block (`dense`). (`decode`
    beside it is fine: decode has its own setting.)"""
    if rule.dense and (rule.estimator is not None or rule.budget is not None):
        raise ValueError(f"dense: true keeps {what}' prefill dense, so their estimator and budget would be ignored: "
                         "drop one of them")
    if rule.estimator is not None and rule.budget is not None and get_estimator(rule.estimator.name).keeps_all:
        raise ValueError(f"estimator {rule.estimator.name} keeps every block of {what}, so the budget beside it "
                         "would be ignored: drop one of them")


def _build_models():
    spec = estimator_spec_type()

    class HeadRule(StrictModel):
        heads: Selector = Field(
            description="q head index, range 'a-b' or 'a-', list, or 'all' (unsharded model's numbering)")
        estimator: spec | None = None  # type: ignore[valid-type]
        budget: BudgetSpec | None = None
        dense: bool = False
        decode: DecodeSpec | None = Field(None, description="decode page selection for these heads")

        @field_validator("decode", mode="before")
        @classmethod
        def _decode(cls, v):
            return _decode_setting(v)

        @field_validator("heads", mode="before")
        @classmethod
        def _heads(cls, v):
            return _check_selector(v, ("all",))

        @model_validator(mode="after")
        def _dense_sets_no_prefill(self):
            _refuse_dense_with_prefill(self, "these heads")
            return self

    class LayerRule(StrictModel):
        layers: Selector = Field(
            description="layer index, range 'a-b' or 'a-' (to the last), list, 'all' or 'full_attention'")
        estimator: spec | None = None  # type: ignore[valid-type]
        budget: BudgetSpec | None = None
        dense: bool = False
        decode: DecodeSpec | None = Field(None, description="decode page selection for these layers")
        heads: list[HeadRule] = Field(default_factory=list)

        @field_validator("decode", mode="before")
        @classmethod
        def _decode(cls, v):
            return _decode_setting(v)

        @field_validator("layers", mode="before")
        @classmethod
        def _layers(cls, v):
            return _check_selector(v, LAYER_KEYWORDS)

        @model_validator(mode="after")
        def _dense_sets_no_prefill(self):
            _refuse_dense_with_prefill(self, "these layers")
            if self.dense:  # (a head rule under a dense layer would be ignored: say so instead)
                for i, h in enumerate(self.heads):
                    if not h.dense and (h.estimator is not None or h.budget is not None):
                        raise ValueError(f"heads[{i}] sets an estimator or budget, but the layer rule says dense: "
                                         "true (every head's prefill dense): drop one of them")
            return self

    class Settings(StrictModel):
        block_size: int | None = Field(None, description="selection block in tokens: 16..1024, a power of two")
        dense_below: int | None = Field(
            None, ge=0, description="a query block whose tokens all lie before this position (each sees at most "
            "this many tokens) attends densely; a prefill chunk goes sparse once it has a query block past it")
        dense_tail: int | None = Field(
            None, ge=0, description="the last this many query tokens of each sparse prefill chunk attend densely "
            "(whole query blocks: the blocks holding them): a prompt's last tokens, where its first "
            "output token is read from, and a follow-up turn's question see every block. 0 (the default): off")
        decode: DecodeSpec | None = Field(
            None, description="decode page selection (Quest or TidalDecode), or `dense` (the default): vLLM's own "
            "decode")
        union_tile: int | None = Field(
            None, ge=1, description="query blocks per block union (default: one union per prefill chunk)")
        union_heads: bool | None = Field(
            None, description="true (the default): the q heads of a KV head attend to the union of their kept "
            "blocks (one page list per KV head, its pages read once per group); false: each q head attends only "
            "to its own kept blocks, so attention work follows each head's blocks, not their union (fewer "
            "blocks read, a different output: a plan's fidelity is measured with the setting it ships)")
        min_query_tokens: int | str | None = Field(
            None, description="prefill chunks with fewer query tokens stay dense, however long the context "
            "(a speculative verify step, a short suffix after a prefix-cache hit): an integer >= 2, or \"auto\" "
            "(the default): what the device needs for a sparse chunk to win, `vllm-sparse plan` prints it")
        min_chunk_work: int | str | None = Field(
            None, description="prefill chunks whose attention work (query tokens x the tokens they see, "
            "causal) is below this many token pairs stay dense: their sparse step's fixed costs would exceed "
            "what it saves. An integer, with an optional K/M/G suffix (\"128M\"), 0 (off), or \"auto\" (the "
            "default): the measured break-even of the device, `vllm-sparse plan` prints it")
        dense_above: float | str | None = Field(
            None, description="a layer whose sparse chunks of a length (up to 16K, 32K, ..., 1M) lately read more "
            "than this share of their causal KV blocks runs vLLM's dense attention for chunks of that length in the "
            "next steps with sparse chunks, then sparse again to measure anew: near a density of 1 the estimation "
            "costs more than the blocks left out save. A number in (0, 1] (1: off), or \"auto\" (the default): 0.8 "
            "on CUDA, off on CPU, `vllm-sparse plan` prints it")
        estimator: spec | None = None  # type: ignore[valid-type]
        budget: BudgetSpec | None = None

        @field_validator("decode", mode="before")
        @classmethod
        def _decode(cls, v):
            return _decode_setting(v)

        @field_validator("block_size")
        @classmethod
        def _block(cls, v):
            return _check_block(v, "block_size")

        @field_validator("min_chunk_work", mode="before")
        @classmethod
        def _work(cls, v):
            return parse_work(v)

        @field_validator("dense_above", mode="before")
        @classmethod
        def _dense_above(cls, v):
            if v is None or v == "auto" or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1):
                return v
            raise ValueError(f"{v!r}: give a share of the causal KV blocks in (0, 1] (1: off) or auto")

        @field_validator("min_query_tokens", mode="before")
        @classmethod
        def _query_tokens(cls, v):
            if v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 2):
                return v
            raise ValueError(f"{v!r}: give an integer >= 2 (query tokens) or auto")

    class ModelMatch(StrictModel):
        architectures: list[str] = Field(default_factory=list, description="HF architectures, e.g. LlamaForCausalLM")
        names: list[str] = Field(default_factory=list, description="globs matched against the model name or path")

        @model_validator(mode="after")
        def _some(self):
            if not self.architectures and not self.names:
                raise ValueError("give architectures and/or names to match")
            return self

    class ModelEntry(Settings):
        match: ModelMatch
        provenance: Provenance | None = Field(
            None, description="what backs this plan; discovery applies a shipped plan only when it is measured "
            "or published")
        layers: list[LayerRule] = Field(default_factory=list)

    class SparseConfigFile(StrictModel):
        version: Literal[1] = 1
        defaults: Settings = Field(default_factory=Settings)
        models: list[ModelEntry] = Field(min_length=1)

    return SparseConfigFile


@lru_cache(maxsize=1)
def config_file_model():
    return _build_models()


def json_schema() -> dict:
    schema = config_file_model().model_json_schema()
    schema["title"] = "vllm-sparse config"
    return schema
