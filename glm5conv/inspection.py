"""``inspect`` as a library call: what a checkpoint holds for MTP and how each engine will take it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glm5conv.checkpoint import Checkpoint, RemoteFile, open_checkpoint
from glm5conv.engines import ENGINES, EngineVerdict, evaluate, exclude_names, whole_layer_exclude_names
from glm5conv.manifest import read_manifest
from glm5conv.mtp import layer_storage
from glm5conv.quark_config import entry_matches, parse_quark_config, quantization_method


@dataclass(frozen=True)
class MtpTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: str
    excluded_by: tuple[str, ...]


@dataclass
class InspectReport:
    path: Path
    architecture: str
    family: str
    num_hidden_layers: int
    mtp_layer: int
    num_nextn_predict_layers: int
    hidden_size: int
    quantization: str
    exclude_entries: int
    tensors: list[MtpTensor]
    verdicts: list[EngineVerdict]
    manifest: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "architecture": self.architecture,
            "family": self.family,
            "num_hidden_layers": self.num_hidden_layers,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "mtp_layer": self.mtp_layer,
            "hidden_size": self.hidden_size,
            "quantization": self.quantization,
            "exclude_entries": self.exclude_entries,
            "mtp_tensors": [
                {
                    "name": t.name,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "shard": t.shard,
                    "excluded_by": list(t.excluded_by),
                }
                for t in self.tensors
            ],
            "engines": [v.to_json() for v in self.verdicts],
            "converted_by_glm5conv": None
            if self.manifest is None
            else {"version": self.manifest.get("version"), "mode": self.manifest.get("mode")},
            "notes": self.notes,
        }


def engine_verdicts(checkpoint: Checkpoint) -> tuple[list[EngineVerdict], tuple[str, ...], list[str]]:
    """Each engine's verdict on the MTP layer, the exclude list used, and notes."""
    layout = checkpoint.layout
    storage = layer_storage(checkpoint)
    method = quantization_method(checkpoint.config)
    if method is None:
        return [evaluate(e, layout, (), storage, quantized_checkpoint=False) for e in ENGINES], (), []
    if method != "quark":
        return [], (), [f"quantization method '{method}': the engine rules cover Quark checkpoints only"]
    exclude = parse_quark_config(checkpoint.config, checkpoint.config_path).exclude
    return [evaluate(e, layout, exclude, storage) for e in ENGINES], exclude, []


def inspect_checkpoint(path: Path, remote_files: dict[str, RemoteFile] | None = None) -> InspectReport:
    """``remote_files``: a Hub repository's files that are not here (see glm5conv.hub)."""
    with open_checkpoint(path, remote_files) as checkpoint:
        layout = checkpoint.layout
        method = quantization_method(checkpoint.config)
        if method == "quark":
            quantization = parse_quark_config(checkpoint.config, checkpoint.config_path).format_name
        else:
            quantization = "none (unquantized)" if method is None else method
        verdicts, exclude, notes = engine_verdicts(checkpoint)
        prefix = layout.mtp_prefix()
        names = checkpoint.names_with_prefix(prefix)
        if not names:
            notes.append(f"no tensors under '{prefix}': the checkpoint does not contain the MTP layer")
        if layout.num_nextn_predict_layers > 1:
            notes.append(
                f"num_nextn_predict_layers is {layout.num_nextn_predict_layers}; engines load layer {layout.mtp_layer} only"
            )
        tensors = []
        for name in names:
            entry = checkpoint.entry(name)
            module = name[len(prefix) :].rsplit(".", 1)[0]
            candidates = exclude_names(layout, module) + whole_layer_exclude_names(layout)
            covered = tuple(e for e in exclude if any(entry_matches(e, c) for c in candidates))
            tensors.append(MtpTensor(name, entry.dtype, entry.shape, checkpoint.shard_of(name), covered))
        return InspectReport(
            path=Path(path),
            architecture=layout.architecture,
            family=layout.family,
            num_hidden_layers=layout.num_hidden_layers,
            mtp_layer=layout.mtp_layer,
            num_nextn_predict_layers=layout.num_nextn_predict_layers,
            hidden_size=layout.hidden_size,
            quantization=quantization,
            exclude_entries=len(exclude),
            tensors=tensors,
            verdicts=verdicts,
            manifest=read_manifest(Path(path)),
            notes=notes,
        )
