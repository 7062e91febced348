"""The YAML `vllm-sparse calibrate` writes: a config file of the usual schema, one rule per calibrated layer
(head rules per KV head's group where the groups differ), each with its measured recall and kept density
in a comment, and a header saying what was measured, how, and on what."""

from __future__ import annotations

import textwrap

import yaml

from vllm_sparse.calibrate.candidates import label
from vllm_sparse.calibrate.choose import GroupChoice, LayerChoice, LayerTable


def _flow(d: dict) -> str:
    return yaml.safe_dump(d, default_flow_style=True, sort_keys=False, width=1 << 16).strip()


def _quoted(text: str) -> str:
    return yaml.safe_dump(text, default_style='"', width=1 << 16).strip()


def _figures(recall: tuple[float, ...] | list[float], density: float) -> str:
    return f"recall {sum(recall) / len(recall):.3f} mean, {min(recall):.3f} lowest q head; kept {density:.1%}"


def _verified(v: LayerTable | None, heads: range | None = None, group: int | None = None) -> str:
    if v is None:
        return ""
    recall = v.recall[0] if heads is None else [v.recall[0][h] for h in heads]
    density = sum(v.density[0]) / len(v.density[0]) if group is None else v.density[0][group]
    return f" | verified: {_figures(recall, density)}"


def _rule_body(group: GroupChoice, candidates: list[dict], indent: str) -> list[str]:
    if group.candidate is None:
        return [f"{indent}dense: true"]
    c = candidates[group.candidate]
    return [f"{indent}estimator: {_flow(c['estimator'])}", f"{indent}budget: {_flow(c['budget'])}"]


def layer_rule(choice: LayerChoice, candidates: list[dict], verified: LayerTable | None) -> list[str]:
    """The lines of one layer's rule, with its figures in comments."""
    out = []
    if choice.dense:
        out.append(f"      # layer {choice.layer}: dense: {choice.why_dense or 'no candidate reaches the target'}")
        return out + [f"      - layers: {choice.layer}", "        dense: true"]
    if not choice.per_group:
        g = choice.groups[0]
        out.append(f"      # layer {choice.layer}: {label(candidates[g.candidate])}: "
                   f"{_figures(choice.recall, choice.density)}{_verified(verified)}")
        return out + [f"      - layers: {choice.layer}"] + _rule_body(g, candidates, "        ")
    out.append(f"      # layer {choice.layer}: per KV head (their q heads need different budgets): "
               f"{_figures(choice.recall, choice.density)}{_verified(verified)}")
    first = next(g for g in choice.groups if g.candidate is not None)
    out += [f"      - layers: {choice.layer}"] + _rule_body(first, candidates, "        ") + ["        heads:"]
    per = len(choice.groups[0].recall)
    for k, g in enumerate(choice.groups):
        heads = range(k * per, (k + 1) * per)
        what = label(candidates[g.candidate]) if g.candidate is not None else "dense"
        out.append(f"          # KV head {k} (q heads {heads.start}-{heads.stop - 1}): {what}: "
                   f"{_figures(g.recall, g.density)}{_verified(verified, heads, k)}")
        sel = f"{heads.start}-{heads.stop - 1}" if per > 1 else str(heads.start)
        out.append(f"          - heads: {_quoted(sel)}")
        out += _rule_body(g, candidates, "            ")
    return out


def render_plan(header: list[str], match_names: list[str], provenance: dict, settings: dict,
                choices: list[LayerChoice], candidates: list[dict],
                verified: dict[int, LayerTable] | None = None) -> str:
    lines = [f"# {part}" for h in header for part in (textwrap.wrap(
        h, 112, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False) or [""])]
    lines = [line.rstrip() for line in lines]
    lines += ["version: 1", "models:", "  - match:", f"      names: {_flow(match_names)}", "    provenance:",
              f"      kind: {provenance['kind']}", f"      source: {_quoted(provenance['source'])}",
              f"      command: {_quoted(provenance['command'])}"]
    lines += [f"    {k}: {'null' if v is None else v}" for k, v in settings.items()]
    lines.append("    layers:")
    for choice in choices:
        lines += layer_rule(choice, candidates, (verified or {}).get(choice.layer))
    return "\n".join(lines) + "\n"
