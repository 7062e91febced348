"""Read a YAML config file into the validated schema; every failure is a SparseConfigError."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from vllm_sparse.config.errors import SparseConfigError, format_loc
from vllm_sparse.config.schema import config_file_model
from vllm_sparse.estimators.registry import estimator_names


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one silently:
    a second `layers:` would drop the first rule without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # (yaml's own error names it)
                break
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first at line {seen[key] + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_text(path: str | Path) -> str:
    """A config-stage input file's text; an unreadable one is a SparseConfigError naming it."""
    try:
        return Path(path).read_text()
    except OSError as e:
        raise SparseConfigError(str(path), [("", f"cannot read the file: {e.strerror or e}")]) from None


def load_config(path: str | Path):
    source = str(path)
    text = read_text(path)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SparseConfigError(source, [("", f"YAML syntax error at {at}{problem}")]) from None
    return parse_config(data, source)


def parse_config(data, source: str):
    if not isinstance(data, dict):
        raise SparseConfigError(source, [("", f"expected a mapping with 'models', got {type(data).__name__}")])
    try:
        return config_file_model().model_validate(data)
    except ValidationError as e:
        raise SparseConfigError(source, [(_path(err), _message(err)) for err in e.errors()]) from None


def _path(err) -> str:
    # Drop pydantic's union-member tags (e.g. 'sink_local') so the path is the YAML path.
    names = set(estimator_names())
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in names))
    return format_loc(loc)


def _message(err) -> str:
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err["type"] == "union_tag_invalid":
        ctx = err.get("ctx", {})
        msg = f"unknown estimator {ctx.get('tag')!r}; allowed: {ctx.get('expected_tags')}"
    elif err["type"] == "union_tag_not_found":
        msg = "estimator needs a 'name'"
    elif err["type"] == "literal_error":
        msg = f"{msg} (got {err.get('input')!r})"
    return msg
