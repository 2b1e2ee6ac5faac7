"""The MXFP4 codec against amd-quark's own packer, dequantizer and quantizer."""

from __future__ import annotations

import pytest
import torch

from glm5conv import codec
from glm5conv.checkpoint import open_checkpoint
from glm5conv.errors import BadInputError

quark_config = pytest.importorskip("quark.torch.quantization.config.config")
from quark.torch.export.nn.modules.realquantizer import StaticScaledRealQuantizer  # noqa: E402
from quark.torch.quantization.file2file_quantization import _single_stage_quantize_weight  # noqa: E402
from quark.torch.utils.pack import Pack_fp4  # noqa: E402

SPEC = quark_config.OCP_MXFP4Spec(ch_axis=-1, is_dynamic=False).to_quantization_spec()


def quark_dequantize(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quark's import path: the real-quantized weight quantizer of a QParamsLinear."""
    quantizer = StaticScaledRealQuantizer(
        SPEC, None, False, True, torch.bfloat16, torch.device("cpu"), scale_shape=scale.shape
    )
    quantizer.scale = scale
    return quantizer(packed)


def quark_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quark's file-to-file writer, the one that most likely wrote amd/GLM-5-MXFP4."""
    out: dict[str, torch.Tensor] = {}
    _single_stage_quantize_weight(
        tensor=weight,
        tensor_name="m.weight",
        layer_name="m",
        weight_config=SPEC,
        quantized_tensors=out,
        safetensor_filename="f",
    )
    return out["m.weight"], out["m.weight_scale"]


def random_fp4(
    rows: int, cols: int, seed: int, scale_range: tuple[int, int] = (1, 253)
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=g)
    scale = torch.randint(*scale_range, (rows, cols // 32), dtype=torch.uint8, generator=g)
    return packed, scale


@pytest.mark.parametrize("seed", range(3))
def test_decode_is_bit_identical_to_quark_dequantization(seed: int) -> None:
    packed, scale = random_fp4(96, 512, seed, scale_range=(0, 253))
    reference = quark_dequantize(packed, scale)
    ours = codec.decode(packed, scale)
    assert ours.dtype == torch.bfloat16
    # Quark computes in float32: equal there means our bf16 values are exact, not rounded.
    assert torch.equal(reference, ours.float())
    assert codec.bf16_bits_equal(reference.to(torch.bfloat16), ours)
    assert (ours.view(torch.int16) == -(2**15)).any(), "negative zeros (code 8) must survive"


def test_decode_matches_quark_on_the_bundled_eh_proj(bundled) -> None:
    with open_checkpoint(bundled) as ckpt:
        packed = ckpt.read_tensor("model.layers.2.eh_proj.weight")
        scale = ckpt.read_tensor("model.layers.2.eh_proj.weight_scale")
    assert packed.shape == (64, 64) and scale.shape == (64, 4)
    assert torch.equal(quark_dequantize(packed, scale), codec.decode(packed, scale).float())


def test_nibble_order_matches_quark_unpack() -> None:
    packed, _ = random_fp4(8, 64, 7)
    unpacked = Pack_fp4("per_group", "fp4").unpack(packed, reorder=False)
    ones = torch.full((8, 2), 127, dtype=torch.uint8)  # scale 2^0
    assert torch.equal(codec.decode(packed, ones).float(), unpacked)
    # element 2k is the LOW nibble: byte 0x21 holds code 1 (0.5) then code 2 (1.0)
    byte = torch.full((1, 16), 0x21, dtype=torch.uint8)
    values = codec.decode(byte, torch.full((1, 1), 127, dtype=torch.uint8))
    assert values[0, :2].tolist() == [0.5, 1.0]


@pytest.mark.parametrize("magnitude", [-135, -128, -126, -120, -20, -8, 0, 8, 60, 125])
def test_encode_equals_quark_quantizer(magnitude: int) -> None:
    g = torch.Generator().manual_seed(magnitude + 1000)
    weight = (torch.randn(128, 256, generator=g) * 2.0**magnitude).to(torch.bfloat16)
    packed, scale = codec.encode(weight)
    ref_packed, ref_scale = quark_quantize(weight)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(scale, ref_scale)


def test_encode_ties_zeros_and_extremes_equal_quark() -> None:
    ties = torch.tensor(
        [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 0.0, -0.0, -0.25, -0.75, -5.0, 1e-30, -1e-30] * 2
    )
    weight = torch.zeros(6, 32)
    weight[:4] = ties
    weight[1] *= 2.0**-10
    weight[2] *= 2.0**10
    weight[3, 0] = 5.9  # block maximum with mantissa >= 1.75: the "even" rule rounds the exponent up
    weight[4] = -0.0  # an all-zero block: Quark stores scale byte 1, never 0
    weight[5] = 3.0e38  # rounds up past the float32 range: exponent clamped to 127
    weight = weight.to(torch.bfloat16)
    packed, scale = codec.encode(weight)
    ref_packed, ref_scale = quark_quantize(weight)
    assert torch.equal(packed, ref_packed) and torch.equal(scale, ref_scale)
    assert int(scale[4, 0]) == 1 and int(scale[5, 0]) == 254


def test_round_trip_bf16_mxfp4_bf16_is_value_exact() -> None:
    packed, scale = random_fp4(64, 256, 11, scale_range=(20, 240))
    values = codec.decode(packed, scale)
    again = codec.decode(*codec.encode(values))
    assert codec.bf16_bits_equal(values.abs(), again.abs())  # -0.0 re-encodes as +0.0, as in Quark
    assert torch.equal(values.float(), again.float())


def test_decode_rejects_scale_255_with_position() -> None:
    packed, scale = random_fp4(4, 64, 3)
    scale[2, 1] = 255
    with pytest.raises(BadInputError, match=r"w: scale byte 255 \(NaN in E8M0\) at row 12, group 1"):
        codec.decode(packed, scale, "w", row_offset=10)


def test_decode_rejects_overflow_but_accepts_largest_finite() -> None:
    packed = torch.full((2, 16), 0x77, dtype=torch.uint8)  # code 7 = 6.0 everywhere
    assert torch.isfinite(codec.decode(packed, torch.full((2, 1), 252, dtype=torch.uint8)).float()).all()
    scale = torch.full((2, 1), 252, dtype=torch.uint8)
    scale[1, 0] = 253
    with pytest.raises(BadInputError, match=r"row 1, group 0 \(scale byte 253\) overflows bf16"):
        codec.decode(packed, scale, "w")
    small = torch.full((1, 16), 0x33, dtype=torch.uint8)  # 1.5 * 2^127 is still finite
    assert torch.isfinite(codec.decode(small, torch.full((1, 1), 254, dtype=torch.uint8)).float()).all()


def test_encode_rejects_non_finite_and_bad_width() -> None:
    weight = torch.zeros(2, 64, dtype=torch.bfloat16)
    weight[1, 40] = float("nan")
    with pytest.raises(BadInputError, match="row 1, group 1 holds a NaN"):
        codec.encode(weight, "w")
    with pytest.raises(BadInputError, match="in_features 48 is not a multiple"):
        codec.encode(torch.zeros(2, 48, dtype=torch.bfloat16), "w")


def test_check_shapes() -> None:
    assert codec.check_shapes((8, 32), (8, 2), "w") == 64
    with pytest.raises(BadInputError, match=r"scale shape \[8, 3\] does not fit weight \[8, 32\]"):
        codec.check_shapes((8, 32), (8, 3), "w")
    with pytest.raises(BadInputError, match="in_features 40"):
        codec.check_shapes((8, 20), (8, 1), "w")
