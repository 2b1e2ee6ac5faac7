"""The checkpoint reader: headers, index, reads by row block, file listing."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from glm5conv.checkpoint import checkpoint_files, dump_json, json_style, open_checkpoint


def test_opens_the_bundled_checkpoint(bundled: Path) -> None:
    with open_checkpoint(bundled) as ckpt:
        assert ckpt.is_sharded and len(ckpt.shards) == 3
        assert ckpt.layout.mtp_layer == 2 and ckpt.layout.hidden_size == 64
        name = "model.layers.2.mlp.experts.3.down_proj.weight"
        full = ckpt.read_tensor(name)
        with safe_open(bundled / ckpt.shard_of(name), "pt") as f:
            assert torch.equal(full, f.get_tensor(name))
        assert torch.equal(ckpt.read_tensor(name, (5, 9)), full[5:9])
        assert ckpt.file_bytes_total() == sum((bundled / s).stat().st_size for s in ckpt.shards)


def test_file_listing_skips_tool_caches(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("b")
    (tmp_path / ".cache" / "huggingface").mkdir(parents=True)
    (tmp_path / ".cache" / "huggingface" / "x.lock").write_text("")
    assert checkpoint_files(tmp_path) == ["a.json", "sub/b.txt"]


def test_json_style_round_trip(tmp_path: Path) -> None:
    for indent, newline in ((4, False), (2, True), (None, False)):
        path = tmp_path / "x.json"
        path.write_bytes(dump_json({"a": {"b": 1}}, (indent, newline)))
        assert json_style(path) == (indent, newline)
