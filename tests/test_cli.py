"""The CLI is thin: stdout carries the result (one JSON document with --json), stderr the chatter."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import run_cli


def test_convert_json_document(tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(["convert", "bundled:", tmp_path / "out", "--json", "--verbose"], capsys)
    doc = json.loads(out)
    assert code == 0 and err == ""
    assert doc["status"] == "converted" and doc["mode"] == {"to": "bf16", "scope": "eh-proj"}
    assert doc["shards_rewritten"] == ["model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    assert doc["config_diff"]["exclude_added"][:2] == ["model.layers.2.eh_proj", "model.eh_proj"]
    assert {e["status"] for e in doc["engines_after"]} == {"loads"}
    assert doc["index"]["convention"] == "file-size"


def test_dry_run_and_quiet(tmp_path: Path, capsys) -> None:
    code, out, _ = run_cli(["convert", "bundled:", tmp_path / "out", "--dry-run"], capsys)
    assert code == 0 and out.startswith("dry run (nothing written)") and not (tmp_path / "out").exists()
    assert "+ model.eh_proj" in out
    code, out, err = run_cli(["convert", "bundled:", tmp_path / "out", "--quiet"], capsys)
    assert code == 0 and out == "" and err == ""


def test_verbose_progress_goes_to_stderr(tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(["convert", "bundled:", tmp_path / "out", "--verbose"], capsys)
    assert code == 0 and "rewriting model-00002-of-00003.safetensors" in err
    assert "wrote" in out


def test_noop_says_so(tmp_path: Path, capsys) -> None:
    run_cli(["convert", "bundled:", tmp_path / "out", "-q"], capsys)
    code, out, _ = run_cli(["convert", tmp_path / "out", tmp_path / "again", "--json"], capsys)
    assert code == 0 and json.loads(out)["status"] == "noop" and not (tmp_path / "again").exists()


def test_help_has_examples(capsys) -> None:
    for command in ("inspect", "convert", "verify"):
        code, out, _ = run_cli([command, "--help"], capsys)
        assert code == 0 and "Examples" in out and f"glm5conv {command}" in out


def test_unknown_bundled_name(capsys) -> None:
    code, _, err = run_cli(["inspect", "bundled:nope"], capsys)
    assert code == 2 and "bundled:nope: no such bundled checkpoint (bundled: tiny-glm5-mxfp4, tiny-glm5-trained)" in err


def test_fusion_flag_is_reported(tmp_path: Path, src: Path, capsys) -> None:
    """With 256 routed experts (as in the real GLM-5) SGLang fuses the bf16 shared expert: say which flag avoids it."""
    from tests.helpers import set_config

    set_config(src, n_routed_experts=256)
    code, out, _ = run_cli(["inspect", src, "--json"], capsys)
    status = {e["engine"]: (e["status"], e["flags"]) for e in json.loads(out)["engines"]}
    assert status["sglang-0.5.23"] == ("loads-with-flags", ["--disable-shared-experts-fusion"])
    code, out, _ = run_cli(["convert", src, tmp_path / "out"], capsys)
    assert code == 0 and "or pass --disable-shared-experts-fusion to the engine" in out
    code, out, _ = run_cli(["verify", tmp_path / "out"], capsys)
    assert code == 0 and "needs --disable-shared-experts-fusion" in out


def test_progress_counts_every_byte_written(tmp_path: Path) -> None:
    from glm5conv.bundled import bundled_path
    from glm5conv.convert import convert
    from glm5conv.plan import ConvertOptions
    from glm5conv.writer import NoProgress

    class Counting(NoProgress):
        def __init__(self) -> None:
            self.total, self.done, self.files = 0, 0, []

        def begin(self, total_bytes: int) -> None:
            self.total = total_bytes

        def file(self, name: str, nbytes: int) -> None:
            self.files.append(name)

        def advance(self, nbytes: int) -> None:
            self.done += nbytes

    progress = Counting()
    result = convert(bundled_path(), tmp_path / "out", ConvertOptions(scope="mtp"), progress=progress)
    assert progress.total == progress.done == result.plan.bytes_to_write
    assert progress.files == result.plan.rewritten_files


def test_progress_bars_only_on_a_terminal(tmp_path: Path, monkeypatch, capsys) -> None:
    import io

    from glm5conv.cli.progress import ConvertProgress

    code, _, err = run_cli(["convert", "bundled:", tmp_path / "out"], capsys)
    assert code == 0 and err == ""  # not a terminal: no bars, no chatter
    fake = io.StringIO()
    fake.isatty = lambda: True
    monkeypatch.setattr("sys.stderr", fake)
    with ConvertProgress(bars=True, verbose=False) as progress:
        assert progress.bars is not None
        progress.begin(100)
        progress.file("model-00002-of-00003.safetensors", 100)
        progress.advance(100)
    assert ConvertProgress(bars=False, verbose=False).bars is None  # --json / --quiet
