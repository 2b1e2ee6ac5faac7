"""inspect on the bundled checkpoint, a DeepSeek-V3-style one and an unquantized one."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from glm5conv.bundled import bundled_path
from glm5conv.inspection import inspect_checkpoint
from tests.helpers import load_shard, run_cli, set_config


def test_bundled(bundled: Path, capsys) -> None:
    code, out, _ = run_cli(["inspect", "bundled:", "--json"], capsys)
    doc = json.loads(out)
    assert code == 0
    assert (doc["architecture"], doc["num_hidden_layers"], doc["mtp_layer"], doc["hidden_size"]) == (
        "GlmMoeDsaForCausalLM",
        2,
        2,
        64,
    )
    assert doc["quantization"].startswith("quark MXFP4")
    tensors = {t["name"]: t for t in doc["mtp_tensors"]}
    eh = tensors["model.layers.2.eh_proj.weight"]
    assert (eh["dtype"], eh["shape"], eh["shard"]) == ("U8", [64, 64], "model-00002-of-00003.safetensors")
    assert tensors["model.layers.2.eh_proj.weight_scale"]["shard"] == "model-00003-of-00003.safetensors"
    assert tensors["model.layers.2.self_attn.o_proj.weight"]["excluded_by"] == ["model.layers.2.self_attn.o_proj"]
    status = {e["engine"]: e["status"] for e in doc["engines"]}
    assert status == {
        "sglang-0.5.10": "fails",
        "sglang-0.5.11": "fails",
        "sglang-0.5.16": "loads",
        "sglang-0.5.23": "loads",
        "vllm-0.33": "fails",
    }
    code, out, _ = run_cli(["inspect", bundled], capsys)
    assert code == 0 and "Attempted to load weight (torch.Size([64, 64])) into parameter (torch.Size([64, 128]))" in out


def make_deepseek_v3(tmp_path: Path) -> Path:
    """A DeepseekV3ForCausalLM checkpoint: 61 layers, MTP layer 61 (only that layer is stored here)."""
    bundled = bundled_path()
    ckpt = tmp_path / "dsv3"
    ckpt.mkdir()
    tensors = {}
    for shard in ("model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"):
        for name, tensor in load_shard(bundled / shard)[0].items():
            if name.startswith("model.layers.2."):
                tensors[name.replace("model.layers.2.", "model.layers.61.")] = tensor
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((bundled / "config.json").read_text())
    config["quantization_config"]["exclude"] = [
        e.replace("model.layers.2.", "model.layers.61.") for e in config["quantization_config"]["exclude"]
    ]
    (ckpt / "config.json").write_text(json.dumps(config))
    set_config(ckpt, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", num_hidden_layers=61)
    return ckpt


def test_deepseek_v3_layer_61(tmp_path: Path) -> None:
    ckpt = make_deepseek_v3(tmp_path)
    report = inspect_checkpoint(ckpt)
    assert report.family == "deepseek_v3" and report.mtp_layer == 61
    assert any(t.name == "model.layers.61.eh_proj.weight" for t in report.tensors)
    status = {v.engine.key: v.status for v in report.verdicts}
    # SGLang maps model.layers.61 onto the draft's decoder for DeepSeek, so its excludes work on 0.5.11
    assert status["sglang-0.5.11"] == "loads" and status["sglang-0.5.10"] == "fails"


def test_unquantized_checkpoint(tmp_path: Path, bundled: Path) -> None:
    ckpt = tmp_path / "plain"
    ckpt.mkdir()
    tensors = {
        k: v
        for k, v in load_shard(bundled / "model-00002-of-00003.safetensors")[0].items()
        if v.dtype.is_floating_point
    }
    tensors["model.layers.2.eh_proj.weight"] = __import__("torch").zeros(64, 128).bfloat16()
    save_file(tensors, ckpt / "model.safetensors")
    config = json.loads((bundled / "config.json").read_text())
    del config["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(config))
    report = inspect_checkpoint(ckpt)
    assert report.quantization == "none (unquantized)"
    assert {v.status for v in report.verdicts} == {"loads"}
