"""Import every MInference settings file this project knows a model shape for (tests/fixtures/model_shapes.json)
and print what each plan holds: a check of MInference's files against the models' public shapes.

    python scripts/import_minference_all.py --configs MINFERENCE/minference/configs --commit SHA --out OUTDIR

Writes OUTDIR/<model>/config.json (the shape) and OUTDIR/<file>.yaml (the plan); prints one row per file.
The plans are not shipped: none has been timed or measured for fidelity here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_sparse.cli.main import main as cli  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", required=True, help="MInference's minference/configs directory")
    ap.add_argument("--commit", required=True, help="the MInference commit the files come from")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    shapes = json.loads((Path(__file__).resolve().parents[1] / "tests/fixtures/model_shapes.json").read_text())
    out = Path(args.out)
    rows, failed = [], 0
    for model in shapes["models"]:
        directory = out / model["name"].split("/")[-1]
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(model["config"]))
        for name in model["minference_files"]:
            src = Path(args.configs) / name
            plan = out / (src.stem + ".yaml")
            rc = cli(["import", "minference", str(src), "--model", str(directory), "--out", str(plan),
                      "--names", f"*{directory.name}*", "--commit", args.commit])
            data = json.loads(src.read_text())
            v = [s[1] for layer in data for s in layer.values()]
            sl = [s[2] for layer in data for s in layer.values()]
            rows.append((model["name"], name, rc, len(data), len(data[0]), statistics.median(v), statistics.median(sl)))
            failed += rc != 0
    print(f"\n{'model':44} {'rc':>3} {'layers x heads':>15} {'median vertical':>16} {'median slash':>13}  file")
    for m, f, rc, layers, heads, v, s in rows:
        print(f"{m:44} {rc:>3} {f'{layers} x {heads}':>15} {v:>16.0f} {s:>13.0f}  {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
