"""The conversion plan: what changes, in which shards, and the new index and config.

Planning reads only metadata (config, index, shard headers), never tensor data, so
``--dry-run`` is instant and every decision here is testable without tensors. The writer
carries a plan out; the plan is the single source of truth for the output's layout.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from glm5conv import __version__
from glm5conv.checkpoint import CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, Checkpoint
from glm5conv.codec import GROUP_SIZE
from glm5conv.engines import (
    ENGINE_KEYS,
    ENGINES,
    QUARK_AWARE_ENGINE_KEYS,
    EngineVerdict,
    evaluate,
    exclude_names,
    whole_layer_exclude_names,
)
from glm5conv.errors import BadInputError, UsageError
from glm5conv.mtp import FLOAT, MXFP4, ROUTED_EXPERT_MARK, ModuleStorage, layer_storage, validate_storage
from glm5conv.quark_config import REGEX_PREFIX, QuarkConfig, entry_matches, parse_quark_config
from glm5conv.shard import TensorSpec, encode_header

TARGETS = ("bf16", "mxfp4")
SCOPES = ("eh-proj", "mtp")
SOURCE_HASH_KEY = "glm5conv.source_sha256"
HASH_PLACEHOLDER = "0" * 64


@dataclass(frozen=True)
class ConvertOptions:
    to: str = "bf16"
    scope: str = "eh-proj"

    def __post_init__(self) -> None:
        if self.to not in TARGETS:
            raise UsageError(f"--to must be one of {', '.join(TARGETS)}, not '{self.to}'")
        if self.scope not in SCOPES:
            raise UsageError(f"--scope must be one of {', '.join(SCOPES)}, not '{self.scope}'")

    @property
    def mode(self) -> str:
        return f"to={self.to} scope={self.scope}"


@dataclass(frozen=True)
class ModuleChange:
    """One Linear of the MTP layer changing storage (``module`` is the full module name)."""

    module: str
    action: str  # dequantize | quantize | normalize
    before: str
    after: str


@dataclass(frozen=True)
class OutTensor:
    """A tensor of a rewritten shard and where its bytes come from.

    ``source`` is ``("copy", name)``, ``("decode", weight, scale)``,
    ``("encode-weight", weight)`` or ``("encode-scale", weight)``.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return TensorSpec(self.name, self.dtype, self.shape).nbytes


@dataclass(frozen=True)
class ShardPlan:
    name: str
    tensors: tuple[OutTensor, ...]
    metadata: dict[str, str]

    def header(self, source_sha256: str = HASH_PLACEHOLDER) -> bytes:
        metadata = dict(self.metadata)
        metadata[SOURCE_HASH_KEY] = source_sha256
        return encode_header([TensorSpec(t.name, t.dtype, t.shape) for t in self.tensors], metadata)

    @property
    def file_size(self) -> int:
        return len(self.header()) + sum(t.nbytes for t in self.tensors)


