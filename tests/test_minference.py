"""MInference's published vertical-and-slash settings, as this project's plans.

The mapping (docs/config.md, "MInference's per-head settings"): MInference keeps, per q head, the
`vertical_size` key columns and `slash_size` diagonals (query - key offsets) that its prompt's last 64
queries attend to most, the first 30 columns and the 100 nearest diagonals always among them, and
attends to those tokens. Here a kept column keeps the KV block that holds it, for every query block
that sees it; a kept diagonal keeps every KV block it crosses within a query block. The test below
checks that mapping against a torch reference of MInference's own index selection.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.fixtures.paged import random_paged_batch
from vllm_sparse.estimators.base import ChunkContext
from vllm_sparse.estimators.registry import get_estimator
from vllm_sparse.selection.budget import Budget, select_blocks

# The fused kernels run where a GPU host compiles them (its Triton refuses CPU tensors); elsewhere interpreted.
FUSED_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def minference_lines(q: torch.Tensor, k: torch.Tensor, vertical_size: int, slash_size: int):
    """MInference's index selection for one head over a whole prompt (minference/modules/minference_forward.py,
    `vertical_and_slash_kernel`, read at github.com/microsoft/MInference fb56c91): q, k [n, d] ->
    (kept key columns, kept offsets query - key)."""
    n = q.shape[0]
    v_size, s_size = min(n, max(vertical_size, 30)), min(n, max(slash_size, 50))
    last_q = min(64, n)
    qk = (q[-last_q:].double() @ k.double().T) / math.sqrt(q.shape[1])  # [last_q, n]
    pos = torch.arange(n - last_q, n)[:, None]
    qk = qk.masked_fill(torch.arange(n)[None, :] > pos, float("-inf"))
    p = torch.softmax(qk, dim=-1)
    vertical = p.sum(0)
    vertical[:30] = float("inf")
    slash = torch.zeros(n, dtype=torch.float64)  # by offset
    offsets = (pos - torch.arange(n)[None, :])
    slash.index_add_(0, offsets.clamp_min(0).flatten(), torch.where(offsets >= 0, p, 0.0).flatten())
    slash[:100] = float("inf")
    return vertical.topk(v_size).indices, slash.topk(s_size).indices


def blocks_of_lines(columns, offsets, n: int, block: int) -> torch.Tensor:
    """[query blocks, KV blocks]: the blocks the kept columns hold and the kept diagonals cross."""
    rows = -(-n // block)
    mask = torch.zeros(rows, rows, dtype=torch.bool)
    for r in range(rows):
        q0, q1 = r * block, min((r + 1) * block, n) - 1
        for c in columns.tolist():
            if c <= q1:
                mask[r, c // block] = True
        for o in offsets.tolist():
            if q1 - o >= 0:
                mask[r, max(q0 - o, 0) // block: (q1 - o) // block + 1] = True
    return mask


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "fused"])
# Sizes past the 30 + 100 lines always kept, few enough that the blocks kept stay a minority at these lengths
# (MInference's own sizes, in the thousands, keep every block of a prompt this short).
@pytest.mark.parametrize("n,block,sizes", [(2000, 32, ((45, 110), (30, 120), (60, 104))), (1500, 64, ((40, 104),) * 2)])
def test_vertical_slash_crossed_keeps_the_blocks_minferences_lines_cover(n, block, sizes, kernels):
    heads = len(sizes)
    b = random_paged_batch([n], [n], heads, heads, 32, 16, seed=n)
    keys = b.keys[0]  # [n, kv_heads, d] in position order
    est = get_estimator("vertical_slash")
    budget = Budget(top_p=1.0, sink_blocks=0, local_blocks=1)
    on = b.to(FUSED_DEVICE) if kernels else b
    for h, (v, s) in enumerate(sizes):
        chunk = ChunkContext(on.q[:, h:h + 1], torch.tensor([h], device=on.q.device), on.kv, on.block_table[0], 0,
                             block, 32**-0.5, (h,), kernels)
        params = est.params(last_q=64, vertical_size=max(v, 30), slash_size=max(s, 50), sink_columns=30,
                            local_diagonals=100, blocks="crossed")
        got = select_blocks(est.score(chunk, params), budget, 0)[0].cpu()
        columns, offsets = minference_lines(b.q[:, h], keys[:, h], v, s)
        want = blocks_of_lines(columns, offsets, n, block)
        assert torch.equal(got, want), (h, (got != want).nonzero()[:5].tolist())
        assert 0.1 < want.sum() / torch.ones_like(want).tril().sum() < 0.8, "a case that keeps all or nothing"


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "fused"])
def test_vertical_slash_columns_keeps_minferences_columns_as_tokens(kernels):
    """`blocks: columns`: the kept columns are MInference's own, as token positions (read one by one), and the
    blocks kept are only those its kept diagonals cross."""
    n, block, heads = 1500, 64, 2
    b = random_paged_batch([n], [n], heads, heads, 32, 16, seed=n + 1)
    est = get_estimator("vertical_slash")
    budget = Budget(top_p=1.0, sink_blocks=0, local_blocks=1)
    on = b.to(FUSED_DEVICE) if kernels else b
    for h, (v, s) in enumerate(((45, 104), (60, 120))):
        chunk = ChunkContext(on.q[:, h:h + 1], torch.tensor([h], device=on.q.device), on.kv, on.block_table[0], 0,
                             block, 32**-0.5, (h,), kernels)
        params = est.params(last_q=64, vertical_size=v, slash_size=s, sink_columns=30, local_diagonals=100,
                            blocks="columns")
        got = select_blocks(est.score(chunk, params), budget, 0)[0].cpu()
        columns, offsets = minference_lines(b.q[:, h], b.keys[0][:, h], v, s)
        assert chunk.extras["columns"].shape == (1, v)
        assert torch.equal(chunk.extras["columns"][0].long().cpu(), columns.sort().values)
        assert torch.equal(got, blocks_of_lines(columns[:0], offsets, n, block))


LLAMA_31_8B = {  # config.json of meta-llama/Llama-3.1-8B-Instruct: the fields the shape reads (public facts)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "vocab_size": 128256,
}


def _model_dir(tmp_path, name="Llama-3.1-8B-Instruct", cfg=LLAMA_31_8B):
    import json

    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _settings(layers=32, heads=32, seed=0):
    """A file shaped like MInference's: per layer, q head -> [pattern, vertical, slash, score]."""
    import random

    rng = random.Random(seed)
    sizes = [(1000, 6096), (30, 800), (3048, 8144), (100, 800)]
    return [{str(h): ["vertical_and_slash", *rng.choice(sizes), rng.random()] for h in range(heads)}
            for _ in range(layers)]


