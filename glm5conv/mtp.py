"""The MTP layer as a checkpoint stores it: its Linear modules, MXFP4 or float, validated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from glm5conv.architecture import MTP_SKIPPED_MODULES, is_linear_weight
from glm5conv.checkpoint import Checkpoint
from glm5conv.codec import GROUP_SIZE
from glm5conv.errors import BadInputError

MXFP4 = "mxfp4"
FLOAT = "float"
FLOAT_DTYPES = ("BF16", "F16", "F32")
ROUTED_EXPERT_MARK = "mlp.experts."


@dataclass(frozen=True)
class ModuleStorage:
    """How the checkpoint stores one Linear of the MTP layer (name relative to the layer)."""

    module: str
    kind: str  # MXFP4 (uint8 weight + weight_scale) or FLOAT (bf16/fp16/fp32 weight)
    dtype: str
    shape: tuple[int, ...]

    @property
    def logical_shape(self) -> tuple[int, int]:
        out, stored_in = self.shape
        return (out, stored_in * 2) if self.kind == MXFP4 else (out, stored_in)

    def describe(self) -> str:
        if self.kind == MXFP4:
            return f"MXFP4 U8 {list(self.shape)} + weight_scale"
        return f"{self.dtype} {list(self.shape)}"


def mtp_storage(tensors: Mapping[str, tuple[str, tuple[int, ...]]], prefix: str) -> dict[str, ModuleStorage]:
    """The Linear modules under ``prefix`` from tensor name -> (dtype, shape)."""
    modules: dict[str, ModuleStorage] = {}
    for name, (dtype, shape) in tensors.items():
        if not name.startswith(prefix) or not is_linear_weight(name, len(shape)):
            continue
        module = name[len(prefix) : -len(".weight")]
        if module in MTP_SKIPPED_MODULES:
            continue
        quantized = dtype in ("U8", "I8") and (name + "_scale") in tensors
        modules[module] = ModuleStorage(module, MXFP4 if quantized else FLOAT, dtype, tuple(shape))
    return dict(sorted(modules.items()))


def layer_storage(checkpoint: Checkpoint) -> dict[str, ModuleStorage]:
    """The MTP layer's Linear modules as this checkpoint stores them."""
    prefix = checkpoint.layout.mtp_prefix()
    tensors = {n: (checkpoint.entry(n).dtype, checkpoint.entry(n).shape) for n in checkpoint.names_with_prefix(prefix)}
    return mtp_storage(tensors, prefix)


def validate_storage(checkpoint: Checkpoint, storage: dict[str, ModuleStorage]) -> None:
    """Shapes of the MTP Linears must be coherent before anything is planned or trusted."""
    prefix = checkpoint.layout.mtp_prefix()
    hidden = checkpoint.layout.hidden_size
    for module, stored in storage.items():
        name = f"{prefix}{module}.weight"
        where = f"{checkpoint.root / checkpoint.shard_of(name)}: {name}"
        if stored.kind == MXFP4:
            scale = checkpoint.entry(name + "_scale")
            out, half = stored.shape
            if scale.dtype not in ("U8", "F8_E8M0"):
                raise BadInputError(f"{where}_scale is {scale.dtype}, expected U8 (E8M0 bytes)")
            if (2 * half) % GROUP_SIZE:
                raise BadInputError(
                    f"{where}: in_features {2 * half} is not a multiple of the MXFP4 group size {GROUP_SIZE}"
                )
            if tuple(scale.shape) != (out, 2 * half // GROUP_SIZE):
                raise BadInputError(
                    f"{where}_scale is {list(scale.shape)}, expected [{out}, {2 * half // GROUP_SIZE}] for weight {list(stored.shape)}"
                )
        elif stored.dtype not in FLOAT_DTYPES:
            raise BadInputError(f"{where} is {stored.dtype} without a weight_scale: neither MXFP4 nor float")
        if module == "eh_proj":
            expected = {MXFP4: (hidden, hidden), FLOAT: (hidden, 2 * hidden)}[stored.kind]
            if stored.shape != expected:
                form = (
                    f"U8 {list(expected)} (FP4-packed) + scale"
                    if stored.kind == MXFP4
                    else f"{stored.dtype} {list(expected)}"
                )
                raise BadInputError(
                    f"{where} is {stored.dtype} {list(stored.shape)}, expected {form} for hidden_size {hidden}"
                )
