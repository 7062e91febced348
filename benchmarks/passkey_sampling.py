"""Issue 28 item 7: how sure is a model of the pass key, dense vs sparse, and how often does a temperature-1
sample (the OpenAI API's default) answer it? The eval's 14K `passkey_depths` prompts (its seeds), vLLM's CPU
server chunking (2,048 tokens); greedy with the probability of each answer token, then 20 samples per prompt.

    python benchmarks/passkey_sampling.py MODEL_DIR configs/gemma-3.yaml dense|sparse   # -> /tmp/firsttok_LABEL.json
"""
import json
import math
import sys

from transformers import AutoTokenizer
from vllm import LLM, SamplingParams

from vllm_sparse.eval.tasks import TASKS, passkey_correct


def main():
    model, config, label = sys.argv[1], sys.argv[2], sys.argv[3]
    tok = AutoTokenizer.from_pretrained(model)
    cases = [TASKS["passkey_depths"](tok, 14336, i, i) for i in range(8)]
    kw = dict(model=model, seed=0, dtype="bfloat16", max_model_len=14848, max_num_batched_tokens=2048,
              kv_cache_memory_bytes=4 << 30)
    if label == "sparse":
        kw.update(attention_backend="sparse", additional_config={"sparse": {"config": config}})
    llm = LLM(**kw)
    prompts = [p for p, _ in cases]
    greedy = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=7, logprobs=5), use_tqdm=False)
    sampled = llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=8, n=20), use_tqdm=False)
    rows = []
    for (_, key), g, s in zip(cases, greedy, sampled, strict=True):
        out = g.outputs[0]
        # probability of each greedy token (the answer's tokens while greedy is right)
        probs = [math.exp(lp[t].logprob) for t, lp in zip(out.token_ids, out.logprobs)]
        ok = sum(passkey_correct(o.text, key) for o in s.outputs)
        rows.append(dict(key=key, greedy=out.text, greedy_ok=passkey_correct(out.text, key),
                         greedy_token_probs=[round(x, 4) for x in probs], sampled_ok=ok, sampled_n=len(s.outputs),
                         wrong=[o.text for o in s.outputs if not passkey_correct(o.text, key)][:3]))
        print(json.dumps(rows[-1]), flush=True)
    json.dump(rows, open(f"/tmp/firsttok_{label}.json", "w"), indent=1)  # noqa: SIM115


if __name__ == '__main__':
    main()
