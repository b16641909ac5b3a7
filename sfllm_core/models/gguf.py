"""A GGUF's quantized blocks as grouped integers, and the CPU kernel format each one is served in.

Every block type read here stores w = q * scale + offset over groups of 16 or 32 weights of a row:

| type | group | q | scale | offset |
|---|---|---|---|---|
| Q4_0 | 32 | 0..15 - 8 | d | - |
| Q4_1 | 32 | 0..15 | d | m |
| Q5_0 | 32 | 0..31 - 16 | d | - |
| Q5_1 | 32 | 0..31 | d | m |
| Q8_0 | 32 | -127..127 | d | - |
| Q4_K | 32 (8 per 256) | 0..15 | d * sc | -dmin * m |
| Q5_K | 32 (8 per 256) | 0..31 | d * sc | -dmin * m |
| Q6_K | 16 (16 per 256) | 0..63 - 32 | d * sc | - |

(d, dmin, m: float16 of the block; sc, m of the K types: 6-bit (Q4_K/Q5_K) or int8 (Q6_K) per
sub-block.) `grouped_ints` decodes them into a GroupedIntWeight, bit-identical to the gguf
package's dequantization. `served_weight` picks the kernel that serves decode-sized batches:
4-bit types go to torch's int4 kernel as they are (scale and zero point per group of 32); Q5_0 and
Q8_0 stay the file's blocks (GgufBlockWeight) and the other wider types grouped int8, both exact and
served by our CPU kernels (kernels/cpu_grouped_gemm.py) with float32 activations. Where those do not
build, wider types go to torch's int8 kernel with one scale per row, re-quantized from the exact
weights (~1% weight error). The logits' projection is the exception: its decode pass only ranks the
vocabulary for TopRefinedWeight, so wider blocks are re-quantized to 4 bits for the int4 kernel.
"""

import numpy as np
import torch

from sfllm_core.kernels import cpu_grouped_gemm
from sfllm_core.layers.quantization import (
    CPU_QUANTIZED_MAX_ROWS,
    GroupedIntWeight,
    Int4PackedWeight,
    Int8ChannelWeight,
    QuantizedWeight,
    RowSwitchWeight,
    TopRefinedWeight,
)

QK_K = 256
# The logits' ranking pass (logits_ranking_weight): int4 groups, and how many of its largest outputs
# per row TopRefinedWeight recomputes exactly.
LOGITS_GROUP = 32
LOGITS_TOP = 256
# Up to this many rows the logits are ranked through int4; more go through the exact grouped kernel,
# which reads twice the bytes but does not slow down with rows as torch's int4 kernel does (batch-8
# decode of Gemma 270M, one thread, A/B: 69.8 -> 76.8 tok/s) and needs no refinement.
LOGITS_RANKED_MAX_ROWS = 4


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block, as float32 [..., 1]."""
    return np.ascontiguousarray(blocks[..., start : start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes [..., n] -> [..., 2n]: the n low nibbles, then the n high ones (ggml's order in a block)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(packed: np.ndarray, count: int) -> np.ndarray:
    """Little-endian bit i of the bytes [..., count / 8], as uint8 [..., count]."""
    return np.unpackbits(packed, axis=-1, count=count, bitorder="little")


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: the 12 bytes of 6-bit (scale, min) pairs of 8 sub-blocks -> two [..., 8] uint8 arrays."""
    a, b, c = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=-1)
    return sc, mn


def _q4_0(b: np.ndarray):
    return (_nibbles(b[..., 2:18]).astype(np.int8) - 8), _f16(b, 0), None


def _q4_1(b: np.ndarray):
    return _nibbles(b[..., 4:20]).astype(np.int8), _f16(b, 0), _f16(b, 2)


def _q5_0(b: np.ndarray):
    q = _nibbles(b[..., 6:22]) | (_bits(b[..., 2:6], 32) << 4)
    return q.astype(np.int8) - 16, _f16(b, 0), None


def _q5_1(b: np.ndarray):
    q = _nibbles(b[..., 8:24]) | (_bits(b[..., 4:8], 32) << 4)
    return q.astype(np.int8), _f16(b, 0), _f16(b, 2)


def _q8_0(b: np.ndarray):
    return np.ascontiguousarray(b[..., 2:34]).view(np.int8), _f16(b, 0), None


