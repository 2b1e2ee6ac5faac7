"""MXFP4 as Quark stores it: decode to bf16 exactly, encode exactly as Quark's quantizer does.

Layout (FACTS.md §2): a Linear [out, in] is ``weight`` uint8 [out, in/2] and ``weight_scale``
uint8 [out, in/32]. Element 2k is the low nibble of byte k, element 2k+1 the high nibble.
A nibble is an E2M1 code (bit 3 is the sign); a scale byte s means 2^(s-127).

Every decoded value ``code * 2^(s-127)`` is a power of two times a 2-bit mantissa, so it is
exactly representable in bf16 unless it overflows; the decoder refuses scale byte 255 and any
block that would overflow rather than writing inf. All functions work on a block of rows so
callers can stream a tensor in bounded memory.
"""

from __future__ import annotations

import torch

from glm5conv.errors import BadInputError

GROUP_SIZE = 32
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
SCALE_NAN = 255
# 6 * 2^(252-127) = 1.5 * 2^127 is the largest block maximum that stays finite in bf16.
LARGEST_SAFE_SCALE = 252
DECODE_BLOCK_VALUES = 1 << 21


def _code_table() -> torch.Tensor:
    """bf16 bit patterns of the 16 codes (codes 8..15 are the negatives, 8 is -0.0)."""
    values = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.bfloat16)
    return values.view(torch.int16).to(torch.int32) & 0xFFFF


def _byte_table() -> torch.Tensor:
    """byte -> the two bf16 values it packs, as one little-endian int32 (low nibble first)."""
    codes = _code_table()
    byte = torch.arange(256)
    return (codes[byte & 0xF] | (codes[byte >> 4] << 16)).to(torch.int32)


_BYTE_TABLE = _byte_table()
# 2^(s-127) for every byte; 2^-127 is a bf16 subnormal, still exact. Entry 255 is never used.
_SCALE_TABLE = torch.pow(2.0, torch.arange(256, dtype=torch.float64) - 127).to(torch.bfloat16)


def check_shapes(packed_shape: tuple[int, ...], scale_shape: tuple[int, ...], what: str) -> int:
    """Validate a packed weight and its scale; returns in_features."""
    if len(packed_shape) != 2 or len(scale_shape) != 2:
        raise BadInputError(
            f"{what}: MXFP4 weight and scale must be 2-D, found {list(packed_shape)} and {list(scale_shape)}"
        )
    rows, half = packed_shape
    in_features = 2 * half
    if in_features % GROUP_SIZE:
        raise BadInputError(f"{what}: in_features {in_features} is not a multiple of the MXFP4 group size {GROUP_SIZE}")
    if tuple(scale_shape) != (rows, in_features // GROUP_SIZE):
        raise BadInputError(
            f"{what}: scale shape {list(scale_shape)} does not fit weight {list(packed_shape)} "
            f"(expected [{rows}, {in_features // GROUP_SIZE}])"
        )
    return in_features


def decode(packed: torch.Tensor, scale: torch.Tensor, what: str = "weight", row_offset: int = 0) -> torch.Tensor:
    """Dequantize rows: uint8 [R, K/2] + uint8 [R, K/32] -> bf16 [R, K], bit-exact.

    ``row_offset`` only makes error messages point at the right row of the whole tensor.
    """
    rows, half = packed.shape
    groups = scale.shape[1]
    _reject_nan_scales(scale, what, row_offset)
    out = torch.empty(rows, groups, GROUP_SIZE, dtype=torch.bfloat16)
    # Blocks of ~1 M values keep the lookup's int64 indices and the product in the CPU caches
    # (about 2.5x faster than one pass over a 75 M-value eh_proj).
    step = max(1, DECODE_BLOCK_VALUES // max(1, 2 * half))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        values = torch.take(_BYTE_TABLE, packed[start:stop].to(torch.int64)).view(torch.bfloat16)
        torch.mul(
            values.view(stop - start, groups, GROUP_SIZE),
            _SCALE_TABLE[scale[start:stop].to(torch.int64)].unsqueeze(-1),
            out=out[start:stop],
        )
    if rows and int(scale.max()) > LARGEST_SAFE_SCALE:
        bad = torch.isinf(out).any(-1).nonzero()
        if len(bad):
            r, g = (int(v) for v in bad[0])
            raise BadInputError(
                f"{what}: row {r + row_offset}, group {g} (scale byte {int(scale[r, g])}) overflows bf16"
            )
    return out.view(rows, 2 * half)


def _reject_nan_scales(scale: torch.Tensor, what: str, row_offset: int) -> None:
    bad = (scale == SCALE_NAN).nonzero()
    if len(bad):
        r, g = (int(v) for v in bad[0])
        raise BadInputError(f"{what}: scale byte 255 (NaN in E8M0) at row {r + row_offset}, group {g}")


def check_scales(scale: torch.Tensor, what: str, row_offset: int = 0) -> None:
    """Scale-only validation for FP4 tensors that are kept as they are."""
    _reject_nan_scales(scale, what, row_offset)


def encode(weight: torch.Tensor, what: str = "weight", row_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize bf16 rows [R, K] to (uint8 [R, K/2], uint8 [R, K/32]) as Quark does.

    Shared exponent (Quark's default ``scale_calculation_mode="even"``): round the block's
    absolute maximum to one mantissa bit (upwards from 1.75 * 2^e), take floor(log2) - 2,
    clamp to [-127, 127]. Quark never stores byte 0: such blocks (all zero, or below 2^-125)
    are divided by 2^-127 but stored with byte 1, and we do the same.
    Elements: x / 2^e rounded half-to-even on the E2M1 grid, saturating at 6; a value that
    rounds to zero is +0 (code 0) whatever its sign, as Quark writes it.
    """
    rows, k = weight.shape
    if k % GROUP_SIZE:
        raise BadInputError(f"{what}: in_features {k} is not a multiple of the MXFP4 group size {GROUP_SIZE}")
    x = weight.to(torch.float32).view(rows, k // GROUP_SIZE, GROUP_SIZE)
    if not torch.isfinite(x).all():
        r, g = (int(v) for v in (~torch.isfinite(x)).any(-1).nonzero()[0])
        raise BadInputError(f"{what}: row {r + row_offset}, group {g} holds a NaN or infinity; cannot quantize")
    amax_bits = x.abs().amax(-1).view(torch.int32)
    rounded = ((amax_bits + (1 << 21)) & 0x7F800000) >> 23  # biased exponent after rounding
    exponent = torch.where(rounded == 0xFF, 127, rounded - 127 - 2)  # rounding up to inf: clamped to 2^127
    exponent = exponent.clamp(-127, 127)
    # Quark divides by 2^-127 for the tiniest blocks but never stores byte 0 (it writes 1).
    scale_bytes = (exponent + 127).clamp(min=1).to(torch.uint8)
    q = x / torch.pow(2.0, exponent.to(torch.float32)).unsqueeze(-1)
    magnitude = q.abs()
    code = (
        (magnitude > 0.25).to(torch.uint8)
        + (magnitude >= 0.75)
        + (magnitude > 1.25)
        + (magnitude >= 1.75)
        + (magnitude > 2.5)
        + (magnitude >= 3.5)
        + (magnitude > 5.0)
    )
    code = code | ((torch.signbit(q) & (code != 0)).to(torch.uint8) << 3)
    code = code.view(rows, k // 2, 2)
    packed = code[..., 0] | (code[..., 1] << 4)
    return packed.contiguous(), scale_bytes


def bf16_bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (so -0.0 != 0.0 and NaN patterns compare), the converter's notion of 'exact'."""
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))
