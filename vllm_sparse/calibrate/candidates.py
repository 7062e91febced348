"""Candidate estimators x budgets for `vllm-sparse calibrate`, from the command line's short forms.

    --estimators antidiagonal:stride=8,lowbit,vertical_slash:last_q=64
    --budgets top_p=0.9,keep_ratio=0.1,top_p=0.95:share=group

Each estimator is tried with each budget. A budget item is one rule (top_p, keep_ratio or top_k) with
optional `:key=value` settings; `sink_blocks` and `local_blocks` default to 1, as in the shipped plans.
Both are validated by the config schema's own models, so a bad item fails with the schema's message.
"""

from __future__ import annotations

import yaml

DEFAULT_ESTIMATORS = "antidiagonal:stride=8,lowbit,vertical_slash"
DEFAULT_BUDGETS = ("top_p=0.5,top_p=0.7,top_p=0.8,top_p=0.9,top_p=0.95,top_p=0.98,"
                   "keep_ratio=0.05,keep_ratio=0.1,keep_ratio=0.2,keep_ratio=0.3,keep_ratio=0.5")
BUDGET_BASE = {"sink_blocks": 1, "local_blocks": 1}


def _pairs(text: str, what: str) -> dict:
    out = {}
    for item in text.split(":"):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"bad {what} setting {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def parse_estimators(text: str) -> list[dict]:
    """'antidiagonal:stride=8,lowbit' -> [{"name": "antidiagonal", "stride": 8}, {"name": "lowbit"}]."""
    from vllm_sparse.estimators.registry import get_estimator

    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, rest = item.partition(":")
        params = _pairs(rest, "estimator") if rest else {}
        try:
            est = get_estimator(name)
        except KeyError as e:
            raise ValueError(str(e).strip("'\"")) from None
        if est.keeps_all:
            raise ValueError(f"estimator {name!r} keeps every block; dense is always a candidate")
        try:
            est.params(**params)
        except Exception as e:  # pydantic's message names the parameter and what is allowed
            raise ValueError(f"estimator {item!r}: {e}") from None
        out.append({"name": name, **params})
    if not out:
        raise ValueError("no estimators")
    return out


def parse_budgets(text: str) -> list[dict]:
    """'top_p=0.9,keep_ratio=0.1:local_blocks=2' -> budget dicts (BudgetSpec fields)."""
    from vllm_sparse.config.schema import BudgetSpec

    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        budget = _pairs(item, "budget")
        for k, v in BUDGET_BASE.items():
            budget.setdefault(k, v)
        try:
            BudgetSpec(**budget)
        except Exception as e:
            raise ValueError(f"budget {item!r}: {e}") from None
        out.append(budget)
    if not out:
        raise ValueError("no budgets")
    return out


def candidates(estimators: list[dict], budgets: list[dict]) -> list[dict]:
    return [{"estimator": e, "budget": b} for e in estimators for b in budgets]


def head_plan_of(candidate: dict):
    """A candidate {"estimator": {"name": ..., params}, "budget": {...}} as the HeadPlan a plan would give it
    (its params and budget through their models: the schema's checks and defaults)."""
    from vllm_sparse.config.plan import HeadPlan
    from vllm_sparse.config.schema import BudgetSpec
    from vllm_sparse.estimators.registry import get_estimator
    from vllm_sparse.selection.budget import Budget

    args = dict(candidate["estimator"])
    name = args.pop("name")
    return HeadPlan(name, get_estimator(name).params(**args), Budget(**BudgetSpec(**candidate["budget"]).model_dump()))


def check_candidates(cands: list[dict], block_size: int) -> None:
    """Every candidate runs as written at the plan's block size (a stride that does not divide it, ...), checked
    before the engine starts, as a plan's heads are (`plan.head_plan_problem`): not one of them mid-sweep."""
    from vllm_sparse.config.plan import head_plan_problem

    for c in cands:
        problem = head_plan_problem(head_plan_of(c), block_size)
        if problem:
            raise ValueError(f"candidate {label(c)}: {problem[1]}")


def label(candidate: dict) -> str:
    """A short name: 'antidiagonal(stride=8) top_p=0.9'."""
    est = dict(candidate["estimator"])
    name = est.pop("name")
    args = ",".join(f"{k}={v}" for k, v in est.items())
    budget = " ".join(f"{k}={v}" for k, v in candidate["budget"].items() if BUDGET_BASE.get(k) != v)
    return f"{name}({args}) {budget}" if args else f"{name} {budget}"
