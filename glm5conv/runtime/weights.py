"""Loading a checkpoint's tensors into the runtime model: bf16 as stored, MXFP4 through the codec."""

from __future__ import annotations

import re

import torch

from glm5conv import codec
from glm5conv.checkpoint import Checkpoint
from glm5conv.errors import BadInputError
from glm5conv.runtime.config import ModelArgs
from glm5conv.runtime.model import GLM5

_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
# kept in float32 whatever the compute dtype, as transformers does (router and indexer weights)
FP32_PARAMS = ("gate_weight", "e_score_correction_bias", "weights_proj.weight")


def _module_path(name: str, args: ModelArgs) -> str | None:
    """Checkpoint tensor name -> runtime parameter name (None: not used by the runtime)."""
    if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        return name.removeprefix("model.")
    m = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
    if not m:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    rest = rest.replace("mlp.gate.weight", "mlp.gate_weight").replace(
        "mlp.gate.e_score_correction_bias", "mlp.e_score_correction_bias"
    )
    if layer < args.num_hidden_layers:
        return f"layers.{layer}.{rest}"
    if layer != args.mtp_layer or args.num_nextn_predict_layers == 0:
        return None
    if rest.startswith(("embed_tokens.", "shared_head.head.")):
        return None  # engines take these from the main model
    if rest == "shared_head.norm.weight":
        return "mtp.shared_head_norm.weight"
    if rest.split(".")[0] in ("enorm", "hnorm", "eh_proj"):
        return f"mtp.{rest}"
    return f"mtp.decoder.{rest}"


def read_weight(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    """A tensor as values: MXFP4 weights (those with a ``weight_scale``) dequantized exactly to bf16."""
    scale = name + "_scale"
    if checkpoint.has(scale):
        what = f"{checkpoint.root / checkpoint.shard_of(name)}: {name}"
        return codec.decode(
            checkpoint.read_tensor(name).view(torch.uint8), checkpoint.read_tensor(scale).view(torch.uint8), what
        )
    return checkpoint.read_tensor(name)


def load_weights(model: GLM5, checkpoint: Checkpoint, dtype: torch.dtype) -> None:
    args = model.args
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    filled: set[str] = set()
    for name in checkpoint.weight_map:
        if name.endswith("_scale"):
            continue
        path = _module_path(name, args)
        if path is None:
            continue
        value = read_weight(checkpoint, name)
        expert = _EXPERT.search(path)
        if expert:
            index, kind = int(expert.group(1)), expert.group(2)
            path = path[: expert.start()] + f"mlp.w_{kind}"
            target = params[path].data[index]
            key = f"{path}[{index}]"
        elif path in params:
            target = params[path].data
            key = path
        else:
            raise BadInputError(f"{checkpoint.root}: tensor '{name}' has no place in the GLM-5 runtime model")
        if tuple(target.shape) != tuple(value.shape):
            raise BadInputError(f"{name}: shape {list(value.shape)} does not fit the model's {list(target.shape)}")
        target.copy_(value.to(target.dtype))
        filled.add(key)
    expected = set()
    for path, tensor in params.items():
        if path.startswith(("caches.", "rope_", "arange")):
            continue
        if re.search(r"mlp\.w_(gate|up|down)$", path):
            expected |= {f"{path}[{i}]" for i in range(tensor.shape[0])}
        else:
            expected.add(path)
    missing = sorted(expected - filled)
    if missing:
        raise BadInputError(
            f"{checkpoint.root}: no tensor for '{missing[0]}' ({len(missing)} runtime parameters missing)"
        )


def build_model(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> GLM5:
    args = ModelArgs.from_config(checkpoint.config)
    with torch.device("meta"):
        model = GLM5(args)
    model = model.to_empty(device=device)
    for name, param in model.named_parameters():
        param.requires_grad_(False)
        param.data = param.data.to(torch.float32 if name.endswith(FP32_PARAMS) else dtype)
    for name, buffer in model.named_buffers():
        if name.endswith(FP32_PARAMS):
            buffer.data = buffer.data.to(torch.float32)
    load_weights(model, checkpoint, dtype)
    return model.eval()


def checkpoint_tensors(model: GLM5) -> dict[str, torch.Tensor]:
    """The model's weights under GLM-5's checkpoint names (per-expert linears, MTP as layer N).

    The inverse of ``load_weights``; used to save a trained model as a checkpoint.
    """
    args = model.args
    out: dict[str, torch.Tensor] = {}

    def layer(prefix: str, module: torch.nn.Module) -> None:
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            m = re.fullmatch(r"mlp\.w_(gate|up|down)", name)
            if m:
                for e in range(tensor.shape[0]):
                    out[f"{prefix}mlp.experts.{e}.{m.group(1)}_proj.weight"] = tensor[e]
                continue
            name = name.replace("mlp.gate_weight", "mlp.gate.weight").replace(
                "mlp.e_score_correction_bias", "mlp.gate.e_score_correction_bias"
            )
            out[prefix + name] = tensor

    out["model.embed_tokens.weight"] = model.embed_tokens.weight
    for i, decoder in enumerate(model.layers):
        layer(f"model.layers.{i}.", decoder)
    out["model.norm.weight"] = model.norm.weight
    out["lm_head.weight"] = model.lm_head.weight
    if model.mtp is not None:
        prefix = f"model.layers.{args.mtp_layer}."
        for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
            out[prefix + name] = model.mtp.get_parameter(name)
        out[prefix + "shared_head.norm.weight"] = model.mtp.shared_head_norm.weight
        layer(prefix, model.mtp.decoder)
    return {k: v.detach().contiguous() for k, v in out.items()}
