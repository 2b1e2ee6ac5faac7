"""convert end to end on the Quark-made bundled checkpoint, checked with code nobody here wrote."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from glm5conv import codec
from glm5conv.convert import convert
from glm5conv.plan import ConvertOptions
from glm5conv.verify import verify_checkpoint
from glm5conv.writer import WriteOptions
from tests.helpers import index_of, load_shard, to_single_file, tree_hashes

MODES = [("bf16", "eh-proj"), ("bf16", "mtp"), ("mxfp4", "eh-proj"), ("mxfp4", "mtp")]
EH = "model.layers.2.eh_proj.weight"


def shards(root: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(root.glob("*.safetensors")):
        tensors.update(load_shard(path)[0])
    return tensors


@pytest.mark.parametrize(("to", "scope"), MODES)
def test_convert_then_verify_against_source(tmp_path: Path, bundled: Path, to: str, scope: str) -> None:
    dst = tmp_path / "out"
    result = convert(bundled, dst, ConvertOptions(to=to, scope=scope))
    assert result.status == "converted"
    report = verify_checkpoint(dst, against=bundled)
    assert report.ok, [c for c in report.checks if not c.ok]
    assert {c.name for c in report.checks} >= {
        "structure",
        "total_size",
        "mtp-shapes",
        "engines",
        "manifest",
        "against-source",
    }
    required = set(report.engines)
    assert all(v.status != "fails" for v in report.verdicts if v.engine.key in required)
    out = shards(dst)
    if to == "bf16":
        assert out[EH].dtype == torch.bfloat16 and out[EH].shape == (64, 128)
        assert EH + "_scale" not in out
        experts_fp4 = out["model.layers.2.mlp.experts.0.up_proj.weight"].dtype == torch.uint8
        assert experts_fp4 == (scope == "eh-proj")
    else:
        assert out[EH].dtype == torch.uint8 and out[EH].shape == (64, 64) and out[EH + "_scale"].shape == (64, 4)


def test_eh_proj_equals_quark_dequantization(tmp_path: Path, bundled: Path) -> None:
    pytest.importorskip("quark")
    from tests.test_codec import quark_dequantize

    convert(bundled, tmp_path / "out", ConvertOptions())
    source = shards(bundled)
    converted = shards(tmp_path / "out")[EH]
    reference = quark_dequantize(source[EH], source[EH + "_scale"])
    assert torch.equal(reference, converted.float())


def test_only_changed_shards_are_rewritten_and_the_rest_is_identical(tmp_path: Path, src: Path) -> None:
    (src / "tokenizer_config.json").write_text('{"model_max_length": 4096}\n')
    (src / "extra").mkdir()
    (src / "extra" / "notes.txt").write_text("kept\n")
    dst = tmp_path / "out"
    result = convert(src, dst, ConvertOptions())
    # eh_proj.weight lives in shard 2, its scale in shard 3: both rewritten, shard 1 untouched
    assert result.plan.rewritten_files == ["model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    for name in ("model-00001-of-00003.safetensors", "tokenizer_config.json", "extra/notes.txt"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()
        assert os.path.samefile(dst / name, src / name)  # same filesystem: hard link
    manifest = json.loads((dst / "glm5conv-manifest.json").read_text())
    assert manifest["files"]["model-00001-of-00003.safetensors"]["status"] == "unchanged"
    assert manifest["files"]["model-00002-of-00003.safetensors"]["status"] == "rewritten"
    assert manifest["files"]["config.json"]["status"] == "regenerated"


def test_copy_option_copies_instead_of_linking(tmp_path: Path, src: Path) -> None:
    convert(src, tmp_path / "out", ConvertOptions(), write=WriteOptions(copy=True))
    shard = "model-00001-of-00003.safetensors"
    assert not os.path.samefile(tmp_path / "out" / shard, src / shard)
    assert (tmp_path / "out" / shard).read_bytes() == (src / shard).read_bytes()


def test_source_is_never_modified(tmp_path: Path, src: Path) -> None:
    before = tree_hashes(src)
    for to, scope in MODES:
        convert(src, tmp_path / f"out-{to}-{scope}", ConvertOptions(to=to, scope=scope))
    assert tree_hashes(src) == before


@pytest.mark.parametrize(("to", "scope"), [("bf16", "eh-proj"), ("bf16", "mtp")])
def test_idempotent(tmp_path: Path, bundled: Path, to: str, scope: str) -> None:
    first = tmp_path / "first"
    convert(bundled, first, ConvertOptions(to=to, scope=scope))
    again = convert(first, tmp_path / "second", ConvertOptions(to=to, scope=scope))
    assert again.status == "noop" and again.plan.is_noop
    assert not (tmp_path / "second").exists()


def test_deterministic_bytes(tmp_path: Path, bundled: Path) -> None:
    for run in ("a", "b"):
        convert(bundled, tmp_path / run, ConvertOptions(to="bf16", scope="mtp"), write=WriteOptions(copy=True))
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_quark_file_to_file_conventions_are_kept(tmp_path: Path, bundled: Path) -> None:
    dst = tmp_path / "out"
    convert(bundled, dst, ConvertOptions())
    source_index_text = (bundled / "model.safetensors.index.json").read_text()
    index_text = (dst / "model.safetensors.index.json").read_text()
    assert index_text.startswith('{\n    "metadata"') and not index_text.endswith("\n")  # indent 4, as Quark writes
    assert source_index_text.startswith('{\n    "metadata"')
    source_keys = [k for k in index_of(bundled)["weight_map"] if k != EH + "_scale"]
    assert list(index_of(dst)["weight_map"]) == source_keys  # Quark's unsorted order, minus the dropped scale
    files = set(index_of(dst)["weight_map"].values())
    assert index_of(dst)["metadata"]["total_size"] == sum((dst / f).stat().st_size for f in files)
    assert (dst / "config.json").read_text().startswith('{\n    "')
    _, metadata = load_shard(dst / "model-00002-of-00003.safetensors")
    assert metadata["format"] == "pt"
    assert metadata["glm5conv.mode"] == "to=bf16 scope=eh-proj"
    assert len(metadata["glm5conv.source_sha256"]) == 64
    assert load_shard(dst / "model-00001-of-00003.safetensors")[1] is None  # untouched shard: still no metadata


def test_transformers_total_size_convention(tmp_path: Path, src: Path) -> None:
    index = index_of(src)
    tensor_bytes = 0
    for shard in set(index["weight_map"].values()):
        with safe_open(src / shard, "pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                numel = 1
                for d in t.get_shape():
                    numel *= d
                tensor_bytes += numel * {"U8": 1, "BF16": 2, "F32": 4}[t.get_dtype()]
    index["metadata"]["total_size"] = tensor_bytes
    (src / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    dst = tmp_path / "out"
    result = convert(src, dst, ConvertOptions())
    assert result.plan.total_size_convention == "tensor-bytes"
    new_total = index_of(dst)["metadata"]["total_size"]
    assert new_total == tensor_bytes + 64 * 128 * 2 - 64 * 64 - 64 * 4  # bf16 eh_proj in, U8 weight and scale out
    assert (dst / "model.safetensors.index.json").read_text().endswith("}\n")


def test_single_file_checkpoint(tmp_path: Path, src: Path) -> None:
    to_single_file(src)
    dst = tmp_path / "out"
    result = convert(src, dst, ConvertOptions(scope="mtp"))
    assert result.plan.rewritten_files == ["model.safetensors"] and result.plan.weight_map is None
    assert not (dst / "model.safetensors.index.json").exists()
    assert verify_checkpoint(dst, against=src).ok


def make_hf_snapshot(tmp_path: Path, source: Path) -> tuple[Path, Path]:
    """A Hugging Face cache layout: blobs/<sha256> and a snapshot of relative symlinks."""
    repo = tmp_path / "hub" / "models--amd--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in source.iterdir():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blobs / digest)
        (snapshot / path.name).symlink_to(os.path.relpath(blobs / digest, snapshot))
    return blobs, snapshot


def test_hugging_face_cache_snapshot_is_read_through_links(tmp_path: Path, bundled: Path) -> None:
    blobs, snapshot = make_hf_snapshot(tmp_path, bundled)
    before = tree_hashes(blobs)
    dst = tmp_path / "out"
    convert(snapshot, dst, ConvertOptions(scope="mtp"))
    assert tree_hashes(blobs) == before
    assert all((snapshot / p.name).is_symlink() for p in bundled.iterdir())
    untouched = dst / "model-00001-of-00003.safetensors"
    blob = (snapshot / untouched.name).resolve()
    assert not untouched.is_symlink() and os.path.samefile(untouched, blob)
    # the blob names are sha256s: the manifest lists them, and the output was hashed while written
    manifest = json.loads((dst / "glm5conv-manifest.json").read_text())
    assert manifest["files"][untouched.name]["sha256"] == blob.name
    for shard in ("model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"):
        assert manifest["source_shards"][shard] == (snapshot / shard).resolve().name
        assert manifest["files"][shard]["sha256"] == hashlib.sha256((dst / shard).read_bytes()).hexdigest()
        assert load_shard(dst / shard)[1]["glm5conv.source_sha256"] == (snapshot / shard).resolve().name
    assert verify_checkpoint(dst, against=snapshot).ok


def test_local_dir_download_metadata_gives_hashes(tmp_path: Path, src: Path) -> None:
    """huggingface_hub's local_dir downloads record each file's etag (sha256 for LFS files)."""
    meta = src / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    digests = {}
    for path in sorted(src.glob("*.safetensors")):
        digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        (meta / f"{path.name}.metadata").write_text(f"0123abcd\n{digests[path.name]}\n{path.stat().st_mtime + 5}\n")
    convert(src, tmp_path / "out", ConvertOptions())
    manifest = json.loads((tmp_path / "out" / "glm5conv-manifest.json").read_text())
    assert (
        manifest["files"]["model-00001-of-00003.safetensors"]["sha256"] == digests["model-00001-of-00003.safetensors"]
    )
    assert not (tmp_path / "out" / ".cache").exists()  # tool caches are not part of the checkpoint
    # a file modified after its download is not trusted
    os.utime(src / "model-00001-of-00003.safetensors", (time.time() + 100, time.time() + 100))
    convert(src, tmp_path / "again", ConvertOptions())
    again = json.loads((tmp_path / "again" / "glm5conv-manifest.json").read_text())
    assert again["files"]["model-00001-of-00003.safetensors"]["sha256"] is None


def test_unchanged_shards_are_hashed_on_request(tmp_path: Path, src: Path) -> None:
    convert(src, tmp_path / "default", ConvertOptions())
    convert(src, tmp_path / "hashed", ConvertOptions(), write=WriteOptions(hash_unchanged=True))
    files = json.loads((tmp_path / "default" / "glm5conv-manifest.json").read_text())["files"]
    hashed = json.loads((tmp_path / "hashed" / "glm5conv-manifest.json").read_text())["files"]
    shard = "model-00001-of-00003.safetensors"
    assert files[shard]["sha256"] is None and files[shard]["size"] == (src / shard).stat().st_size
    assert hashed[shard]["sha256"] == hashlib.sha256((src / shard).read_bytes()).hexdigest()
    assert files["config.json"]["sha256"] is not None  # every file glm5conv writes is hashed


def test_outputs_open_with_safetensors(tmp_path: Path, bundled: Path) -> None:
    for to, scope in MODES:
        dst = tmp_path / f"{to}-{scope}"
        convert(bundled, dst, ConvertOptions(to=to, scope=scope))
        index = index_of(dst)
        seen = set()
        for shard in set(index["weight_map"].values()):
            with safe_open(dst / shard, "pt") as f:
                for key in f.keys():
                    assert index["weight_map"][key] == shard
                    f.get_tensor(key)
                    seen.add(key)
        assert seen == set(index["weight_map"])


def test_quark_importer_still_loads_the_main_model(tmp_path: Path, bundled: Path) -> None:
    pytest.importorskip("quark")
    transformers = pytest.importorskip("transformers")
    from quark.torch.export.api import import_model_from_safetensors

    tokens = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
    logits = {}
    for name, path in (("source", bundled), ("converted", tmp_path / "out")):
        if name == "converted":
            convert(bundled, path, ConvertOptions(to="bf16", scope="mtp"))
        config = transformers.GlmMoeDsaConfig.from_pretrained(path)
        model = import_model_from_safetensors(transformers.GlmMoeDsaForCausalLM(config), str(path), device="cpu")
        assert any(type(m).__name__ == "QuarkExperts" for m in model.modules())
        with torch.no_grad():
            logits[name] = model(tokens).logits
    assert torch.isfinite(logits["source"]).all()
    assert torch.equal(logits["source"], logits["converted"])


def test_mxfp4_from_a_bf16_mtp_layer_equals_quark(tmp_path: Path, bundled: Path) -> None:
    """GLM-5.2-MXFP4 style (whole MTP layer bf16 and excluded) -> Quark's canonical MXFP4."""
    pytest.importorskip("quark")
    from tests.test_codec import quark_quantize

    bf16 = tmp_path / "bf16"
    convert(bundled, bf16, ConvertOptions(to="bf16", scope="mtp"))
    dst = tmp_path / "fp4"
    result = convert(bf16, dst, ConvertOptions(to="mxfp4", scope="mtp"))
    assert {c.action for c in result.plan.changes} == {"quantize"}
    source, out = shards(bf16), shards(dst)
    for module in ("eh_proj", "mlp.experts.0.gate_proj", "mlp.experts.7.down_proj"):
        name = f"model.layers.2.{module}.weight"
        packed, scale = quark_quantize(source[name])
        assert torch.equal(out[name], packed) and torch.equal(out[name + "_scale"], scale)
    exclude = json.loads((dst / "config.json").read_text())["quantization_config"]["exclude"]
    assert "model.layers.2" not in exclude and "model.eh_proj" not in exclude
    assert not any(e.startswith("model.layers.2.mlp.experts") or e == "model.decoder.mlp.experts" for e in exclude)
    assert "model.decoder.self_attn.o_proj" in exclude  # still-bf16 attention stays excluded everywhere
    assert verify_checkpoint(dst, against=bf16).ok
    # back to bf16: the values of the original bf16 layer, exactly (signs of zero aside)
    back = tmp_path / "back"
    convert(dst, back, ConvertOptions(to="bf16", scope="mtp"))
    again = shards(back)
    for name, tensor in source.items():
        if name.startswith("model.layers.2.") and tensor.dtype == torch.bfloat16:
            assert torch.equal(tensor.float(), again[name].float()), name


