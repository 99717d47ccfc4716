"""ggml tensor types and vectorized numpy dequantizers for the block formats GGUF files use.

Each quantized type stores a tensor row as a run of fixed-size blocks; a block holds `block_size`
values in `type_size` bytes. The dequantizers here take the raw bytes of any number of whole blocks
and return float32 values, following the reference C code in ggml (`dequantize_row_*`), with the
same float32 operation order so that results match llama.cpp and gguf-py bit for bit.

    values = dequantize(raw_bytes, GGMLType.Q4_K, shape=(rows, cols))
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable

import numpy as np

QK_K = 256  # values per K-quant super-block


class GGMLType(enum.IntEnum):
    """ggml type ids as written in a GGUF tensor table (subset that pjllm can read)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 30


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The little-endian fp16 at byte `start` of every block, as float32 [n_blocks, 1]."""
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)


def _low_high_nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., n] packed bytes -> [..., 2, n]: low nibbles first, then high nibbles."""
    return np.stack([qs & 0x0F, qs >> 4], axis=-2)


def _dequant_f32(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float32)


def _dequant_f16(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float16).astype(np.float32)


def _dequant_bf16(raw: np.ndarray) -> np.ndarray:
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    """34 bytes: fp16 d, 32 x int8 q.  y = d * q."""
    d = _f16(blocks, 0)
    q = blocks[:, 2:].view(np.int8).astype(np.float32)
    return q * d


def _dequant_q4_0(blocks: np.ndarray) -> np.ndarray:
    """18 bytes: fp16 d, 16 bytes of nibbles (low nibbles are values 0..15, high 16..31).
    y = (q - 8) * d."""
    d = _f16(blocks, 0)
    q = _low_high_nibbles(blocks[:, 2:]).reshape(-1, 32).astype(np.int8) - np.int8(8)
    return q.astype(np.float32) * d


def _dequant_q4_1(blocks: np.ndarray) -> np.ndarray:
    """20 bytes: fp16 d, fp16 m, 16 bytes of nibbles.  y = q * d + m."""
    d = _f16(blocks, 0)
    m = _f16(blocks, 2)
    q = _low_high_nibbles(blocks[:, 4:]).reshape(-1, 32).astype(np.float32)
    return q * d + m


def _q5_high_bits(qh_bytes: np.ndarray) -> np.ndarray:
    """[n, 4] bytes of a little-endian uint32 -> [n, 32] fifth bits (bit j is value j's)."""
    qh = qh_bytes.copy().view("<u4")  # [n, 1]
    return ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _dequant_q5_0(blocks: np.ndarray) -> np.ndarray:
    """22 bytes: fp16 d, uint32 of fifth bits, 16 bytes of nibbles.  y = (q - 16) * d."""
    d = _f16(blocks, 0)
    high = _q5_high_bits(blocks[:, 2:6])
    q = _low_high_nibbles(blocks[:, 6:]).reshape(-1, 32) | (high << 4)
    return (q.astype(np.int8) - np.int8(16)).astype(np.float32) * d


def _dequant_q5_1(blocks: np.ndarray) -> np.ndarray:
    """24 bytes: fp16 d, fp16 m, uint32 of fifth bits, 16 bytes of nibbles.  y = q * d + m."""
    d = _f16(blocks, 0)
    m = _f16(blocks, 2)
    high = _q5_high_bits(blocks[:, 4:8])
    q = _low_high_nibbles(blocks[:, 8:]).reshape(-1, 32) | (high << 4)
    return q.astype(np.float32) * d + m


