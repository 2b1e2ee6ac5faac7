"""The plan is decided from metadata alone and is exactly what the writer produces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glm5conv.checkpoint import open_checkpoint
from glm5conv.errors import UsageError
from glm5conv.mtp import layer_storage
from glm5conv.plan import ConvertOptions, plan_conversion, reconcile_exclude
from glm5conv.writer import write_output
from tests.helpers import index_of, set_config

S2, S3 = "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"


def test_eh_proj_plan(bundled: Path) -> None:
    with open_checkpoint(bundled) as ckpt:
        plan = plan_conversion(ckpt, ConvertOptions())
    [change] = plan.changes
    assert (change.module, change.action, change.after) == ("model.layers.2.eh_proj", "dequantize", "BF16 [64, 128]")
    assert plan.rewritten_files == [S2, S3]
    shard2 = next(s for s in plan.shards if s.name == S2)
    eh = next(t for t in shard2.tensors if t.name == "model.layers.2.eh_proj.weight")
    assert eh.source == ("decode", "model.layers.2.eh_proj.weight", "model.layers.2.eh_proj.weight_scale")
    shard3 = next(s for s in plan.shards if s.name == S3)
    assert all(t.name != "model.layers.2.eh_proj.weight_scale" for t in shard3.tensors)
    assert "model.layers.2.eh_proj.weight_scale" not in plan.weight_map
    assert plan.total_size_convention == "file-size"
    assert plan.untouched_files == ["model-00001-of-00003.safetensors"]
    assert [v.status for v in plan.verdicts_after] == ["loads"] * 5


def test_planned_sizes_are_what_gets_written(tmp_path: Path, bundled: Path) -> None:
    with open_checkpoint(bundled) as ckpt:
        plan = plan_conversion(ckpt, ConvertOptions(scope="mtp"))
        write_output(plan, tmp_path / "out")
    for shard in plan.shards:
        assert (tmp_path / "out" / shard.name).stat().st_size == shard.file_size
    assert index_of(tmp_path / "out")["metadata"]["total_size"] == plan.total_size()


def test_options_are_checked() -> None:
    with pytest.raises(UsageError, match="--scope must be one of eh-proj, mtp"):
        ConvertOptions(scope="layer")


def test_bare_layer_entry_removed_while_experts_stay_fp4(src: Path) -> None:
    """A bare 'model.layers.2' makes SGLang 0.5.11-0.5.15 build everything bf16: wrong for FP4 experts."""
    config = json.loads((src / "config.json").read_text())
    exclude = config["quantization_config"]["exclude"] + ["model.layers.2"]
    set_config(src, quantization_config={**config["quantization_config"], "exclude": exclude})
    with open_checkpoint(src) as ckpt:
        plan = plan_conversion(ckpt, ConvertOptions())
    assert plan.exclude_removed == ["model.layers.2"]
    assert {v.engine.key: v.status for v in plan.verdicts_before}["sglang-0.5.11"] == "fails"


def test_names_already_covered_by_a_regex_are_not_added(bundled: Path) -> None:
    with open_checkpoint(bundled) as ckpt:
        storage = layer_storage(ckpt)
        regex = r"re:model\.decoder\.self_attn\..*"
        new, added, removed, rewritten = reconcile_exclude(ckpt, (regex,), storage)
    assert regex in new and not removed and not rewritten
    assert "model.decoder.self_attn.o_proj" not in added
    assert "model.layers.2.self_attn.o_proj" in added and "model.decoder.mlp.shared_experts.gate_up_proj" in added


def test_noop_when_already_converted(tmp_path: Path, bundled: Path) -> None:
    with open_checkpoint(bundled) as ckpt:
        write_output(plan_conversion(ckpt, ConvertOptions()), tmp_path / "out")
    with open_checkpoint(tmp_path / "out") as ckpt:
        plan = plan_conversion(ckpt, ConvertOptions())
    assert plan.is_noop and not plan.shards and not plan.config_changed
