"""Quark's ``quantization_config``: the MXFP4 weight spec and the ``exclude`` list.

Only the keys every Quark version writes are relied on (dtype, qscheme, group_size,
scale_format); newer keys are carried through untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glm5conv.errors import BadInputError

MXFP4_GROUP_SIZE = 32
REGEX_PREFIX = "re:"


@dataclass(frozen=True)
class QuarkConfig:
    """The parts of a Quark quantization_config that decide how weights are stored."""

    weight_dtype: str | None
    qscheme: str | None
    group_size: int | None
    scale_format: str | None
    exclude: tuple[str, ...]

    @property
    def is_mxfp4(self) -> bool:
        return (
            self.weight_dtype == "fp4"
            and self.qscheme == "per_group"
            and self.group_size == MXFP4_GROUP_SIZE
            and self.scale_format == "e8m0"
        )

    @property
    def format_name(self) -> str:
        if self.is_mxfp4:
            return "quark MXFP4 (fp4 E2M1, per_group 32, E8M0 scales)"
        return f"quark {self.weight_dtype} {self.qscheme} group {self.group_size} scale {self.scale_format}"


def entry_matches(entry: str, module: str) -> bool:
    """The engines' rule: equal, or for ``re:`` entries ``re.match`` anchored at the start."""
    if entry.startswith(REGEX_PREFIX):
        return re.match(entry[len(REGEX_PREFIX) :], module) is not None
    return entry == module


def is_excluded(exclude: tuple[str, ...] | list[str], module: str) -> bool:
    return any(entry_matches(entry, module) for entry in exclude)


def quantization_method(config: dict[str, Any]) -> str | None:
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        return None
    method = qc.get("quant_method")
    return method if isinstance(method, str) else "unknown"


def parse_quark_config(config: dict[str, Any], path: Path) -> QuarkConfig:
    """Parse config.json's quantization_config; it must be Quark's."""
    method = quantization_method(config)
    if method is None:
        raise BadInputError(f"{path}: no quantization_config: not a Quark checkpoint")
    if method != "quark":
        raise BadInputError(f"{path}: quantization_config.quant_method is '{method}', not 'quark'")
    qc = config["quantization_config"]
    global_config = qc.get("global_quant_config")
    weight = global_config.get("weight") if isinstance(global_config, dict) else None
    if not isinstance(weight, dict):
        raise BadInputError(f"{path}: quantization_config.global_quant_config.weight is missing")
    exclude = qc.get("exclude", [])
    if not (isinstance(exclude, list) and all(isinstance(e, str) for e in exclude)):
        raise BadInputError(f"{path}: quantization_config.exclude must be a list of strings")
    for entry in exclude:
        if entry.startswith(REGEX_PREFIX):
            try:
                re.compile(entry[len(REGEX_PREFIX) :])
            except re.error as exc:
                raise BadInputError(f"{path}: exclude entry {entry!r} is not a valid regex ({exc})") from None
    group_size = weight.get("group_size")
    return QuarkConfig(
        weight_dtype=weight.get("dtype"),
        qscheme=weight.get("qscheme"),
        group_size=group_size if isinstance(group_size, int) else None,
        scale_format=weight.get("scale_format"),
        exclude=tuple(exclude),
    )
