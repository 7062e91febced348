"""Base model for everything read from a config (the config schema, each estimator's parameters):
frozen, and unknown keys name the allowed ones. Shared by `config/` and `estimators/`, which import
nothing from each other's direction but estimators -> this module."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class StrictModel(BaseModel):
    # strict: a string or a bool is not taken for a number ("8", true), nor a number for a bool; no NaN or inf.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        # pydantic's own 'extra_forbidden' error does not say what is allowed; this one does.
        if isinstance(data, dict):
            allowed = set(cls.model_fields)
            unknown = [k for k in data if k not in allowed]
            if unknown:
                raise ValueError(
                    f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}"
                )
        return data
