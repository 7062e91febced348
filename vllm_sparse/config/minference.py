"""MInference's published per-head vertical-and-slash settings (github.com/microsoft/MInference,
`minference/configs/*.json`) as a plan of this project.

Each file is a list with one entry per layer, mapping each q head ("0", "1", ...) to
`["vertical_and_slash", vertical_size, slash_size, score]`: MInference keeps, per head, the
`vertical_size` key columns and the `slash_size` diagonals (query - key offsets) its prompt's last 64
queries attend to most, the first 30 columns and the 100 nearest diagonals always among them (it raises
the sizes to at least 30 and 50), and attends to those tokens. `score` is the search's objective, not a
setting. `["stream_llm", n_init, n_local, score]` (MInference's A-shape: the first n_init tokens and
an n_local-token window) becomes `sink_local` over the blocks holding them.

In blocks: a kept column keeps the KV block that holds it, for every query block that sees it; a kept
diagonal keeps every KV block it crosses within a query block. That is the `vertical_slash` estimator with
`sink_columns: 30`, `local_diagonals: 100`, `blocks: crossed` and a `top_p: 1.0` budget (every crossed
block, nothing else; no sink blocks, the diagonal block, which the nearest diagonals cross anyway). The
lines are scored per prefill chunk, from that chunk's last 64 queries (MInference scores the whole prompt
at once). tests/test_minference.py checks this against MInference's own index selection.
"""

from __future__ import annotations

from collections import defaultdict

from vllm_sparse.config.errors import SparseConfigError
from vllm_sparse.config.plan import ModelShape

PATTERN = "vertical_and_slash"
STREAM = "stream_llm"  # MInference's A-shape: the first `vertical_size` tokens and a `slash_size`-token window
SINK_COLUMNS, LOCAL_DIAGONALS = 30, 100  # MInference's always-kept lines
MIN_VERTICAL, MIN_SLASH = 30, 50  # and its floors on the sizes
LAST_Q = 64


def plan_from_minference(data, shape: ModelShape, source: str, names: list[str], block_size: int = 64,
                         columns: str = "block") -> dict:
    """The plan (a config file as a dict, ready for YAML) for `shape` from MInference's per-head settings
    `data` (the parsed JSON). Errors name the layer and head. columns: "block" keeps the block of each kept
    column (`blocks: crossed`); "token" reads the columns token by token (`blocks: columns`)."""
    problems = []
    if not isinstance(data, list):
        raise SparseConfigError(source, [("file", f"a list of layers, one per layer, not {type(data).__name__}")])
    if len(data) != shape.num_layers:
        problems.append(("layers", f"{len(data)} layers in the file, the model {shape.name} has {shape.num_layers}"))
    layers = []
    for i, entry in enumerate(data[: shape.num_layers]):
        if not isinstance(entry, dict):
            problems.append((f"layer {i}", f"a mapping of q head -> setting, not {type(entry).__name__}"))
            continue
        heads = {}
        for key, setting in entry.items():
            if not str(key).isdigit() or int(key) >= shape.num_q_heads:
                problems.append((f"layer {i} head {key}", f"not a q head of the model ({shape.num_q_heads}: 0-"
                                 f"{shape.num_q_heads - 1})"))
                continue
            if not (isinstance(setting, list) and len(setting) >= 3):
                problems.append((f"layer {i} head {key}",
                                 f"[pattern, vertical_size, slash_size, score], not {setting!r}"))
                continue
            if setting[0] not in (PATTERN, STREAM):
                problems.append((f"layer {i} head {key}", f"pattern {setting[0]!r}: only {PATTERN!r} and {STREAM!r} "
                                 "are imported"))
                continue
            v, s = setting[1], setting[2]
            if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in (v, s)):
                problems.append((f"layer {i} head {key}", f"sizes must be whole numbers >= 1, not {v!r}, {s!r}"))
                continue
            if int(key) in heads:  # ("1" and "01": one head given twice)
                problems.append((f"layer {i} head {key}", f"q head {int(key)} is given twice"))
                continue
            heads[int(key)] = (STREAM, v, s) if setting[0] == STREAM else (PATTERN, max(v, MIN_VERTICAL),
                                                                          max(s, MIN_SLASH))
        missing = sorted(set(range(shape.num_q_heads)) - {int(k) for k in entry if str(k).isdigit()})
        if missing:
            problems.append((f"layer {i}", f"no setting for q heads {missing} (the model has {shape.num_q_heads})"))
        layers.append(heads)
    if problems:
        raise SparseConfigError(source, problems)

    rules = []
    for i, heads in enumerate(layers):
        by_size = defaultdict(list)
        for h, sizes in sorted(heads.items()):
            by_size[sizes].append(h)
        common = max(by_size, key=lambda k: len(by_size[k]))  # the layer's estimator; other sizes per head
        rule = {"layers": i, **_head_setting(common, block_size, columns)}
        rule["heads"] = [{"heads": hs, **_head_setting(sizes, block_size, columns)}
                         for sizes, hs in by_size.items() if sizes != common]
        if not rule["heads"]:
            del rule["heads"]
        rules.append(rule)
    return {"version": 1, "models": [{
        "match": {"names": names},
        "provenance": {"kind": "published", "source": source},
        "block_size": block_size,
        "union_tile": 1,  # a union per query block: each one's kept blocks are its own lines'
        "budget": {"top_p": 1.0, "sink_blocks": 0, "local_blocks": 1},
        "layers": rules,
    }]}


def _head_setting(setting: tuple, block_size: int, columns: str = "block") -> dict:
    """A rule's estimator (and, for the A-shape, budget) for one of MInference's settings."""
    pattern, vertical, slash = setting
    if pattern == STREAM:  # the blocks holding the first `vertical` tokens, and every block a query's
        # `slash`-token window reaches: from the query block's first token back slash - 1 tokens
        blocks = {"sink_blocks": -(-vertical // block_size), "local_blocks": 1 + -(-(slash - 1) // block_size)}
        return {"estimator": {"name": "sink_local", **blocks}, "budget": {"top_k": 1, **blocks}}
    return {"estimator": {"name": "vertical_slash", "last_q": LAST_Q, "vertical_size": vertical, "slash_size": slash,
                          "sink_columns": SINK_COLUMNS, "local_diagonals": LOCAL_DIAGONALS,
                          "blocks": "columns" if columns == "token" else "crossed"}}
