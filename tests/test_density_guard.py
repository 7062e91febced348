"""The plan's `dense_above` rule (`backend/density_guard.py`): layers whose sparse chunks read most of their
blocks run dense for a while, decided from counts read a step later, never with a host sync."""

from __future__ import annotations

import pytest
import torch
import yaml

from vllm_sparse.backend import density_guard as dg
from vllm_sparse.config.plan import AUTO_DENSE_ABOVE, DENSE_ABOVE_PROBE_STEPS

GPU = torch.cuda.is_available()


def _guard(num_layers=4, dense_above=0.8):
    return dg.DensityGuard(torch.device("cuda" if GPU else "cpu"), num_layers, dense_above)


def _sync(guard):
    if GPU:
        torch.cuda.synchronize()


def test_a_layer_that_reads_most_blocks_goes_dense_a_step_later_then_measures_again():
    g = _guard()
    assert g.begin_step() == frozenset()  # nothing counted yet
    g.record(0, 9, 10)  # 90% > 0.8: dense
    g.record(1, torch.tensor([3, 4], dtype=torch.int32, device=g.device), 10)  # 70%: stays sparse
    g.record(1, 1, 10)  # the layer's chunks of a step add up: 8 of 20
    # The step that queues the copy does not see it yet (no sync): only the next one reads it.
    assert g.begin_step() == frozenset()
    _sync(g)
    assert g.begin_step() == {0}
    # Dense layers are counted by nobody (the layer runs vLLM's attention): it stays dense PROBE_STEPS steps...
    for _ in range(DENSE_ABOVE_PROBE_STEPS - 1):
        assert g.begin_step() == {0}
    # ...then runs sparse again, and a sparser document keeps it sparse.
    assert g.begin_step() == frozenset()
    g.record(0, 2, 10)
    g.begin_step()
    _sync(g)
    assert g.begin_step() == frozenset()


def test_the_share_is_compared_with_the_pages_the_chunks_could_read():
    g = _guard(num_layers=3, dense_above=0.5)
    g.record(0, 50, 100)  # exactly the share: not above it
    g.record(1, 51, 100)
    g.record(2, 0, 0)  # a layer with nothing causal counted (cannot happen serving): no decision
    g.begin_step()
    _sync(g)
    assert g.begin_step() == {1}


def test_counts_of_a_copy_in_flight_wait_for_the_next_copy():
    """Counts recorded while a copy is queued and not yet read are not lost: they go in the next copy."""
    g = _guard(num_layers=2)
    g.record(0, 1, 10)
    g.begin_step()  # queues layer 0's 10%
    g.record(1, 9, 10)  # after the copy: counted on the device for the next one
    _sync(g)
    assert g.begin_step() == frozenset()  # reads 10% for layer 0, queues layer 1's 90%
    _sync(g)
    assert g.begin_step() == {1}


def test_the_one_launch_count_equals_the_torch_count():
    """CUDA's path (here in Triton's interpreter): the page counts of any shape, also a slice at an odd
    offset of a larger buffer (as serving passes a CSR index array's end), summed into the layer's slot."""
    device = torch.device("cuda" if GPU else "cpu")
    counts = []
    for use_kernel in (False, True):
        g = dg.DensityGuard(device, 3, 0.8)
        g.use_kernel = use_kernel
        buf = torch.randint(0, 1000, (300,), dtype=torch.int32, generator=torch.Generator().manual_seed(3)).to(device)
        g.record(2, buf[7:290].view(283, 1), 10**6)
        g.record(0, buf[5:6], 10**3)
        g.record(2, buf[:3], 10)
        counts.append(g._kept.cpu())
    assert torch.equal(counts[0], counts[1]) and int(counts[0][1]) == 0 and int(counts[0][2]) > 0


def test_one_builder_moves_the_guard_on():
    g = _guard()

    class Builder:
        pass

    a, b = Builder(), Builder()
    assert g.claim(a) and not g.claim(b) and g.claim(a)
    del a
    import gc

    gc.collect()
    assert g.claim(b)  # the claimer is gone (a throw-away builder): the next one takes over


def test_auto_is_on_for_cuda_and_off_on_cpu_and_a_setting_is_checked(tmp_path):
    from vllm_sparse.config.errors import SparseConfigError
    from vllm_sparse.config.loader import load_config
    from vllm_sparse.config.plan import ModelShape, resolve_plan

    shape = ModelShape("m", ("LlamaForCausalLM",), 2, 4, 2)

    def plan(**settings):
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({"version": 1, "models": [{
            "match": {"architectures": ["LlamaForCausalLM"]}, **settings,
            "layers": [{"layers": "all", "estimator": {"name": "sink_local"}, "budget": {"top_p": 0.9}}]}]}))
        return resolve_plan(load_config(path), shape, "test")

    auto = plan()
    assert auto.dense_above is None and auto.dense_above_on("cuda") == AUTO_DENSE_ABOVE["cuda"] == 0.8
    assert auto.dense_above_on("cpu") == 1.0
    assert plan(dense_above=0.5).dense_above_on("cpu") == 0.5 and plan(dense_above=1).dense_above_on("cuda") == 1
    for bad in (0, 1.5, -0.1, "high", True):
        with pytest.raises(SparseConfigError, match="dense_above"):
            plan(dense_above=bad)
    assert dg.density_guard(torch.device("cpu"), 2, 1.0) is None  # off: no guard, no counting


@pytest.mark.engine
def test_an_engine_runs_a_layer_dense_once_its_chunks_read_most_blocks(tiny_llama, tmp_path):
    """In vLLM's CPU engine: a keep-all plan reads every block, so with `dense_above: 0.5` its layers run
    sparse in the first steps with sparse chunks and dense once the builder has read their density, and with
    `dense_above: 1` sparse throughout. Both give the same tokens (keep-all equals dense). The long prompt's
    chunks: 256 tokens a step, sparse from the second (tests/test_engine_cpu.py's prompts and engine)."""
    from tests.engines import run_engine
    from tests.test_engine_cpu import ENGINE, _config, _prompts

    keep_all = {"estimator": {"name": "sink_local", "sink_blocks": 1, "local_blocks": 2},
                "budget": {"keep_ratio": 1.0}}
    out = {}
    for above in (0.5, 1):
        path = _config(tmp_path, f"keep_all_{above}", keep_all)
        cfg = yaml.safe_load(open(path))
        cfg["models"][0]["dense_above"] = above
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        out[above] = run_engine({"model": str(tiny_llama), "backend": "sparse", "config": path, "stats": True,
                                 "prompts": _prompts(tiny_llama), "engine": ENGINE, "max_tokens": 4})[0]
    guarded, unguarded = ({int(k): v["unions"] for k, v in out[a]["stats"].items()} for a in (0.5, 1))
    print(f"union tiles run sparse per layer: dense_above 0.5 {guarded}, dense_above 1 {unguarded}")
    assert sorted(guarded) == sorted(unguarded) == [0, 1]
    for layer in (0, 1):
        # Sparse chunk-layers ran in both (the steps before the density was read), fewer with the rule.
        assert 0 < guarded[layer] < unguarded[layer], (guarded, unguarded)
    assert [r["token_ids"] for r in out[0.5]["results"]] == [r["token_ids"] for r in out[1]["results"]]
