"""Bad input: one line naming the file and the problem, exit 2, no traceback, nothing left behind."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from glm5conv.convert import convert
from glm5conv.plan import ConvertOptions
from tests.helpers import edit_shard, index_of, run_cli, run_cli_process, set_config, tree_hashes

S1, S2, S3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
EH = "model.layers.2.eh_proj"


def remove_config(src: Path) -> None:
    (src / "config.json").unlink()


def invalid_config(src: Path) -> None:
    (src / "config.json").write_text('{"architectures": [\n')


def no_quantization(src: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    (src / "config.json").write_text(json.dumps(config))


def fp8_quantization(src: Path) -> None:
    set_config(src, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})


def truncated_shard(src: Path) -> None:
    data = (src / S3).read_bytes()
    (src / S3).write_bytes(data[:-100])


def header_past_end(src: Path) -> None:
    data = bytearray((src / S1).read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 4)
    (src / S1).write_bytes(bytes(data))


def missing_shard(src: Path) -> None:
    index = index_of(src)
    index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


def path_outside(src: Path) -> None:
    index = index_of(src)
    index["weight_map"]["model.norm.weight"] = "../model-00002-of-00003.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


def duplicate_tensor(src: Path) -> None:
    scale = torch.zeros(64, 4, dtype=torch.uint8)
    edit_shard(src, S1, **{f"{EH}__weight_scale": scale})  # now in shard 1 and shard 3


def wrong_eh_proj_shape(src: Path) -> None:
    edit_shard(src, S2, **{f"{EH}__weight": torch.zeros(64, 32, dtype=torch.uint8)})
    edit_shard(src, S3, **{f"{EH}__weight_scale": torch.full((64, 2), 127, dtype=torch.uint8)})


def wrong_scale_shape(src: Path) -> None:
    edit_shard(src, S3, **{f"{EH}__weight_scale": torch.full((64, 3), 127, dtype=torch.uint8)})


def in_features_not_multiple_of_32(src: Path) -> None:
    name = "model.layers.2.mlp.experts.0.down_proj"
    edit_shard(src, S3, **{f"{name}__weight": torch.zeros(64, 24, dtype=torch.uint8)})
    edit_shard(src, S3, **{f"{name}__weight_scale": torch.full((64, 1), 127, dtype=torch.uint8)})


def scale_byte_255(src: Path) -> None:
    scale = torch.full((64, 4), 120, dtype=torch.uint8)
    scale[5, 2] = 255
    edit_shard(src, S3, **{f"{EH}__weight_scale": scale})


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing config.json": (remove_config, r"config.json: file not found"),
    "invalid config.json": (invalid_config, r"config.json: not valid JSON"),
    "not quantized": (no_quantization, r"config.json: no quantization_config: not a Quark checkpoint"),
    "not Quark": (fp8_quantization, r"config.json: quantization_config.quant_method is 'fp8', not 'quark'"),
    "truncated shard": (truncated_shard, rf"{S3}: truncated: tensor data ends at byte \d+ but the file has \d+ bytes"),
    "header past end": (header_past_end, rf"{S1}: header length \d+ runs past the end of the file"),
    "missing shard": (missing_shard, r"index.json: weight_map names missing shard 'model-00009-of-00009.safetensors'"),
    "path outside": (path_outside, r"index.json: weight_map path '../model-00002-of-00003.safetensors' is outside"),
    "duplicate tensor": (duplicate_tensor, rf"tensor '{EH}.weight_scale' appears in both {S1} and {S3}"),
    "eh_proj shape": (wrong_eh_proj_shape, rf"{S2}: {EH}.weight is U8 \[64, 32\], expected U8 \[64, 64\]"),
    "scale shape": (wrong_scale_shape, rf"{EH}.weight_scale is \[64, 3\], expected \[64, 4\]"),
    "in_features": (
        in_features_not_multiple_of_32,
        r"experts.0.down_proj.weight: in_features 48 is not a multiple of the MXFP4 group size 32",
    ),
    "scale 255": (scale_byte_255, rf"{S3}: {EH}.weight_scale: scale byte 255 \(NaN in E8M0\) at row 5, group 2"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_source(case: str, tmp_path: Path, src: Path, capsys) -> None:
    corrupt, message = CASES[case]
    corrupt(src)
    before = tree_hashes(src)
    dst = tmp_path / "out"
    code, out, err = run_cli(["convert", src, dst], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("glm5conv: error: ")
    assert pytest.importorskip("re").search(message, err), err
    assert "Traceback" not in err and out == ""
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no partial output either
    assert tree_hashes(src) == before


def test_inspect_reports_bad_input_the_same_way(tmp_path: Path, src: Path, capsys) -> None:
    truncated_shard(src)
    code, out, err = run_cli(["inspect", src, "--json"], capsys)
    assert code == 2 and "truncated" in err
    assert json.loads(out) == {"ok": False, "error": err.strip().removeprefix("glm5conv: error: "), "exit_code": 2}


def test_dst_inside_src(src: Path, capsys) -> None:
    code, _, err = run_cli(["convert", src, src / "out"], capsys)
    assert code == 2 and "DST is inside SRC" in err and not (src / "out").exists()


def test_dst_not_empty_without_force(tmp_path: Path, src: Path, capsys) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    code, _, err = run_cli(["convert", src, dst], capsys)
    assert code == 2 and f"{dst}: not empty (use --force to replace it)" in err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_failure_during_writing_leaves_nothing(tmp_path: Path, bundled: Path) -> None:
    """A NaN found while quantizing (after writing has started) removes the partial output."""
    bf16 = tmp_path / "bf16"
    convert(bundled, bf16, ConvertOptions(to="bf16", scope="mtp"))
    weight = torch.zeros(32, 64, dtype=torch.bfloat16)
    weight[3, 7] = float("nan")
    edit_shard(bf16, S3, **{"model.layers.2.mlp.experts.5.up_proj__weight": weight})
    (bf16 / "glm5conv-manifest.json").unlink()
    with pytest.raises(Exception, match="experts.5.up_proj.weight: row 3, group 0 holds a NaN"):
        convert(bf16, tmp_path / "fp4", ConvertOptions(to="mxfp4", scope="mtp"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16"]


def test_real_process_exit_code_and_no_traceback(tmp_path: Path, src: Path) -> None:
    scale_byte_255(src)
    proc = run_cli_process(["convert", src, tmp_path / "out", "--json"])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert json.loads(proc.stdout)["exit_code"] == 2
    usage = run_cli_process(["convert", src, tmp_path / "out", "--to", "fp8"])
    assert usage.returncode == 2 and "--to must be one of bf16, mxfp4" in usage.stderr