def _k_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte, 6-bit scales and mins of Q4_K/Q5_K (ggml `get_scale_min_k4`).

    Returns float32 [n_blocks, 8] scales and [n_blocks, 8] mins.
    """
    lo, mid, hi = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _dequant_q4_k(blocks: np.ndarray) -> np.ndarray:
    """144 bytes: fp16 d, fp16 dmin, 12 bytes of scales/mins, 128 bytes of nibbles.

    Eight sub-blocks of 32; 64-value chunk i takes the low nibbles of qs[32i:32i+32] for
    sub-block 2i and the high nibbles for 2i+1.  y = (d * sc) * q - (dmin * m).
    """
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    dmin = _f16(blocks, 2)
    sc, mn = _k_scales_mins(blocks[:, 4:16])
    q = _low_high_nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).astype(np.float32)
    scale = (d * sc)[:, :, None]
    offset = (dmin * mn)[:, :, None]
    return (scale * q - offset).reshape(n, QK_K)


def _dequant_q5_k(blocks: np.ndarray) -> np.ndarray:
    """176 bytes: fp16 d, fp16 dmin, 12 bytes of scales/mins, 32 bytes of fifth bits, 128 bytes of
    nibbles.  As Q4_K, plus 16 * (bit s of qh[l]) for value l of sub-block s."""
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    dmin = _f16(blocks, 2)
    sc, mn = _k_scales_mins(blocks[:, 4:16])
    qh = blocks[:, 16:48]
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [n, 8, 32]
    low = _low_high_nibbles(blocks[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    q = (low | (high << 4)).astype(np.float32)
    scale = (d * sc)[:, :, None]
    offset = (dmin * mn)[:, :, None]
    return (scale * q - offset).reshape(n, QK_K)


def _dequant_q6_k(blocks: np.ndarray) -> np.ndarray:
    """210 bytes: 128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits), 16 int8 scales, fp16 d.

    Two halves of 128 values; in half h, value 32k + l (k < 4, l < 32) takes the low (k < 2) or
    high (k >= 2) nibble of ql[64h + 32(k % 2) + l], bits 2k..2k+1 of qh[32h + l], and scale
    sc[8h + 2k + l // 16].  y = d * sc * (q - 32).
    """
    n = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(n, 2, 2, 32)                       # [n, half, k % 2, l]
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)                     # [n, half, 1, l]
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32).reshape(n, 2, 4, 2, 1)
    d = _f16(blocks, 208).reshape(n, 1, 1, 1, 1)
    low = np.stack([ql & 0x0F, ql >> 4], axis=2).reshape(n, 2, 4, 32)  # k = 2 * nibble + k % 2
    high = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
    q = ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)
    return ((d * sc) * q.reshape(n, 2, 4, 2, 16)).reshape(n, QK_K)


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """How one ggml type is stored: `block_size` values in `type_size` bytes."""

    block_size: int
    type_size: int
    dequantize_blocks: Callable[[np.ndarray], np.ndarray]


# Plain float types are "blocks" of one value; their functions take the flat byte array.
FORMATS: dict[GGMLType, QuantFormat] = {
    GGMLType.F32: QuantFormat(1, 4, _dequant_f32),
    GGMLType.F16: QuantFormat(1, 2, _dequant_f16),
    GGMLType.BF16: QuantFormat(1, 2, _dequant_bf16),
    GGMLType.Q4_0: QuantFormat(32, 18, _dequant_q4_0),
    GGMLType.Q4_1: QuantFormat(32, 20, _dequant_q4_1),
    GGMLType.Q5_0: QuantFormat(32, 22, _dequant_q5_0),
    GGMLType.Q5_1: QuantFormat(32, 24, _dequant_q5_1),
    GGMLType.Q8_0: QuantFormat(32, 34, _dequant_q8_0),
    GGMLType.Q4_K: QuantFormat(QK_K, 144, _dequant_q4_k),
    GGMLType.Q5_K: QuantFormat(QK_K, 176, _dequant_q5_k),
    GGMLType.Q6_K: QuantFormat(QK_K, 210, _dequant_q6_k),
}


def ggml_type_name(type_id: int) -> str:
    """`Q4_K` for 12; `type 23` for an id this module does not know."""
    try:
        return GGMLType(type_id).name
    except ValueError:
        return f"type {type_id}"


def nbytes(ggml_type: GGMLType, n_values: int) -> int:
    """Bytes that `n_values` values of `ggml_type` occupy."""
    fmt = FORMATS[ggml_type]
    return n_values // fmt.block_size * fmt.type_size


# Dequantize this many blocks at a time, so temporaries stay a few MB whatever the tensor size.
_BLOCKS_PER_CHUNK = 1 << 16


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """Dequantize the raw bytes of one tensor to float32 of `shape` (numpy order: last axis fastest).

    `raw` is a uint8 array (for example a memmap slice) of exactly the tensor's bytes.
    Raises ValueError for an unsupported type or a byte count that does not fit the shape.
    """
    try:
        gtype = GGMLType(ggml_type)
    except ValueError:
        supported = ", ".join(t.name for t in FORMATS)
        raise ValueError(f"ggml tensor type {ggml_type} is not supported; supported: {supported}") from None
    fmt = FORMATS[gtype]
    n_values = int(np.prod(shape, dtype=np.int64))
    if shape and shape[-1] % fmt.block_size:
        raise ValueError(f"a {gtype.name} tensor's rows must be a multiple of {fmt.block_size} values; "
                         f"got shape {tuple(shape)}")
    expected = nbytes(gtype, n_values)
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if raw.size != expected:
        raise ValueError(f"{gtype.name} tensor of shape {tuple(shape)} needs {expected} bytes; got {raw.size}")
    if fmt.block_size == 1:
        return fmt.dequantize_blocks(raw).reshape(shape)
    blocks = raw.reshape(-1, fmt.type_size)
    out = np.empty((blocks.shape[0], fmt.block_size), dtype=np.float32)
    for start in range(0, blocks.shape[0], _BLOCKS_PER_CHUNK):
        stop = start + _BLOCKS_PER_CHUNK
        out[start:stop] = fmt.dequantize_blocks(blocks[start:stop])
    return out.reshape(shape)
