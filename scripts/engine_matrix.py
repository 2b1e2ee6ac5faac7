"""Print the SGLang-version x checkpoint matrix of docs/sglang-mi300.md from glm5conv's engine rules.

Metadata only (plans, no conversion written): python scripts/engine_matrix.py SYNTHETIC
where SYNTHETIC is `scripts/make_synthetic_glm5.py OUT --sparse` (GLM-5-MXFP4's real layout).
"""

from __future__ import annotations

import sys
from pathlib import Path

from glm5conv.checkpoint import open_checkpoint
from glm5conv.engines import engine, evaluate, patched
from glm5conv.mtp import FLOAT, ModuleStorage, layer_storage
from glm5conv.plan import ConvertOptions, plan_conversion
from glm5conv.quark_config import parse_quark_config

COLUMNS = [engine("sglang-0.5.10"), patched(engine("sglang-0.5.10")), engine("sglang-0.5.11"), patched(engine("sglang-0.5.11")),
           engine("sglang-0.5.16"), engine("sglang-0.5.23"), engine("vllm-0.33")]  # fmt: skip


def cell(verdict) -> str:
    if verdict.status == "loads":
        return "loads"
    if verdict.status == "loads-with-flags":
        return "loads with " + " ".join(f"`{f}`" for f in verdict.flags)
    return "fails"


def main() -> None:
    path = Path(sys.argv[1])
    rows = []
    with open_checkpoint(path) as ckpt:
        layout = ckpt.layout
        exclude = parse_quark_config(ckpt.config, ckpt.config_path).exclude
        storage = layer_storage(ckpt)
        rows.append(("amd/GLM-5-MXFP4 as released (eh_proj FP4)", exclude, storage))
        for label, options in (
            ("`convert` (--to bf16 --scope eh-proj)", ConvertOptions()),
            ("`convert --scope mtp` (whole MTP layer bf16)", ConvertOptions(scope="mtp")),
            ("`convert --to mxfp4` (FP4 kept, exclude list completed)", ConvertOptions(to="mxfp4")),
        ):
            plan = plan_conversion(ckpt, options)
            after = {
                m: ModuleStorage(m, FLOAT, "BF16", s.logical_shape)
                if options.to == "bf16" and (options.scope == "mtp" or m == "eh_proj")
                else s
                for m, s in storage.items()
            }
            rows.append((label, tuple(plan.config["quantization_config"]["exclude"]), after))
        bf16 = {m: ModuleStorage(m, FLOAT, "BF16", s.logical_shape) for m, s in storage.items()}
        prefix = layout.mtp_prefix()
        rows.append(
            (
                "GLM-5.2-MXFP4 style: MTP layer bf16, excluded by checkpoint names",
                exclude + tuple(prefix + m for m in storage),
                bf16,
            )
        )
    print("| checkpoint | " + " | ".join(c.label for c in COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for label, excl, stor in rows:
        print(f"| {label} | " + " | ".join(cell(evaluate(c, layout, tuple(excl), stor)) for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
