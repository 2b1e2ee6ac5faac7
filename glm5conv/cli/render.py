"""Human-readable output (rich tables) for the reports the library returns."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.table import Table

from glm5conv.convert import ConvertResult
from glm5conv.engines import EngineVerdict
from glm5conv.inspection import InspectReport, MtpTensor
from glm5conv.upload import UploadPlan
from glm5conv.verify import VerifyReport

STATUS_STYLE = {"loads": "green", "loads-with-flags": "yellow", "fails": "red"}
_EXPERT = re.compile(r"\.experts\.\d+\.")


def stdout_console() -> Console:
    """Rich on a terminal; plain, wide lines when piped (so logs and CI output stay greppable)."""
    import sys

    return Console() if sys.stdout.isatty() else Console(width=160, soft_wrap=True, no_color=True, highlight=False)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _collapse_experts(names: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        key = _EXPERT.sub(".experts.*.", name)
        counts[key] = counts.get(key, 0) + 1
    return counts


def print_verdicts(verdicts: Iterable[EngineVerdict], title: str, console: Console) -> None:
    console.print(f"[bold]{title}[/]")
    for v in verdicts:
        console.print(f"  {v.engine.label:<24} [{STATUS_STYLE[v.status]}]{v.status}[/]")
        for problem in v.problems[:4]:
            console.print(f"      - {problem.message}", highlight=False)
        if len(v.problems) > 4:
            console.print(f"      - ... and {len(v.problems) - 4} more (see --json)")
        for fix in sorted({p.fix for p in v.problems if p.fix}):
            console.print(f"      fix: {fix}", highlight=False)
        for flag in v.flags:
            console.print(f"      or pass {flag} to the engine", highlight=False)
        for note in v.notes:
            console.print(f"      note: {note}", highlight=False)


def _grouped(tensors: list[MtpTensor]) -> list[tuple[str, list[MtpTensor]]]:
    """Collapse the per-expert tensors (hundreds in a real checkpoint) into one row each."""
    groups: dict[tuple[str, str, tuple[int, ...]], list[MtpTensor]] = {}
    for t in tensors:
        groups.setdefault((_EXPERT.sub(".experts.*.", t.name), t.dtype, t.shape), []).append(t)
    return [(key[0], members) for key, members in groups.items()]


def render_inspect(report: InspectReport, console: Console) -> None:
    console.print(f"[bold]{report.path}[/]")
    console.print(
        f"  {report.architecture} ({report.family}): {report.num_hidden_layers} layers, MTP layer {report.mtp_layer}, "
        f"hidden {report.hidden_size}"
    )
    console.print(f"  quantization: {report.quantization}; {report.exclude_entries} exclude entries")
    if report.manifest is not None:
        console.print(f"  converted by glm5conv {report.manifest.get('version')} ({report.manifest.get('mode')})")
    prefix = f"model.layers.{report.mtp_layer}."
    table = Table(title=f"MTP layer {report.mtp_layer} (tensors under {prefix})", title_justify="left")
    for column in ("tensor", "dtype", "shape", "shard", "excluded by"):
        table.add_column(column, overflow="fold")
    for name, members in _grouped(report.tensors):
        first = members[0]
        label = name.removeprefix(prefix) + ("" if len(members) == 1 else f" (x{len(members)})")
        shards = ", ".join(sorted({m.shard for m in members}))
        entries = sorted({e for m in members for e in m.excluded_by})
        covered = (
            ", ".join(e.replace(prefix, "~.") for e in entries) if len(entries) <= 2 else f"{len(entries)} entries"
        )
        table.add_row(label, first.dtype, str(list(first.shape)), shards, covered or "-")
    console.print(table)
    console.print(f"  (~. = {prefix})")
    print_verdicts(report.verdicts, "Engines", console)
    for note in report.notes:
        console.print(f"note: {note}")


def render_convert(result: ConvertResult, console: Console) -> None:
    plan = result.plan
    if result.status == "noop":
        console.print(
            f"{plan.checkpoint.root}: already in the requested form ({plan.options.mode}); nothing to do, nothing written"
        )
        return
    if result.status == "complete":
        console.print(f"{result.dst}: already complete (an earlier run finished); nothing to resume")
        return
    head = "dry run (nothing written)" if result.status == "dry-run" else f"wrote {result.dst}"
    console.print(f"[bold]{head}[/]: {plan.options.mode}, MTP layer {plan.checkpoint.layout.mtp_layer}")
    grouped: dict[tuple[str, str, str, str], int] = {}
    for change in plan.changes:
        key = (change.action, _EXPERT.sub(".experts.*.", change.module), change.before, change.after)
        grouped[key] = grouped.get(key, 0) + 1
    for (action, module, before, after), count in grouped.items():
        times = f" (x{count})" if count > 1 else ""
        console.print(f"  {action:<10} {module}{times}: {before} -> {after}", highlight=False)
    console.print(
        f"  shards rewritten: {', '.join(plan.rewritten_files) or 'none'}; read {_size(plan.bytes_to_read)}, "
        f"write {_size(plan.bytes_to_write)}; {len(plan.untouched_files)} other files unchanged (linked or copied)"
    )
    if plan.weight_map is not None and plan.index_changed:
        console.print(f"  index: total_size {plan.total_size()} ({plan.total_size_convention})")
    if plan.exclude_added or plan.exclude_removed or plan.exclude_rewritten:
        console.print(f"  config.json exclude: +{len(plan.exclude_added)} -{len(plan.exclude_removed)} entries")
        for sign, entries in (("+", plan.exclude_added), ("-", plan.exclude_removed)):
            for entry, count in _collapse_experts(entries).items():
                console.print(f"    {sign} {entry}" + (f" (x{count})" if count > 1 else ""), highlight=False)
        for old, new in plan.exclude_rewritten:
            console.print(f"    ~ {old} -> {new}")
    if result.hub is not None:
        _render_fetch(result.hub, result.status, console)
    print_verdicts(plan.verdicts_after, "Engines after conversion", console)
    for note in plan.notes:
        console.print(f"note: {note}")


def _render_fetch(hub: dict[str, Any], status: str, console: Console) -> None:
    verb = "to fetch" if status == "dry-run" else "fetched"
    console.print(
        f"  hub: {hub['repo_id']}@{hub['commit'][:12]} ({'overlay' if hub['overlay'] else 'complete copy'}); "
        f"{verb} {len(hub['files_to_fetch'])} file(s), {_size(hub['bytes_to_fetch'])}; "
        f"in the cache {_size(hub['bytes_cached'])}; left on the Hub {_size(hub['bytes_left_on_hub'])} "
        f"of {_size(hub['repo_bytes'])}",
        highlight=False,
    )


def render_upload(plan: UploadPlan, result: dict[str, Any] | None, console: Console) -> None:
    head = "dry run (nothing sent)" if result is None else f"committed to {plan.repo_id}"
    console.print(f"[bold]{head}[/]: {plan.commit_message()}", highlight=False)
    for op in plan.ops:
        how = "upload" if op.action == "upload" else "copy on the Hub from " + plan.source["repo_id"]
        console.print(f"  {op.action:<6} {op.path} ({_size(op.size)}; {how})", highlight=False)
    if plan.kept:
        console.print(f"  {len(plan.kept)} other file(s) already in {plan.repo_id}: left as they are")
    console.print(
        f"  bytes to upload: {_size(plan.bytes_to_upload)}; copied on the Hub: {_size(plan.bytes_copied)}",
        highlight=False,
    )
    if result is not None:
        console.print(f"  commit {result['commit']}: {result['pr_url'] or result['commit_url']}", highlight=False)


def render_verify(report: VerifyReport, console: Console) -> None:
    console.print(f"[bold]{report.path}[/]: {'[green]OK[/]' if report.ok else '[red]FAILED[/]'}")
    for check in report.checks:
        mark = "[green]ok[/]  " if check.ok else "[red]FAIL[/]"
        console.print(f"  {mark} {check.name}: {check.detail}")
    if report.verdicts:
        print_verdicts(report.verdicts, "Engines", console)
