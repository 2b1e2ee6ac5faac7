"""verify: every check can fail, and says which file and what."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glm5conv.convert import convert
from glm5conv.plan import ConvertOptions
from glm5conv.verify import verify_checkpoint
from glm5conv.writer import JOURNAL_NAME, WriteOptions
from tests.helpers import edit_shard, index_of, run_cli

S2 = "model-00002-of-00003.safetensors"


@pytest.fixture
def converted(tmp_path: Path, bundled: Path) -> Path:
    dst = tmp_path / "out"
    convert(bundled, dst, ConvertOptions(), write=WriteOptions(copy=True))
    return dst


def failed(report) -> dict[str, str]:
    return {c.name: c.detail for c in report.checks if not c.ok}


def test_clean_conversion_passes(converted: Path, bundled: Path, capsys) -> None:
    code, out, _ = run_cli(["verify", converted, "--against", bundled, "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["ok"] is True
    assert {c["name"] for c in doc["checks"]} == {
        "state",
        "structure",
        "total_size",
        "mtp-shapes",
        "engines",
        "manifest",
        "against-source",
    }
    assert {e["status"] for e in doc["engines"]} == {"loads"}


def test_tampered_bytes_fail_the_manifest_and_the_comparison(converted: Path, bundled: Path) -> None:
    path = converted / S2
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # a bit of the last tensor's data
    path.write_bytes(bytes(data))
    report = verify_checkpoint(converted, against=bundled)
    assert not report.ok
    assert failed(report)["manifest"] == f"{path}: sha256 differs from the manifest"
    assert "from the source" in failed(report)["against-source"]


def test_converted_values_are_checked_against_the_source(converted: Path, bundled: Path) -> None:
    eh = torch.zeros(64, 128, dtype=torch.bfloat16)
    edit_shard(converted, S2, **{"model.layers.2.eh_proj__weight": eh})
    index = index_of(converted)
    (converted / "glm5conv-manifest.json").unlink()
    report = verify_checkpoint(converted, against=bundled)
    assert "differ from the source's dequantized values" in failed(report)["against-source"]
    assert index["metadata"]["total_size"] > 0


def test_wrong_total_size(converted: Path) -> None:
    index = index_of(converted)
    index["metadata"]["total_size"] += 1
    (converted / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    report = verify_checkpoint(converted)
    assert "total_size is" in failed(report)["total_size"]
    assert "model.safetensors.index.json" in failed(report)["manifest"]


def test_unconverted_checkpoint_fails_the_engines_it_does_not_load_on(bundled: Path, capsys) -> None:
    code, out, _ = run_cli(["verify", bundled, "--json"], capsys)
    doc = json.loads(out)
    assert code == 1
    engines_check = next(c for c in doc["checks"] if c["name"] == "engines")
    assert not engines_check["ok"] and "plain Linear" in engines_check["detail"]
    code, _, _ = run_cli(["verify", bundled, "--engine", "sglang-0.5.16", "--engine", "sglang-0.5.23"], capsys)
    assert code == 0


def test_unknown_engine_is_a_usage_error(bundled: Path, capsys) -> None:
    code, _, err = run_cli(["verify", bundled, "--engine", "sglang-9"], capsys)
    assert code == 2 and "unknown engine" in err


def test_incomplete_conversion_is_rejected(converted: Path, capsys) -> None:
    (converted / JOURNAL_NAME).write_text('{"phase": "writing", "files": {}}')
    code, out, _ = run_cli(["verify", converted], capsys)
    assert code == 1 and "incomplete" in out


def test_structure_errors_are_verification_failures(converted: Path, capsys) -> None:
    data = (converted / S2).read_bytes()
    (converted / S2).write_bytes(data[:-10])
    code, out, _ = run_cli(["verify", converted], capsys)
    assert code == 1 and "truncated" in out


def test_extra_file_not_in_manifest(converted: Path) -> None:
    (converted / "stray.bin").write_bytes(b"x")
    assert failed(verify_checkpoint(converted))["manifest"].endswith("stray.bin: not listed in the manifest")


def test_mxfp4_conversion_requires_only_quark_aware_engines(tmp_path: Path, bundled: Path) -> None:
    dst = tmp_path / "fp4"
    convert(bundled, dst, ConvertOptions(to="mxfp4"))
    report = verify_checkpoint(dst)
    assert report.ok
    assert set(report.engines) == {"sglang-0.5.11", "sglang-0.5.16", "sglang-0.5.23"}
    assert {v.engine.key: v.status for v in report.verdicts}["vllm-0.33"] == "fails"