def test_regex_excludes_get_a_lookahead_instead_of_being_dropped(tmp_path: Path, bundled: Path) -> None:
    bf16 = tmp_path / "bf16"
    convert(bundled, bf16, ConvertOptions(to="bf16", scope="mtp"))
    config = json.loads((bf16 / "config.json").read_text())
    config["quantization_config"]["exclude"] = [r"re:model\.layers\.2\..*", "lm_head"]
    (bf16 / "config.json").write_text(json.dumps(config, indent=4))
    (bf16 / "glm5conv-manifest.json").unlink()
    dst = tmp_path / "fp4"
    result = convert(bf16, dst, ConvertOptions(to="mxfp4", scope="eh-proj"))
    [(old, new)] = result.plan.exclude_rewritten
    assert old == r"re:model\.layers\.2\..*"
    from glm5conv.quark_config import entry_matches

    assert not entry_matches(new, "model.layers.2.eh_proj")
    assert entry_matches(new, "model.layers.2.self_attn.o_proj")
    assert entry_matches(new, "model.layers.2.mlp.experts.0.up_proj")  # experts stay bf16 in eh-proj scope
    assert verify_checkpoint(dst).ok


def test_force_replaces_a_non_empty_dst(tmp_path: Path, bundled: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    convert(bundled, dst, ConvertOptions(), write=WriteOptions(force=True))
    assert not (dst / "old.txt").exists() and (dst / "glm5conv-manifest.json").exists()
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_dry_run_writes_nothing(tmp_path: Path, bundled: Path) -> None:
    result = convert(bundled, tmp_path / "out", ConvertOptions(scope="mtp"), dry_run=True)
    assert result.status == "dry-run" and not (tmp_path / "out").exists()
    assert result.plan.bytes_to_write == sum(s.file_size for s in result.plan.shards) > 0
    assert "model.layers.2" in result.plan.exclude_added


def test_decoded_bytes_match_codec_for_every_expert(tmp_path: Path, bundled: Path) -> None:
    convert(bundled, tmp_path / "out", ConvertOptions(scope="mtp"))
    source, out = shards(bundled), shards(tmp_path / "out")
    decoded = 0
    for name, tensor in source.items():
        if name.startswith("model.layers.2.") and name + "_scale" in source:
            assert codec.bf16_bits_equal(out[name], codec.decode(tensor, source[name + "_scale"]))
            decoded += 1
    assert decoded == 1 + 8 * 3


def test_mxfp4_normalizes_int8_and_e8m0_views(tmp_path: Path, src: Path) -> None:
    """FP4 stored under other dtype labels (I8 weight, F8_E8M0 scale) comes out as Quark's U8/U8."""
    from tests.helpers import edit_shard

    weight = load_shard(src / "model-00002-of-00003.safetensors")[0][EH]
    scale = load_shard(src / "model-00003-of-00003.safetensors")[0][EH + "_scale"]
    edit_shard(src, "model-00002-of-00003.safetensors", **{"model.layers.2.eh_proj__weight": weight.view(torch.int8)})
    edit_shard(
        src,
        "model-00003-of-00003.safetensors",
        **{"model.layers.2.eh_proj__weight_scale": scale.view(torch.float8_e8m0fnu)},
    )
    dst = tmp_path / "out"
    result = convert(src, dst, ConvertOptions(to="mxfp4"))
    assert [c.action for c in result.plan.changes] == ["normalize"]
    out = shards(dst)
    assert out[EH].dtype == torch.uint8 and torch.equal(out[EH], weight)
    assert out[EH + "_scale"].dtype == torch.uint8 and torch.equal(out[EH + "_scale"], scale)
    bf16 = convert(src, tmp_path / "bf16", ConvertOptions(to="bf16"))
    assert bf16.status == "converted"
    assert codec.bf16_bits_equal(shards(tmp_path / "bf16")[EH], codec.decode(weight, scale))


def test_deepseek_v3_checkpoint_converts(tmp_path: Path) -> None:
    from tests.test_inspection import make_deepseek_v3

    ckpt = make_deepseek_v3(tmp_path)
    dst = tmp_path / "out"
    result = convert(ckpt, dst, ConvertOptions(scope="mtp"))
    assert result.plan.changes[0].module == "model.layers.61.eh_proj"
    assert "model.layers.61" in result.plan.exclude_added and "model.eh_proj" in result.plan.exclude_added
    assert verify_checkpoint(dst, against=ckpt).ok


def test_provenance_hash_is_the_source_files_sha256(tmp_path: Path, src: Path) -> None:
    import hashlib

    convert(src, tmp_path / "out", ConvertOptions(scope="mtp"))
    manifest = json.loads((tmp_path / "out" / "glm5conv-manifest.json").read_text())
    for shard in ("model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"):
        expected = hashlib.sha256((src / shard).read_bytes()).hexdigest()
        assert load_shard(tmp_path / "out" / shard)[1]["glm5conv.source_sha256"] == expected
        assert manifest["source_shards"][shard] == expected
        assert manifest["files"][shard]["sha256"] == hashlib.sha256((tmp_path / "out" / shard).read_bytes()).hexdigest()
