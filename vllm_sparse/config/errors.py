"""The one error type a bad sparse config raises, with the file and field it is about."""

from __future__ import annotations


class SparseConfigError(ValueError):
    """A sparse-attention config that cannot be used; the message names file, field and what is allowed."""

    def __init__(self, source: str, problems: list[tuple[str, str]], subject: str = "sparse-attention config"):
        self.source = source
        self.problems = problems
        lines = [f"vllm-sparse: invalid {subject} {source}:"]
        lines += [f"  {path or '<top level>'}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


def format_loc(loc: tuple) -> str:
    """pydantic location tuple -> 'models[0].layers[2].budget.top_k'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out
