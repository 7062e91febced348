"""Pass-key prompts through a real OpenAI client against `vllm-sparse serve`: the stock backend and SPARSE.

Issue 28, item 7 saw SPARSE answer "yellow" to one 14K-token prompt of four (stock: 4 of 4) through
streaming completions. A client that sets no temperature samples at the server's default (gemma-3-270m's
generation config sets none: temperature 1.0), so each prompt is asked here both ways: greedily once
(temperature 0), and `--samples` times at the server's default sampling (one request, `n` completions,
one prefill). Prompts: the eval's pass-key prompt (repetitive filler, "The sun is yellow." among it) at
each length and depth, each with its own key (`--seed`). Also the probability the model gives the key's
tokens (from the greedy answer's top-20 log-probabilities), stock vs each plan (--config, repeatable).
Table last; JSON to --out.

    python benchmarks/passkey_server.py --model DIR --config configs/gemma-3.yaml --lengths 11264,14336 \
        --depths 0.25,0.5,0.75 --samples 20 --out passkey_server.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.server import vllm_server  # noqa: E402
from vllm_sparse.eval.tasks import passkey_correct, passkey_prompt  # noqa: E402


def ask(client, model: str, prompt: str, n: int, greedy: bool) -> tuple[list[str], list[dict]]:
    """Streaming completions: n texts of up to 8 tokens (temperature 0 if greedy, else the server's default),
    and for the first completion each token's top-20 log-probabilities."""
    kw = {"temperature": 0.0} if greedy else {}
    texts, tops = [""] * n, []
    for event in client.completions.create(model=model, prompt=prompt, max_tokens=8, n=n, stream=True, logprobs=20,
                                           **kw):
        for choice in event.choices:
            if choice.index == 0 and choice.logprobs and choice.logprobs.top_logprobs:
                tops += [dict(t) for t in choice.logprobs.top_logprobs]
            texts[choice.index] += choice.text
    return texts, tops


def answer_prob(tops: list[dict], key_tokens: list[str]) -> tuple[float | None, bool]:
    """The probability of the key's tokens after the prompt, from the greedy path's top-20 log-probabilities:
    exact while the greedy tokens are the key's; where greedy leaves the key, its token's top-20 entry there
    (None below the top 20), the later tokens counted as certain (an upper bound). -> (prob, exact)."""
    logp = 0.0
    for top, want in zip(tops, key_tokens):
        if want not in top:
            return None, False
        logp += top[want]
        if max(top, key=top.get) != want:
            return math.exp(logp), False
    return math.exp(logp), len(tops) >= len(key_tokens)


def run_backend(config: str | None, args, prompts: list[dict], log: Path) -> dict:
    from openai import OpenAI

    serve = [args.model, "--max-model-len", str(max(args.lengths) + 64), "--max-num-seqs", str(max(args.samples, 8)),
             "--max-logprobs", "20", *args.serve_args.split()]
    if config:
        serve += ["--attention-backend", "sparse", "--additional-config",
                  json.dumps({"sparse": {"config": str(Path(config).resolve())}})]
    rows = []
    with vllm_server(serve, log, timeout=600) as (url, startup):
        client = OpenAI(base_url=url + "/v1", api_key="none")
        for p in prompts:
            t0 = time.perf_counter()
            (greedy,), tops = ask(client, args.model, p["prompt"], 1, True)
            sampled = ask(client, args.model, p["prompt"], args.samples, False)[0] if args.samples else []
            prob, exact = answer_prob(tops, p["key_tokens"])
            rows.append({**{k: p[k] for k in ("tokens", "depth", "key")}, "greedy": greedy,
                         "greedy_correct": passkey_correct(greedy, p["key"]), "key_prob": prob, "key_prob_exact": exact,
                         "tops": tops, "sampled": sampled,
                         "sampled_correct": sum(passkey_correct(t, p["key"]) for t in sampled),
                         "seconds": time.perf_counter() - t0})
            shown = {k: v for k, v in rows[-1].items() if k not in ("sampled", "tops")}
            print(config or "stock", json.dumps(shown), flush=True)
    return {"startup_s": startup, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--config", action="append", help="a sparse plan (repeatable; default: configs/gemma-3.yaml)")
    ap.add_argument("--lengths", default="11264,14336")
    ap.add_argument("--depths", default="0.25,0.5,0.75")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--seed", type=int, default=2812)
    ap.add_argument("--serve-args", default="--kv-cache-memory-bytes 2147483648",
                    help="more `vllm serve` arguments (default: a 2 GiB KV cache, as on a CPU host)")
    ap.add_argument("--out", default="passkey_server.json")
    args = ap.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))
    prompts = []
    for i, n in enumerate(args.lengths):
        for j, d in enumerate(float(x) for x in args.depths.split(",")):
            text, key = passkey_prompt(tok, n, d, args.seed + 100 * i + j)
            ids = tok.encode(" " + key, add_special_tokens=False).ids  # the answer's tokens as the server prints them
            prompts.append({"prompt": text, "key": key, "depth": d, "tokens": len(tok.encode(text).ids),
                            "key_tokens": [tok.decode([i]) for i in ids]})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"meta": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv}}
    configs = args.config or ["configs/gemma-3.yaml"]
    for config in [None, *configs]:
        name = Path(config).stem if config else "stock"
        result[name] = run_backend(config, args, prompts, out.with_suffix(f".{name}.log"))
        out.write_text(json.dumps(result, indent=1))
    names = ["stock", *(Path(c).stem for c in configs)]
    # Per prompt and backend: greedy right or wrong, the probability of the key's first token, sampled hits.
    print(f"\n{'tokens':>7} {'depth':>6}  " + "  ".join(f"{n[:24]:>24}" for n in names))
    for i, p in enumerate(prompts):
        cells = []
        for n in names:
            r = result[n]["rows"][i]
            prob = "<top20" if r["key_prob"] is None else f"{'' if r['key_prob_exact'] else '<'}{r['key_prob']:.3f}"
            hits = f" {r['sampled_correct']}/{args.samples}" if args.samples else ""
            cells.append(f"{('ok' if r['greedy_correct'] else 'MISS') + ' p=' + prob + hits:>24}")
        print(f"{p['tokens']:>7} {p['depth']:>6}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
