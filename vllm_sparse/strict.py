"""Base model for everything read from a config (the config schema, each estimator's parameters):
frozen, and unknown keys name the allowed ones. Shared by `config/` and `estimators/`, which import
nothing from each other's direction but estimators -> this module."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class StrictModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

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
