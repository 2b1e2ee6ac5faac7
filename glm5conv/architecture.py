"""What config.json says about the model: family, sizes and where the MTP layer lives."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glm5conv.errors import BadInputError

# architecture name -> family. DeepSeek-V3-style checkpoints share GLM-5's MTP layout
# (enorm/hnorm/eh_proj/shared_head + a full decoder layer), so one set of rules serves both.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "GlmMoeDsaForCausalLM": "glm5",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "DeepseekV32ForCausalLM": "deepseek_v3",
}

# Modules of the MTP layer that engines map to the draft model's top level (model.<name>),
# not into its decoder (model.decoder.<name>).
MTP_SPECIFIC_MODULES = ("eh_proj", "enorm", "hnorm", "shared_head.norm")
# Tensors the engines take from the target model instead of the MTP layer.
MTP_SKIPPED_MODULES = ("embed_tokens", "shared_head.head")


@dataclass(frozen=True)
class ModelLayout:
    """The facts about the model that the converter and the engine rules depend on."""

    architecture: str
    family: str
    hidden_size: int
    num_hidden_layers: int
    num_nextn_predict_layers: int
    n_routed_experts: int
    n_shared_experts: int
    q_lora_rank: int | None

    @property
    def mtp_layers(self) -> tuple[int, ...]:
        first = self.num_hidden_layers
        return tuple(range(first, first + self.num_nextn_predict_layers))

    @property
    def mtp_layer(self) -> int:
        """The MTP layer engines load (all of them support exactly one)."""
        return self.mtp_layers[0]

    def mtp_prefix(self, layer: int | None = None) -> str:
        return f"model.layers.{self.mtp_layer if layer is None else layer}."


def _int_field(config: dict[str, Any], key: str, path: Path, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadInputError(f"{path}: '{key}' must be a non-negative integer, found {value!r}")
    return value


def model_layout(config: dict[str, Any], path: Path) -> ModelLayout:
    """Read the layout from a parsed config.json (``path`` is only for messages)."""
    architectures = config.get("architectures")
    if not (isinstance(architectures, list) and architectures and isinstance(architectures[0], str)):
        raise BadInputError(f"{path}: 'architectures' is missing or empty")
    architecture = architectures[0]
    family = SUPPORTED_ARCHITECTURES.get(architecture)
    if family is None:
        supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        raise BadInputError(f"{path}: unsupported architecture '{architecture}' (supported: {supported})")
    nextn = _int_field(config, "num_nextn_predict_layers", path, default=0)
    if nextn == 0:
        raise BadInputError(f"{path}: num_nextn_predict_layers is 0 or missing: the model has no MTP layer")
    q_lora_rank = config.get("q_lora_rank")
    return ModelLayout(
        architecture=architecture,
        family=family,
        hidden_size=_int_field(config, "hidden_size", path),
        num_hidden_layers=_int_field(config, "num_hidden_layers", path),
        num_nextn_predict_layers=nextn,
        n_routed_experts=_int_field(config, "n_routed_experts", path, default=0),
        n_shared_experts=_int_field(config, "n_shared_experts", path, default=0),
        q_lora_rank=q_lora_rank if isinstance(q_lora_rank, int) else None,
    )


def is_linear_weight(tensor_name: str, ndim: int) -> bool:
    """Quark's own test for 'a Linear weight it would quantize' (2-D, not a norm or embedding)."""
    module, _, param = tensor_name.rpartition(".")
    if param != "weight" or not module or ndim < 2:
        return False
    return not module.endswith("norm") and "embed" not in module