def test_import_writes_a_published_plan_whose_heads_carry_their_sizes(tmp_path, capsys):
    import json

    import yaml

    from vllm_sparse.cli.main import main
    from vllm_sparse.config.loader import load_config
    from vllm_sparse.config.plan import ModelShape, resolve_plan

    model = _model_dir(tmp_path)
    data = _settings()
    data[3]["7"] = ["vertical_and_slash", 10, 20, 0.5]  # below MInference's floors: raised to 30 and 50
    src = tmp_path / "Llama_3.1_8B_Instruct_128k_kv_out_v32_fit_o_best_pattern.json"
    src.write_text(json.dumps(data))
    out = tmp_path / "plan.yaml"
    assert main(["import", "minference", str(src), "--model", str(model), "--out", str(out),
                 "--names", "*Llama-3.1-8B*", "--commit", "fb56c91"]) == 0
    assert "32 layers x 32 q heads" in capsys.readouterr().out
    raw = yaml.safe_load(out.read_text())
    provenance = raw["models"][0]["provenance"]
    assert provenance["kind"] == "published" and src.name in provenance["source"] and "fb56c91" in provenance["source"]
    shape = ModelShape.from_pretrained(str(model))
    plan = resolve_plan(load_config(out), ModelShape(**{**vars(shape), "name": "meta-llama/Llama-3.1-8B"}), "t",
                        explicit=True)
    for layer in range(32):
        for head in range(32):
            hp = plan.layer(layer).heads[head]
            _, v, s, _ = data[layer][str(head)]
            assert hp.estimator == "vertical_slash"
            assert (hp.params.vertical_size, hp.params.slash_size) == (max(v, 30), max(s, 50)), (layer, head)
            assert (hp.params.sink_columns, hp.params.local_diagonals, hp.params.blocks) == (30, 100, "crossed")
            assert hp.budget.top_p == 1.0 and hp.budget.sink_blocks == 0
    assert plan.block_size == 64 and plan.union_tile == 1
    # --columns token: the same sizes, the columns read token by token
    out2 = tmp_path / "plan-columns.yaml"
    assert main(["import", "minference", str(src), "--model", str(model), "--out", str(out2),
                 "--names", "*Llama-3.1-8B*", "--columns", "token"]) == 0
    raw2 = yaml.safe_load(out2.read_text())
    assert raw2["models"][0]["layers"][3]["estimator"]["blocks"] == "columns"
    assert out2.read_text().count("blocks: columns") == out.read_text().count("blocks: crossed") > 0


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.pop(), "31 layers in the file, the model"),
    (lambda d: d[5].pop("12"), "layer 5: no setting for q heads [12]"),
    (lambda d: d[2].__setitem__("40", ["vertical_and_slash", 100, 800, 0.9]), "layer 2 head 40: not a q head"),
    (lambda d: d[9].__setitem__("3", ["block_sparse", 100, 800, 0.9]),
     "layer 9 head 3: pattern 'block_sparse': only 'vertical_and_slash' and 'stream_llm' are imported"),
    (lambda d: d[0].__setitem__("1", ["vertical_and_slash", -4, 800, 0.9]), "layer 0 head 1: sizes must be"),
    (lambda d: d[0].__setitem__("1", ["vertical_and_slash", True, 800, 0.9]), "layer 0 head 1: sizes must be"),
    (lambda d: d[4].__setitem__("07", ["vertical_and_slash", 100, 800, 0.9]),
     "layer 4 head 07: q head 7 is given twice"),
])
def test_import_names_the_layer_and_head_it_cannot_map(tmp_path, capsys, edit, message):
    import json

    from vllm_sparse.cli.main import main

    data = _settings()
    edit(data)
    src = tmp_path / "settings.json"
    src.write_text(json.dumps(data))
    out = tmp_path / "plan.yaml"
    assert main(["import", "minference", str(src), "--model", str(_model_dir(tmp_path)), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "fused"])