@dataclass
class ConversionPlan:
    checkpoint: Checkpoint
    options: ConvertOptions
    changes: list[ModuleChange]
    shards: list[ShardPlan]
    untouched_files: list[str]
    weight_map: dict[str, str] | None
    total_size_convention: str
    config: dict[str, Any]
    exclude_added: list[str]
    exclude_removed: list[str]
    exclude_rewritten: list[tuple[str, str]]
    verdicts_before: list[EngineVerdict]
    verdicts_after: list[EngineVerdict]
    checks: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    source: dict[str, str] | None = None  # the Hub repository (repo_id, revision, commit) converted from

    @property
    def is_noop(self) -> bool:
        return not self.changes and not self.exclude_added and not self.exclude_removed and not self.exclude_rewritten

    @property
    def config_changed(self) -> bool:
        return self.config != self.checkpoint.config

    @property
    def target_engines(self) -> tuple[str, ...]:
        return ENGINE_KEYS if self.options.to == "bf16" else QUARK_AWARE_ENGINE_KEYS

    @property
    def rewritten_files(self) -> list[str]:
        return [s.name for s in self.shards]

    @property
    def bytes_to_write(self) -> int:
        return sum(s.file_size for s in self.shards)

    @property
    def bytes_to_read(self) -> int:
        return sum(self.checkpoint.shards[s.name].file_size for s in self.shards)

    def total_size(self) -> int | None:
        """``metadata.total_size`` of the new index, in the source's own convention.

        The source's figure plus what the rewritten shards change, so shards that are not here
        (a Hub overlay) need not be read; "recomputed" counts every tensor byte afresh.
        """
        if self.weight_map is None:
            return None
        shards = self.checkpoint.shards
        if self.total_size_convention == "recomputed":
            rewritten = {s.name: s for s in self.shards}
            return sum(
                sum(t.nbytes for t in rewritten[n].tensors) if n in rewritten else h.tensor_bytes
                for n, h in shards.items()
            )
        stated = (self.checkpoint.index.get("metadata") or {}).get("total_size")
        for shard in self.shards:
            before = shards[shard.name]
            if self.total_size_convention == "file-size":
                stated += shard.file_size - before.file_size
            else:
                stated += sum(t.nbytes for t in shard.tensors) - before.tensor_bytes
        return stated

    def index(self) -> dict[str, Any] | None:
        """The new index: the source's, with the new weight_map and total_size (other keys kept)."""
        if self.weight_map is None:
            return None
        source = self.checkpoint.index or {}
        metadata = source.get("metadata") if isinstance(source.get("metadata"), dict) else {}
        return {**source, "metadata": {**metadata, "total_size": self.total_size()}, "weight_map": self.weight_map}

    def fingerprint(self) -> str:
        """Identity of this conversion (tool, options, source files, planned output): resume only into the same."""
        sources: dict[str, list[Any]] = {}
        for name in sorted(set(self.checkpoint.shards) | set(self.untouched_files) | {CONFIG_NAME}):
            remote = self.checkpoint.remote_files.get(name)
            if remote is not None:
                sources[name] = [remote.size, remote.sha256]
            else:
                stat = (self.checkpoint.root / name).stat()
                sources[name] = [stat.st_size, stat.st_mtime_ns]
        identity = {
            "version": __version__,
            "mode": self.options.mode,
            "source": self.source,
            "sources": sources,
            "shards": {s.name: s.header().hex() for s in self.shards},
            "untouched": self.untouched_files,
            "config": self.config,
            "index": self.index(),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    @property
    def index_changed(self) -> bool:
        return self.weight_map is not None and self.index() != self.checkpoint.index


def _targets(options: ConvertOptions, storage: dict[str, ModuleStorage]) -> list[str]:
    if options.scope == "eh-proj":
        return [m for m in ("eh_proj",) if m in storage]
    if options.to == "bf16":
        return list(storage)
    return [m for m in storage if m == "eh_proj" or m.startswith(ROUTED_EXPERT_MARK)]


def _storage_after(storage: dict[str, ModuleStorage], targets: list[str], to: str) -> dict[str, ModuleStorage]:
    after = dict(storage)
    for module in targets:
        out, inp = storage[module].logical_shape
        if to == "bf16":
            after[module] = ModuleStorage(
                module, FLOAT, storage[module].dtype if storage[module].kind == FLOAT else "BF16", (out, inp)
            )
        else:
            after[module] = ModuleStorage(module, MXFP4, "U8", (out, inp // 2))
    return after


def reconcile_exclude(
    checkpoint: Checkpoint, exclude: tuple[str, ...], storage: dict[str, ModuleStorage]
) -> tuple[list[str], list[str], list[str], list[tuple[str, str]]]:
    """Make ``exclude`` agree with how the MTP layer is stored, for every engine.

    Returns (new list, added, removed, rewritten regexes). Entries that make some engine
    expect bf16 for an MXFP4 module are removed (regexes get a negative lookahead for those
    names instead, so they keep covering everything else); every float module gets every name
    an engine checks; a fully float layer also gets the bare layer name.
    """
    layout = checkpoint.layout
    layer_name = whole_layer_exclude_names(layout)
    quantized_names: list[str] = []
    for module, stored in storage.items():
        if stored.kind == MXFP4:
            quantized_names += exclude_names(layout, module)
    if any(s.kind == MXFP4 for s in storage.values()):
        quantized_names += layer_name

    kept: list[str] = []
    removed: list[str] = []
    rewritten: list[tuple[str, str]] = []
    for entry in exclude:
        hits = [n for n in dict.fromkeys(quantized_names) if entry_matches(entry, n)]
        if not hits:
            kept.append(entry)
        elif entry.startswith(REGEX_PREFIX):
            guard = "|".join(re.escape(n) + "$" for n in hits)
            new = f"{REGEX_PREFIX}(?!{guard})(?:{entry[len(REGEX_PREFIX) :]})"
            kept.append(new)
            rewritten.append((entry, new))
        else:
            removed.append(entry)

    added: list[str] = []
    wanted: list[str] = []
    for module, stored in storage.items():
        if stored.kind == FLOAT:
            wanted += exclude_names(layout, module)
    if storage and all(s.kind == FLOAT for s in storage.values()):
        wanted += layer_name
    for name in dict.fromkeys(wanted):
        if not any(entry_matches(e, name) for e in kept + added):
            added.append(name)
    return kept + added, added, removed, rewritten


def _total_size_convention(checkpoint: Checkpoint, notes: list[str]) -> str:
    if checkpoint.index is None:
        return "none"
    stated = (checkpoint.index.get("metadata") or {}).get("total_size")
    tensor_bytes, file_bytes = checkpoint.tensor_bytes_total(), checkpoint.file_bytes_total()
    if stated == file_bytes:
        return "file-size"
    if tensor_bytes is None and isinstance(stated, int):
        notes.append(f"{INDEX_NAME}: total_size taken as tensor bytes (the unchanged shards' headers were not fetched)")
        return "tensor-bytes"
    if stated == tensor_bytes:
        return "tensor-bytes"
    notes.append(
        f"{INDEX_NAME}: metadata.total_size {stated!r} matches neither the tensor bytes "
        f"({tensor_bytes}) nor the shard file sizes ({file_bytes}); the output counts tensor bytes"
    )
    return "recomputed"


def _shard_plans(
    checkpoint: Checkpoint, prefix: str, storage: dict[str, ModuleStorage], targets: list[str], options: ConvertOptions
) -> tuple[list[ShardPlan], list[ModuleChange]]:
    replace: dict[str, list[OutTensor]] = {}
    drop: set[str] = set()
    changes: list[ModuleChange] = []
    for module in targets:
        stored = storage[module]
        weight = f"{prefix}{module}.weight"
        scale = weight + "_scale"
        out, inp = stored.logical_shape
        if options.to == "bf16" and stored.kind == MXFP4:
            replace[weight] = [OutTensor(weight, "BF16", (out, inp), ("decode", weight, scale))]
            drop.add(scale)
            changes.append(ModuleChange(prefix + module, "dequantize", stored.describe(), f"BF16 [{out}, {inp}]"))
        elif options.to == "mxfp4" and stored.kind == FLOAT:
            if inp % GROUP_SIZE:
                raise BadInputError(
                    f"{weight}: in_features {inp} is not a multiple of the MXFP4 group size {GROUP_SIZE}"
                )
            replace[weight] = [
                OutTensor(weight, "U8", (out, inp // 2), ("encode-weight", weight)),
                OutTensor(scale, "U8", (out, inp // GROUP_SIZE), ("encode-scale", weight)),
            ]
            changes.append(
                ModuleChange(
                    prefix + module, "quantize", stored.describe(), f"MXFP4 U8 [{out}, {inp // 2}] + weight_scale"
                )
            )
        elif options.to == "mxfp4" and stored.kind == MXFP4:
            scale_entry = checkpoint.entry(scale)
            if stored.dtype != "U8" or scale_entry.dtype != "U8":
                replace[weight] = [OutTensor(weight, "U8", stored.shape, ("copy", weight))]
                replace[scale] = [OutTensor(scale, "U8", scale_entry.shape, ("copy", scale))]
                changes.append(
                    ModuleChange(
                        prefix + module,
                        "normalize",
                        f"{stored.dtype} weight, {scale_entry.dtype} scale",
                        "U8 weight, U8 scale",
                    )
                )

    affected = sorted({checkpoint.shard_of(n) for n in replace} | {checkpoint.shard_of(n) for n in drop})
    plans: list[ShardPlan] = []
    for shard_name in affected:
        header = checkpoint.shards[shard_name]
        tensors: list[OutTensor] = []
        for name, entry in header.tensors.items():
            if name in drop:
                continue
            if name in replace:
                tensors += replace[name]
            else:
                tensors.append(OutTensor(name, entry.dtype, entry.shape, ("copy", name)))
        metadata = dict(header.metadata or {})
        metadata["format"] = "pt"
        metadata["glm5conv.version"] = __version__
        metadata["glm5conv.mode"] = options.mode
        plans.append(ShardPlan(shard_name, tuple(tensors), metadata))
    return plans, changes


def plan_conversion(checkpoint: Checkpoint, options: ConvertOptions) -> ConversionPlan:
    """Decide everything about a conversion from metadata alone."""
    layout = checkpoint.layout
    quark: QuarkConfig = parse_quark_config(checkpoint.config, checkpoint.config_path)
    if not quark.is_mxfp4:
        raise BadInputError(f"{checkpoint.config_path}: quantization is {quark.format_name}, not Quark MXFP4")
    prefix = layout.mtp_prefix()
    storage = layer_storage(checkpoint)
    if not storage:
        raise BadInputError(f"{checkpoint.root}: no Linear weights under '{prefix}': the MTP layer is missing")
    validate_storage(checkpoint, storage)
    notes: list[str] = []
    if layout.num_nextn_predict_layers > 1:
        notes.append(
            f"num_nextn_predict_layers is {layout.num_nextn_predict_layers}; engines load only layer {layout.mtp_layer}, the one converted"
        )

    targets = _targets(options, storage)
    after = _storage_after(storage, targets, options.to)
    shards, changes = _shard_plans(checkpoint, prefix, storage, targets, options)
    exclude, added, removed, rewritten = reconcile_exclude(checkpoint, quark.exclude, after)

    config = copy.deepcopy(checkpoint.config)
    config["quantization_config"]["exclude"] = exclude

    weight_map: dict[str, str] | None = None
    if checkpoint.is_sharded:
        weight_map = {}
        planned = {t.name: s.name for s in shards for t in s.tensors}
        dropped = {n for s in shards for n in checkpoint.shards[s.name].tensors} - set(planned)
        new_scales = {t.source[1]: t.name for s in shards for t in s.tensors if t.source[0] == "encode-scale"}
        for name, shard_name in checkpoint.weight_map.items():
            if name in dropped:
                continue
            weight_map[name] = planned.get(name, shard_name)
            if name in new_scales:  # a new scale goes right after its weight, as Quark writes it
                weight_map[new_scales[name]] = planned[new_scales[name]]

    convention = _total_size_convention(checkpoint, notes)
    skip = {s.name for s in shards} | {MANIFEST_NAME}
    plan = ConversionPlan(
        checkpoint=checkpoint,
        options=options,
        changes=changes,
        shards=shards,
        untouched_files=[],
        weight_map=weight_map,
        total_size_convention=convention,
        config=config,
        exclude_added=added,
        exclude_removed=removed,
        exclude_rewritten=rewritten,
        verdicts_before=[evaluate(e, layout, quark.exclude, storage) for e in ENGINES],
        verdicts_after=[evaluate(e, layout, tuple(exclude), after) for e in ENGINES],
        checks=[(f"{prefix}{m}.weight", f"{prefix}{m}.weight_scale") for m in targets if storage[m].kind == MXFP4],
        notes=notes,
    )
    if plan.config_changed:
        skip.add(CONFIG_NAME)
    if plan.index_changed:
        skip.add(INDEX_NAME)
    plan.untouched_files = [f for f in checkpoint.files() if f not in skip]
    return plan
