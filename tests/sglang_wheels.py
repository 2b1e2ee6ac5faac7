"""Released SGLang wheels for the tests, fetched once with pip into a cache, and light stubs to run
their draft-model construction code without SGLang's heavy (GPU) imports."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

VERSIONS = ("0.5.10.post1", "0.5.11", "0.5.15.post1", "0.5.16", "0.5.23")
CACHE = Path(os.environ.get("GLM5CONV_WHEEL_CACHE", Path.home() / ".cache" / "glm5conv" / "sglang-wheels"))
MEMBERS = ("sglang/srt/models/deepseek_nextn.py", "sglang/srt/layers/quantization/quark/utils.py")


def wheel(version: str) -> Path:
    """The sglang wheel of ``version`` (downloaded on first use); skips the test visibly if pip cannot."""
    found = sorted(CACHE.glob(f"sglang-{version}-*.whl"))
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"sglang=={version}", "-d", str(CACHE)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        found = sorted(CACHE.glob(f"sglang-{version}-*.whl"))
        if proc.returncode != 0 or not found:
            pytest.skip(f"sglang=={version} wheel could not be fetched: {proc.stderr.strip()[-200:]}")
    return found[0]


def unpack(version: str, dest: Path) -> Path:
    """The wheel's sglang files that glm5conv reads or patches, plus its dist-info, under ``dest``."""
    with zipfile.ZipFile(wheel(version)) as zf:
        for name in zf.namelist():
            if name in MEMBERS or (name.endswith(".dist-info/METADATA") and name.startswith("sglang-")):
                zf.extract(name, dest)
    return dest


class _StubMeta(type):
    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub()


class _Stub(metaclass=_StubMeta):
    """Anything SGLang's module imports that the draft's construction does not depend on."""

    def __init__(self, *args, **kwargs) -> None:
        """Takes any arguments and keeps none: nothing reads them back."""

    def __call__(self, *args, **kwargs):
        return _Stub()

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub()

    def __bool__(self) -> bool:
        return False

    def __iter__(self):
        return iter(())

    def keys(self):  # so that **stub() works
        return ()


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (_Stub,), {})
        setattr(self, name, value)
        return value


class ReplicatedLinear(nn.Module):
    """Allocates what SGLang's Quark MXFP4 scheme (or the unquantized method) would."""

    def __init__(self, input_size, output_size, bias=True, quant_config=None, prefix="", **kwargs) -> None:
        super().__init__()
        self.prefix = prefix
        self.quantized = quant_config is not None and quant_config.get_quant_method(self, prefix) == "mxfp4"
        if self.quantized:
            self.weight = nn.Parameter(
                torch.empty(output_size, input_size // 2, dtype=torch.uint8), requires_grad=False
            )
            self.weight_scale = nn.Parameter(
                torch.empty(output_size, input_size // 32, dtype=torch.uint8), requires_grad=False
            )
        else:
            self.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=torch.bfloat16), requires_grad=False)

    def forward(self, x):
        return x, None


class WeightsMapper:
    def __init__(self, orig_to_new_substr=None, **kwargs) -> None:
        self.orig_to_new_substr = orig_to_new_substr or {}

    def _map_name(self, key: str) -> str:
        for old, new in sorted(self.orig_to_new_substr.items(), key=lambda i: len(i[0]), reverse=True):
            if old in key:
                return key.replace(old, new, 1)
        return key


class DeepseekV3ForCausalLM(nn.Module):
    def determine_num_fused_shared_experts(self, *args, **kwargs) -> None:
        self.num_fused_shared_experts = 0


class QuarkConfig:
    """A Quark config whose layer decision is SGLang's own should_ignore_layer (from the wheel)."""

    def __init__(self, exclude: list[str], should_ignore_layer) -> None:
        self.exclude_layers = list(exclude)
        self.packed_modules_mapping = {
            "gate_up_proj": ["gate_proj", "up_proj"],
            "fused_qkv_a_proj_with_mqa": ["q_a_proj", "kv_a_proj_with_mqa"],
        }
        self._ignore = should_ignore_layer

    def get_name(self) -> str:
        return "quark"

    def get_quant_method(self, layer, prefix: str) -> str:
        return (
            "unquantized"
            if self._ignore(prefix, ignore=self.exclude_layers, fused_mapping=self.packed_modules_mapping)
            else "mxfp4"
        )


def load_nextn(root: Path):
    """Import ``root``'s deepseek_nextn.py with every other sglang module stubbed; returns
    (module, the wheel's real should_ignore_layer)."""
    saved = {k: v for k, v in sys.modules.items() if k == "sglang" or k.startswith("sglang.")}
    for k in saved:
        del sys.modules[k]

    class Finder:
        def find_spec(self, name, path=None, target=None):
            if name == "sglang" or name.startswith("sglang."):
                return importlib.util.spec_from_loader(name, self, is_package=True)
            return None

        def create_module(self, spec):
            module = _StubModule(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module) -> None:
            """Nothing to run: the stub module answers every attribute by itself."""

    finder = Finder()
    sys.meta_path.insert(0, finder)
    try:
        utils_spec = importlib.util.spec_from_file_location(
            "glm5conv_test_quark_utils", root / "sglang/srt/layers/quantization/quark/utils.py"
        )
        utils = importlib.util.module_from_spec(utils_spec)
        utils_spec.loader.exec_module(utils)
        import sglang.srt.layers.linear as linear
        import sglang.srt.layers.quantization.quark as quark_pkg
        import sglang.srt.models.deepseek_v2 as deepseek_v2
        import sglang.srt.models.utils as model_utils
        import sglang.srt.utils as srt_utils

        linear.ReplicatedLinear = ReplicatedLinear
        model_utils.WeightsMapper = WeightsMapper
        deepseek_v2.DeepseekV3ForCausalLM = DeepseekV3ForCausalLM
        srt_utils.add_prefix = lambda name, prefix: name if not prefix else f"{prefix}.{name}"
        sys.modules["sglang.srt.layers.quantization.quark.utils"] = utils
        quark_pkg.utils = utils
        spec = importlib.util.spec_from_file_location(
            "glm5conv_test_deepseek_nextn", root / "sglang/srt/models/deepseek_nextn.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module, utils.should_ignore_layer
    finally:
        # the stub modules stay in sys.modules: the patched code imports from them when it runs
        sys.meta_path.remove(finder)
        sys.modules.update(saved)