def _q4_k(b: np.ndarray):
    sc, mn = _k_scales(b[..., 4:16])
    qs = b[..., 16:144].reshape(*b.shape[:-1], 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(*b.shape[:-1], QK_K)
    return q.astype(np.int8), _f16(b, 0) * sc.astype(np.float32), -(_f16(b, 2) * mn.astype(np.float32))


def _q5_k(b: np.ndarray):
    sc, mn = _k_scales(b[..., 4:16])
    qh = b[..., 16:48].reshape(*b.shape[:-1], 1, 32)
    qs = b[..., 48:176].reshape(*b.shape[:-1], 4, 32)
    low = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(*b.shape[:-1], 8, 32)
    high = (qh >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # sub-block j takes bit j of each qh byte
    q = (low | (high << 4)).reshape(*b.shape[:-1], QK_K)
    return q.astype(np.int8), _f16(b, 0) * sc.astype(np.float32), -(_f16(b, 2) * mn.astype(np.float32))


def _q6_k(b: np.ndarray):
    lead = b.shape[:-1]
    ql = b[..., 0:128].reshape(*lead, 2, 1, 64)
    qh = b[..., 128:192].reshape(*lead, 2, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-2).reshape(*lead, 2, 4, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3
    q = (low | (high << 4)).reshape(*lead, QK_K).astype(np.int8) - 32
    sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)
    return q, _f16(b, 208) * sc, None


# type name -> (weights per block, bytes per block, decoder of blocks [..., bytes] -> (q, scale, offset)).
_DECODERS = {
    "Q4_0": (32, 18, _q4_0),
    "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0),
    "Q5_1": (32, 24, _q5_1),
    "Q8_0": (32, 34, _q8_0),
    "Q4_K": (QK_K, 144, _q4_k),
    "Q5_K": (QK_K, 176, _q5_k),
    "Q6_K": (QK_K, 210, _q6_k),
}


def can_decode(type_name: str) -> bool:
    return type_name in _DECODERS


def grouped_ints(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> GroupedIntWeight:
    """A 2-D GGUF tensor's raw blocks (uint8 [rows, bytes per row]) as a GroupedIntWeight of shape (rows, cols)."""
    per_block, nbytes, decode = _DECODERS[type_name]
    rows, cols = shape
    blocks = np.asarray(data, dtype=np.uint8).reshape(rows, cols // per_block, nbytes)
    q, scale, offset = decode(blocks)
    q = torch.from_numpy(np.ascontiguousarray(q).reshape(rows, cols))
    # The scales: one per group of a block, flattened over the row's blocks.
    scale = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(rows, -1))
    if offset is not None:
        offset = torch.from_numpy(np.ascontiguousarray(offset, dtype=np.float32).reshape(rows, -1))
    return GroupedIntWeight(q, scale, offset)


class GgufBlockWeight(QuantizedWeight):
    """A weight kept as the GGUF's own Q5_0 or Q8_0 blocks (uint8 [N, K / 32 * block bytes]), exact.

    Decode-sized float32 inputs run through the CPU kernel that reads the blocks as stored
    (`cpu_grouped_gemm.gguf_block_mm`): Q5_0 is 0.69 bytes per weight, against 1.0 for int8.
    """

    kind = "gguf_blocks"

    def __init__(self, blocks: torch.Tensor, *, type_name: str) -> None:
        per_block = cpu_grouped_gemm.GGUF_BLOCK_TYPES[type_name][1]
        super().__init__(blocks.shape[0], blocks.shape[1] // per_block * 32)
        assert blocks.dtype == torch.uint8 and blocks.shape[1] % per_block == 0
        self.type_name = type_name
        self.register_buffer("blocks", blocks)

    @classmethod
    def _buffer_names(cls) -> tuple[str, ...]:
        return ("blocks",)

    @classmethod
    def _init_args(cls, meta: dict) -> dict:
        return {"type_name": meta["type_name"]}

    def to_tensors(self) -> tuple[dict, dict[str, torch.Tensor]]:
        meta, tensors = super().to_tensors()
        return {**meta, "type_name": self.type_name}, tensors

    def exact(self, ids: torch.Tensor | None = None) -> GroupedIntWeight:
        blocks = self.blocks if ids is None else self.blocks[ids]
        return grouped_ints(blocks.numpy(), self.type_name, (blocks.shape[0], self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.dtype == torch.float32 and not x.is_cuda and cpu_grouped_gemm.available():
            return cpu_grouped_gemm.gguf_block_mm(x, self.blocks, self.type_name)
        return torch.nn.functional.linear(x, self.dequantize(x.dtype))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.exact().dequantize(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.exact(ids.reshape(-1)).dequantize(dtype).view(*ids.shape, self.in_features)

    def as_q8_0(self) -> "GgufBlockWeight":
        """The same weight in Q8_0 blocks (exact: a Q5_0 value and its scale fit an int8 block as they are)."""
        if self.type_name == "Q8_0":
            return self
        blocks = self.blocks.view(self.out_features, -1, 22)
        exact = self.exact()
        q = exact.q.view(self.out_features, -1, 32).view(torch.uint8)
        return GgufBlockWeight(torch.cat([blocks[..., :2], q], dim=-1).reshape(self.out_features, -1), type_name="Q8_0")

    @classmethod
    def concat(cls, parts: list["QuantizedWeight"]) -> "GgufBlockWeight":
        if len({p.type_name for p in parts}) > 1:
            parts = [p.as_q8_0() for p in parts]
        return cls(torch.cat([p.blocks for p in parts]), type_name=parts[0].type_name)

    def extra_repr(self) -> str:
        return f"{self.out_features}, {self.in_features}, {self.type_name}"


def served_weight(
    exact: GroupedIntWeight, logits: bool = False, blocks: np.ndarray | None = None, type_name: str = ""
) -> QuantizedWeight:
    """The format a linear layer holds: decode-sized batches through a CPU kernel, prefill exact.

    logits: the weight projects to logits (the output projection, or the embedding tied to it), whose
    top entries are then recomputed exactly (TopRefinedWeight). blocks: the tensor's raw GGUF blocks,
    which Q5_0 and Q8_0 weights are served from as they are where the CPU kernel builds.
    """
    if not logits:
        if blocks is not None and type_name in cpu_grouped_gemm.GGUF_BLOCK_TYPES and cpu_grouped_gemm.available():
            # A copy: the GGUF's blocks are a read-only view of the memory-mapped file.
            raw = torch.from_numpy(np.array(blocks, dtype=np.uint8).reshape(exact.out_features, -1))
            return RowSwitchWeight(GgufBlockWeight(raw, type_name=type_name), exact, max_rows=CPU_QUANTIZED_MAX_ROWS)
        return RowSwitchWeight(decode_weight(exact), exact, max_rows=CPU_QUANTIZED_MAX_ROWS)
    rows = LOGITS_RANKED_MAX_ROWS if exact._kernel() else CPU_QUANTIZED_MAX_ROWS
    return TopRefinedWeight(RowSwitchWeight(logits_ranking_weight(exact), exact, max_rows=rows), top=LOGITS_TOP)


def logits_ranking_weight(exact: GroupedIntWeight) -> QuantizedWeight:
    """The logits' decode-time projection: only ranks rows for TopRefinedWeight, so it may be lossy.

    4-bit blocks go to the int4 kernel as they are; wider ones (Gemma's tied Q8_0 embedding) are
    re-quantized to 4 bits per group of 32 (~8% relative weight error) for the int4 kernel, which
    reads half the bytes of the int8 one (7.6 against 15.3 ms for 262,144 x 640 at one row).
    """
    if _fits_int4(exact) or exact.out_features % 16 or exact.in_features % LOGITS_GROUP:
        return decode_weight(exact)
    return Int4PackedWeight.from_dense(exact.dequantize(), group_size=LOGITS_GROUP)


def _fits_int4(exact: GroupedIntWeight) -> bool:
    """At most 16 levels per group of 32 or more, in rows torch's int4 packing takes: exact in the int4 kernel."""
    q = exact.q
    return int(q.max()) - int(q.min()) <= 15 and exact.group_size >= 32 and exact.out_features % 16 == 0


def decode_weight(exact: GroupedIntWeight) -> QuantizedWeight:
    """torch's int4 kernel for weights of 16 levels per group of 32 or more, else its int8 kernel (per row)."""
    q = exact.q
    low = int(q.min())
    if _fits_int4(exact):
        # q in [low, low + 15]: shift into 0..15, folding low * scale into the offset.
        offset = low * exact.scale if exact.offset is None else exact.offset + low * exact.scale
        return Int4PackedWeight.from_ints((q.to(torch.int16) - low).to(torch.uint8), exact.scale, offset)
    if exact._kernel():
        return exact  # its own grouped int8 kernel: exact, where torch's int8 kernel has one scale per row
    return Int8ChannelWeight.from_dense(exact.dequantize())
