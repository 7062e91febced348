"""--plot: the PNGs of calibrate, eval and benchmarks/e2e.py from their JSON, and the message when the
`plot` extra (matplotlib) is missing."""

from __future__ import annotations

import sys

import pytest

from vllm_sparse.calibrate.choose import LayerTable, choose
from vllm_sparse.calibrate.run import choices_json
from vllm_sparse.cli.main import main
from vllm_sparse.plot import MissingExtra, plot_calibration, plot_eval, plot_ttft, require_matplotlib

PNG = b"\x89PNG\r\n\x1a\n"


def _calibration(verified: bool) -> dict:
    tables = [LayerTable(0, [[0.99, 0.98, 0.6, 0.7], [0.96, 0.97, 0.95, 0.99]], [[0.3, 0.2], [0.5, 0.6]]),
              LayerTable(1, [[0.5] * 4, [0.6] * 4], [[0.1] * 2, [0.2] * 2])]
    labels = ["a", "b"]
    result = {"num_q_heads": 4, "num_kv_heads": 2, "labels": labels,
              "spec": {"model": "/m/tiny", "lengths": [600, 1000], "target": 0.95},
              "choices": choices_json(choose(tables, 0.95, labels=labels), labels), "verified": None}
    if verified:
        result["verified"] = {"0": {"layer": 0, "recall": [[0.97, 0.96, 0.95, 0.99]], "density": [[0.31, 0.58]]}}
    return result


@pytest.mark.parametrize("verified", [False, True])
def test_calibration_heatmap(tmp_path, verified):
    pytest.importorskip("matplotlib")
    path = plot_calibration(_calibration(verified), tmp_path / "cal.png")
    assert path.read_bytes().startswith(PNG)


def test_eval_and_ttft_plots(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"length": n, "task": t, "dense_acc": 1.0, "sparse_acc": 0.8, "kept_union": 0.4 if n > 500 else None}
            for n in (500, 900) for t in ("passkey", "multikey")]
    assert plot_eval({"model": "/m/tiny", "config": "c.yaml", "rows": rows}, tmp_path / "e.png").read_bytes()[:8] == PNG
    e2e = {"meta": {"device": "H200", "vllm": "0.26.0"}, "dense": {"ttft_s": {"32768": 1.2, "65536": 3.3}},
           "sparse": {"configs/llama-3.yaml": {"ttft_s": {"32768": 1.3, "65536": 3.5}}, "x.yaml": {"error": "boom"}}}
    assert plot_ttft(e2e, tmp_path / "t.png").read_bytes()[:8] == PNG


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(MissingExtra, match=r"vllm-sparse\[plot\]"):
        require_matplotlib()
    out = tmp_path / "plan.yaml"
    # Refused before any model is loaded or measured.
    assert main(["calibrate", "--model", "/nonexistent", "--lengths", "1000", "--out", str(out), "--plot"]) == 2
    assert "vllm-sparse[plot]" in capsys.readouterr().err and not out.exists()
    assert main(["eval", "--model", "/nonexistent", "--config", "c.yaml", "--json", str(tmp_path / "e.json"),
                 "--plot"]) == 2
    assert "vllm-sparse[plot]" in capsys.readouterr().err


def test_eval_plot_needs_json(capsys):
    assert main(["eval", "--model", "/nonexistent", "--config", "c.yaml", "--plot"]) == 2
    assert "--json" in capsys.readouterr().err