def test_heads_with_their_own_sizes_score_in_one_call_as_each_alone(kernels):
    """An imported layer gives its heads different sizes: the sparse path scores them in one call (one pass of
    line sums over the context), and each head keeps what its own plan alone keeps."""
    import dataclasses

    from vllm_sparse.backend.sparse_path import chunk_block_mask, scoring_groups
    from vllm_sparse.config.plan import HeadPlan

    n, block, heads = 1500, 64, 8
    b = random_paged_batch([n], [512], heads, 2, 32, 16, seed=5)
    b = b.to(FUSED_DEVICE) if kernels else b
    chunk = ChunkContext(b.q, torch.arange(heads, device=b.q.device) // 4, b.kv, b.block_table[0], n - 512, block,
                         32**-0.5, tuple(h // 4 for h in range(heads)), kernels)
    est = get_estimator("vertical_slash")
    budget = Budget(top_p=1.0, sink_blocks=0, local_blocks=1)
    sizes = [(40, 104), (30, 120), (40, 104), (60, 110), (30, 120), (45, 101), (40, 104), (30, 120)]
    plans = [HeadPlan("vertical_slash", est.params(vertical_size=v, slash_size=s, sink_columns=30,
                                                   local_diagonals=100, blocks="crossed"), budget) for v, s in sizes]
    plans[5] = None  # a dense head stays out of the call
    groups = scoring_groups({p: [h for h, q in enumerate(plans) if q == p] for p in dict.fromkeys(plans)})
    assert len(groups) == 1 and groups[0][1] == [0, 1, 2, 3, 4, 6, 7]
    mask = chunk_block_mask(chunk, plans)
    for h, plan in enumerate(plans):
        if plan is None:
            assert torch.equal(mask[h], chunk.causal_block_mask())
            continue
        alone = dataclasses.replace(chunk, q=chunk.q[:, h:h + 1], kv_head_of=chunk.kv_head_of[h:h + 1],
                                    kv_head_ids=(chunk.kv_head_ids[h],))
        assert torch.equal(mask[h], select_blocks(est.score(alone, plan.params), budget, chunk.first_query_block)[0]), h


@pytest.mark.parametrize("always", [0, 5])
def test_per_head_line_counts_keep_each_heads_own_top_lines_from_one_top_k(always):
    """`_keep_lines` and `_kept_columns` with a size per head (one top-k at the largest size, each head's prefix)
    keep exactly each head's own top-k lines, the first `always` among them, as a top-k per size did."""
    from vllm_sparse.estimators.base import COLUMN_PAD
    from vllm_sparse.estimators.vertical_slash import _keep_lines, _kept_columns

    g = torch.Generator().manual_seed(31 + always)
    x = torch.rand(6, 500, generator=g)
    sizes = [40, 7, 40, 120, 7, 600]  # (600: past the row, all 500 kept)
    keep, columns = _keep_lines(x, sizes, always), _kept_columns(x, sizes, always)
    assert columns.shape == (6, 500) and columns.dtype == torch.int32
    for h, k in enumerate(sizes):
        rank = x[h].clone()
        rank[:always] = float("inf")
        want = rank.topk(min(k, 500)).indices.sort().values
        assert torch.equal(keep[h].nonzero().flatten(), want), h
        assert torch.equal(columns[h, :len(want)].long(), want), h
        assert (columns[h, len(want):] == COLUMN_PAD).all(), h


def _family_shapes():
    import json
    from pathlib import Path

    return json.loads((Path(__file__).parent / "fixtures/model_shapes.json").read_text())["models"]


@pytest.mark.parametrize("model", _family_shapes(), ids=lambda m: m["name"].split("/")[-1])
def test_import_fits_every_family_minference_publishes_for(tmp_path, model):
    """Each model MInference publishes settings for, by its public config.json shape: a file of that shape
    imports into a plan that resolves for the model, every layer and q head carrying its sizes; one with a
    layer fewer is refused."""
    import json

    import yaml

    from vllm_sparse.cli.main import main
    from vllm_sparse.config.loader import load_config
    from vllm_sparse.config.plan import ModelShape, resolve_plan

    cfg = model["config"]
    directory = _model_dir(tmp_path, model["name"].split("/")[-1], cfg)
    data = _settings(cfg["num_hidden_layers"], cfg["num_attention_heads"], seed=len(model["name"]))
    src = tmp_path / model["minference_files"][0]
    src.write_text(json.dumps(data))
    out = tmp_path / "plan.yaml"
    assert main(["import", "minference", str(src), "--model", str(directory), "--out", str(out)]) == 0
    shape = ModelShape.from_pretrained(str(directory))
    assert (shape.num_layers, shape.num_q_heads, shape.num_kv_heads) == (
        cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"])
    plan = resolve_plan(load_config(out), shape, str(out), explicit=True)
    assert all(hp is not None and hp.params.vertical_size == max(data[i][str(h)][1], 30)
               for i, layer in enumerate(plan.layers) for h, hp in enumerate(layer.heads))
    assert yaml.safe_load(out.read_text())["models"][0]["match"]["names"] == [f"*{directory.name}*"]
    src.write_text(json.dumps(data[:-1]))
    assert main(["import", "minference", str(src), "--model", str(directory), "--out", str(tmp_path / "x.yaml")]) == 2


@pytest.mark.parametrize("n_init,n_local,block", [(100, 800, 64), (30, 200, 32), (64, 65, 64)])
def test_stream_llm_keeps_the_blocks_of_minferences_a_shape(n_init, n_local, block):
    """MInference's `stream_llm` heads attend to the first n_init tokens and an n_local-token window
    (minference/ops/streaming_kernel.py, `streaming_forward`): imported as sink_local over every block holding
    such a key for some query of the query block, and no other."""
    from vllm_sparse.config.minference import _head_setting

    n = 3000
    setting = _head_setting(("stream_llm", n_init, n_local), block)
    est = get_estimator("sink_local")
    budget = Budget(**setting["budget"])
    b = random_paged_batch([n], [n], 1, 1, 32, 16, seed=3)
    chunk = ChunkContext(b.q, torch.tensor([0]), b.kv, b.block_table[0], 0, block, 32**-0.5, (0,))
    got = select_blocks(est.score(chunk, est.params(**{k: v for k, v in setting["estimator"].items() if k != "name"})),
                        budget, 0)[0]
    rows = -(-n // block)
    want = torch.zeros(rows, rows, dtype=torch.bool)
    for q in range(n):
        keys = torch.arange(q + 1)
        seen = (keys < n_init) | (keys > q - n_local)
        want[q // block, (keys[seen] // block).unique()] = True
    assert torch.equal(got, want)


@pytest.mark.parametrize("text, needle", [('[{"0": ["vertical_and_slash", 10', "not JSON: "),
                                          (None, "cannot read the file")])
def test_an_unreadable_settings_file_is_a_clear_error(tmp_path, capsys, text, needle):
    from vllm_sparse.cli.main import main

    src = tmp_path / "settings.json"
    if text is not None:
        src.write_text(text)
    out = tmp_path / "plan.yaml"
    assert main(["import", "minference", str(src), "--model", str(_model_dir(tmp_path)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and str(src) in err and "Traceback" not in err


def test_a_model_path_without_a_config_is_a_clear_error(tmp_path, capsys):
    from vllm_sparse.cli.main import main

    for args in (["plan", "configs/llama-3.yaml"], ["plan"]):  # (the header names the model, not a config)
        assert main([*args, "--model", str(tmp_path / "no-such-model")]) == 2
        err = capsys.readouterr().err
        assert "--model: cannot read the model's config.json" in err
        assert f"invalid model {tmp_path / 'no-such-model'}:" in err and "invalid sparse-attention config" not in err
