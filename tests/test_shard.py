"""Shard header parsing (every malformation named) and header writing (readable by safetensors)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glm5conv.errors import BadInputError
from glm5conv.shard import TensorSpec, encode_header, read_header


def write_raw(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_reads_what_safetensors_writes(tmp_path: Path) -> None:
    tensors = {"b": torch.zeros(3, 4, dtype=torch.bfloat16), "a": torch.arange(5, dtype=torch.uint8)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    header = read_header(tmp_path / "x.safetensors")
    assert header.metadata == {"format": "pt"}
    assert header.tensors["b"].dtype == "BF16" and header.tensors["b"].shape == (3, 4)
    assert header.tensors["a"].nbytes == 5
    raw = (tmp_path / "x.safetensors").read_bytes()
    offset = header.file_offset("a")
    assert raw[offset : offset + 5] == bytes(range(5))


def test_encoded_header_is_read_by_safetensors(tmp_path: Path) -> None:
    specs = [TensorSpec("w", "BF16", (2, 3)), TensorSpec("s", "U8", (2, 1))]
    header = encode_header(specs, {"format": "pt", "k": "v"})
    assert len(header) % 8 == 0
    data = torch.arange(6, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes() + b"\x07\x09"
    (tmp_path / "o.safetensors").write_bytes(header + data)
    with safe_open(tmp_path / "o.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
        assert torch.equal(f.get_tensor("w"), torch.arange(6, dtype=torch.bfloat16).view(2, 3))
        assert f.get_tensor("s").tolist() == [[7], [9]]
    assert encode_header(specs, {"format": "pt", "k": "v"}) == header  # deterministic


@pytest.mark.parametrize(
    ("header", "data", "length", "message"),
    [
        (b"", b"", None, "too short|not valid JSON"),
        (
            {"t": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}},
            b"\0\0",
            None,
            r"truncated: tensor data ends at byte \d+ but the file has \d+ bytes",
        ),
        (
            {"t": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}},
            b"\0\0\0",
            None,
            "1 unused bytes after the last tensor",
        ),
        (
            {"t": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}},
            b"\0\0",
            10_000,
            "header length 10000 runs past the end of the file",
        ),
        ({"t": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0", None, "unknown dtype 'Q9'"),
        (
            {"t": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 2]}},
            b"\0\0",
            None,
            "spans 2 bytes but BF16 \\[2\\] needs 4",
        ),
        (
            {
                "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]},
            },
            b"\0\0\0",
            None,
            "tensor 'b' overlaps the previous tensor",
        ),
        (
            {"t": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}},
            b"\0\0\0",
            None,
            "tensor 't' leaves a gap before it",
        ),
        (b"[1, 2]", b"", None, "header is not a JSON object"),
        ({"__metadata__": {"a": 1}}, b"", None, "__metadata__ must map strings to strings"),
    ],
)
def test_malformed_headers_are_named(tmp_path: Path, header, data: bytes, length, message: str) -> None:
    path = write_raw(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(BadInputError, match=message) as info:
        read_header(path)
    assert str(path) in str(info.value)


def test_duplicate_tensor_names_in_one_header(tmp_path: Path) -> None:
    raw = b'{"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "t": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}'
    path = write_raw(tmp_path / "dup.safetensors", raw, b"\0\0")
    with pytest.raises(BadInputError, match="header names tensor 't' twice"):
        read_header(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="file not found"):
        read_header(tmp_path / "nope.safetensors")
