"""Quantized weight formats: a projection's weight stored compressed, each format with its own matmul.

A format is an nn.Module holding its tensors as buffers; `Linear.from_weight` puts one where the
dense weight would be, so `linear.weight(x)` is x @ W^T whatever the storage. Formats on the CPU:

- GroupedIntWeight: small integers with a scale and an offset per group of a row, exactly as GGUF
  blocks store them (w = q * scale + offset). Exact; decode-sized inputs go through the CPU grouped
  int8 kernel (kernels/cpu_grouped_gemm.py) where it builds, larger ones through a float32 GEMM on the
  dequantized weight (prefill); it gives exact rows for an embedding lookup.
- Int4PackedWeight: torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`), groups of 32-256
  with a scale and a zero point each, activations in bfloat16.
- Int8ChannelWeight: torch's CPU int8 kernel (`_weight_int8pack_mm`), one scale per output row.
- RowSwitchWeight: decode-sized inputs through one format, larger ones through another.
- TopRefinedWeight: an output projection (logits) whose largest outputs are redone exactly, so a
  lossy kernel format (Int4PackedWeight.from_dense) may rank them.

A new format (FP8 on Hopper, say) subclasses QuantizedWeight: forward, dequantize, concat and the
to_tensors / from_tensors pair that lets a loader cache it.
"""

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from sfllm_core.kernels import cpu_grouped_gemm

# Where the CPU weight-only kernels stop paying, measured on 2 cores (torch 2.13, Gemma 3 270M's
# 640 x 2048 projections): they run a row at a time, dequantized float32 GEMMs are ahead past ~16 rows.
CPU_QUANTIZED_MAX_ROWS = 16
# torch's CPU int4 packing works on blocks of this many output rows (and needs a multiple of 16).
PACK_BLOCK_ROWS = 64


class QuantizedWeight(nn.Module):
    """A weight [out_features, in_features] in a storage format; forward(x) is x @ W^T in x's dtype."""

    kind: ClassVar[str]
    _kinds: ClassVar[dict[str, type["QuantizedWeight"]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            QuantizedWeight._kinds[cls.kind] = cls

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight this format stands for."""
        raise NotImplementedError

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense rows ids (any shape) of the weight, for an embedding lookup: [*ids.shape, in_features]."""
        return self.dequantize(dtype)[ids]

    @classmethod
    def concat(cls, parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """One weight whose rows are the parts' rows in order (merged q|k|v, gate|up)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def to_tensors(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able description, tensors) from which `QuantizedWeight.from_tensors` rebuilds it."""
        return {"kind": self.kind, "shape": list(self.shape)}, dict(self.named_buffers())

    @staticmethod
    def from_tensors(meta: dict, tensors: dict[str, torch.Tensor]) -> "QuantizedWeight":
        cls = QuantizedWeight._kinds[meta["kind"]]
        return cls._from_tensors(meta, tensors)

    @classmethod
    def _from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "QuantizedWeight":
        return cls(*(tensors[name] for name in cls._buffer_names()), **cls._init_args(meta))

    @classmethod
    def _buffer_names(cls) -> tuple[str, ...]:
        raise NotImplementedError

    @classmethod
    def _init_args(cls, meta: dict) -> dict:
        return {}

    def extra_repr(self) -> str:
        return f"{self.out_features}, {self.in_features}"


class GroupedIntWeight(QuantizedWeight):
    """w[n, k] = q[n, k] * scale[n, k // g] + offset[n, k // g]: GGUF's blocks as they are, exact.

    q is int8 (a 4-, 5-, 6- or 8-bit block value); scale and offset are float32 (offset may be
    absent: symmetric blocks). Dequantizing computes q * scale + offset in float32, the same
    operations in the same order as the gguf package, so the result is bit-identical to it.
    """

    kind = "grouped_int"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None) -> None:
        super().__init__(*q.shape)
        assert q.dtype == torch.int8 and q.shape[1] % scale.shape[1] == 0 and scale.shape[0] == q.shape[0]
        self.group_size = q.shape[1] // scale.shape[1]
        self.register_buffer("q", q)
        self.register_buffer("scale", scale.float())
        self.register_buffer("offset", None if offset is None else offset.float())

    @classmethod
    def _buffer_names(cls) -> tuple[str, ...]:
        return ("q", "scale", "offset")

    @classmethod
    def _from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "GroupedIntWeight":
        return cls(tensors["q"], tensors["scale"], tensors.get("offset"))

    def to_tensors(self) -> tuple[dict, dict[str, torch.Tensor]]:
        meta, tensors = super().to_tensors()
        return meta, {k: v for k, v in tensors.items() if v is not None}

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        flat = ids.reshape(-1)
        out = self._dequantize(self.q[flat], self.scale[flat], None if self.offset is None else self.offset[flat])
        return out.to(dtype).view(*ids.shape, self.in_features)

    def _dequantize(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        n, g = q.shape[0], self.group_size
        w = q.view(n, -1, g).float() * scale[:, :, None]
        if offset is not None:
            w = w + offset[:, :, None]
        return w.view(n, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._dequantize(self.q, self.scale, self.offset).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.dtype == torch.float32 and x.shape[0] <= cpu_grouped_gemm.MAX_ROWS and self._kernel():
            # Decode-sized: the weight read once as it is stored (kernels/cpu_grouped_gemm.py).
            return cpu_grouped_gemm.grouped_int8_mm(x, self.q, self.scale, self.offset)
        return F.linear(x, self.dequantize(x.dtype))

    def _kernel(self) -> bool:
        return (
            not self.q.is_cuda
            and self.group_size in cpu_grouped_gemm.GROUP_SIZES
            and self.in_features % 16 == 0
            and cpu_grouped_gemm.available()
        )

    def regrouped(self, group_size: int) -> "GroupedIntWeight":
        """The same weight with scale and offset repeated over groups of group_size (a divisor of ours)."""
        if group_size == self.group_size:
            return self
        assert self.group_size % group_size == 0
        r = self.group_size // group_size
        offset = None if self.offset is None else self.offset.repeat_interleave(r, dim=1)
        return GroupedIntWeight(self.q, self.scale.repeat_interleave(r, dim=1), offset)

    @classmethod
    def concat(cls, parts: list["QuantizedWeight"]) -> "GroupedIntWeight":
        assert all(isinstance(p, GroupedIntWeight) and p.group_size == parts[0].group_size for p in parts)
        has_offset = [p.offset is not None for p in parts]
        offsets = None
        if any(has_offset):
            offsets = torch.cat([p.offset if p.offset is not None else torch.zeros_like(p.scale) for p in parts])
        return cls(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), offsets)

    def extra_repr(self) -> str:
        return f"{self.out_features}, {self.in_features}, group_size={self.group_size}"


class Int4PackedWeight(QuantizedWeight):
    """torch's CPU int4 weight-only format: w = (q - 8) * scale + zero per group, q in 0..15.

    `_convert_weight_to_int4pack_for_cpu` packs q [N, K] into uint8 [N, K / 2]; the kernel reads
    scales_and_zeros [K / g, N, 2] in the activation's dtype. Activations go in as bfloat16: the
    kernel's float32 path runs ~30x slower (490 ms against 15 ms for 262144 x 640 at one row).
    """

    kind = "int4_packed"
    activation_dtype = torch.bfloat16

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, *, group_size: int) -> None:
        super().__init__(packed.shape[0], packed.shape[1] * 2)
        assert group_size in (32, 64, 128, 256) and self.in_features % group_size == 0
        self.group_size = group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(self.activation_dtype))

    @classmethod
    def from_ints(cls, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None) -> "Int4PackedWeight":
        """From w = q * scale + offset per group (q in 0..15, scale and offset [N, K / g]), as GGUF's Q4_K/Q4_0/Q4_1."""
        assert int(q.min()) >= 0 and int(q.max()) <= 15
        group_size = q.shape[1] // scale.shape[1]
        scale = scale.float()
        # The kernel centres q on 8: q * s + o = (q - 8) * s + (o + 8 s).
        zero = 8 * scale if offset is None else offset.float() + 8 * scale
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()
        return cls(packed, scales_and_zeros, group_size=group_size)

    @classmethod
    def from_dense(cls, w: torch.Tensor, *, group_size: int = 32) -> "Int4PackedWeight":
        """Asymmetric 16-level quantization per group of group_size (lossy), scale and zero rounded to bfloat16 first.

        For a weight served only approximately (the logits' ranking pass of TopRefinedWeight): q is
        chosen for the rounded scale and zero the kernel will read, so they add no error of their own.
        """
        n, k = w.shape
        g = w.float().reshape(n, k // group_size, group_size)
        low, high = g.amin(dim=-1), g.amax(dim=-1)
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        scale = scale.to(cls.activation_dtype).float()
        zero = (low + 8 * scale).to(cls.activation_dtype).float()  # w = (q - 8) * scale + zero
        q = torch.round((g - zero[:, :, None]) / scale[:, :, None] + 8).clamp(0, 15)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n, k).to(torch.int32).contiguous(), 1)
        scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()
        return cls(packed, scales_and_zeros, group_size=group_size)

    @classmethod
    def _buffer_names(cls) -> tuple[str, ...]:
        return ("packed", "scales_and_zeros")

    @classmethod
    def _init_args(cls, meta: dict) -> dict:
        return {"group_size": meta["group_size"]}

    def to_tensors(self) -> tuple[dict, dict[str, torch.Tensor]]:
        meta, tensors = super().to_tensors()
        # The packed layout is torch's own: a cache written by another version must not be trusted.
        return {**meta, "group_size": self.group_size, "torch": torch.__version__}, tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(self.activation_dtype), self.packed, self.group_size, self.scales_and_zeros
        )
        return y.to(x.dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # The packed layout is opaque: run the kernel on the identity, in float32 (slow, exact).
        eye = torch.eye(self.in_features, dtype=torch.float32)
        w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.packed, self.group_size, self.scales_and_zeros.float()
        )
        return w_t.t().contiguous().to(dtype)

    def ints(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q in 0..15 [N, K], scale, zero [N, K / g]) back from the packed weight, exactly."""
        sz = self.scales_and_zeros.float()
        scale, zero = sz[..., 0].t(), sz[..., 1].t()
        g = self.group_size
        w = self.dequantize().view(self.out_features, -1, g)
        safe = torch.where(scale == 0, 1.0, scale)[:, :, None]
        q = torch.round((w - zero[:, :, None]) / safe + 8).clamp(0, 15).to(torch.uint8)
        return q.view(self.out_features, self.in_features), scale, zero

    @classmethod
    def concat(cls, parts: list["QuantizedWeight"]) -> "Int4PackedWeight":
        assert all(p.group_size == parts[0].group_size for p in parts)
        if all(p.out_features % PACK_BLOCK_ROWS == 0 for p in parts):
            # The CPU packing keeps each block of 64 output rows to itself: such blocks concatenate.
            return cls(
                torch.cat([p.packed for p in parts]),
                torch.cat([p.scales_and_zeros for p in parts], dim=1),
                group_size=parts[0].group_size,
            )
        q, scale, zero = (torch.cat(t) for t in zip(*(p.ints() for p in parts)))
        return cls.from_ints(q, scale, zero - 8 * scale)

    def extra_repr(self) -> str:
        return f"{self.out_features}, {self.in_features}, group_size={self.group_size}"


class Int8ChannelWeight(QuantizedWeight):
    """torch's CPU int8 weight-only format: w[n, k] = q[n, k] * scale[n], activations in bfloat16."""

    kind = "int8_channel"
    activation_dtype = torch.bfloat16

    def __init__(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__(*q.shape)
        self.register_buffer("q", q)
        self.register_buffer("scales", scales.to(self.activation_dtype))

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> "Int8ChannelWeight":
        """Symmetric per-row quantization; the scale is rounded to bfloat16 first so q is chosen for it."""
        w = w.float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        scales = scales.to(cls.activation_dtype).float()
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scales)

    @classmethod
    def _buffer_names(cls) -> tuple[str, ...]:
        return ("q", "scales")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x.to(self.activation_dtype), self.q, self.scales).to(x.dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.float() * self.scales.float()[:, None]).to(dtype)

    @classmethod
    def concat(cls, parts: list["QuantizedWeight"]) -> "Int8ChannelWeight":
        return cls(torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]))


class RowSwitchWeight(QuantizedWeight):
    """Inputs of up to max_rows rows through `decode`, larger ones (prefill) through `prefill`."""

    kind = "row_switch"

    def __init__(self, decode: QuantizedWeight, prefill: QuantizedWeight, *, max_rows: int) -> None:
        super().__init__(*decode.shape)
        assert decode.shape == prefill.shape
        self.decode, self.prefill, self.max_rows = decode, prefill, max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] > self.max_rows:
            return self.prefill(x)
        return self.decode(x)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.prefill.dequantize(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.prefill.rows(ids, dtype)

    @classmethod
    def concat(cls, parts: list["QuantizedWeight"]) -> "RowSwitchWeight":
        prefill = concat_weights([p.prefill for p in parts])
        # One format for both (an exact weight with a decode kernel of its own): one copy, held twice.
        same = all(p.decode is p.prefill for p in parts)
        decode = prefill if same else concat_weights([p.decode for p in parts])
        return cls(decode, prefill, max_rows=parts[0].max_rows)

    def to_tensors(self) -> tuple[dict, dict[str, torch.Tensor]]:
        prefill_meta, prefill = self.prefill.to_tensors()
        meta = {"kind": self.kind, "max_rows": self.max_rows, "prefill": prefill_meta}
        tensors = {f"prefill.{k}": v for k, v in prefill.items()}
        if self.decode is self.prefill:
            return {**meta, "decode": "prefill"}, tensors
        decode_meta, decode = self.decode.to_tensors()
        return {**meta, "decode": decode_meta}, {**{f"decode.{k}": v for k, v in decode.items()}, **tensors}

    @classmethod
    def _from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "RowSwitchWeight":
        def part(prefix: str) -> QuantizedWeight:
            found = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            return QuantizedWeight.from_tensors(meta[prefix[:-1]], found)

        prefill = part("prefill.")
        decode = prefill if meta["decode"] == "prefill" else part("decode.")
        return cls(decode, prefill, max_rows=meta["max_rows"])


class TopRefinedWeight(QuantizedWeight):
    """An output projection whose `top` largest outputs per row are recomputed from the exact weight rows.

    The CPU kernels return bfloat16, whose rounding is 0.06-0.125 at the logits' magnitude (16-32):
    enough to flip near ties of greedy decoding and to blur logprobs. Sampling and logprobs read the
    top of the distribution, so those entries are redone in float32 from the exact rows: every output
    within `margin` of its row's maximum, or the `top` largest where more are that close (a topk of
    262,144 logits costs ~1.5 ms on one core); the tail keeps the kernel's values. The
    kernel only has to rank, so it may be lossy: Gemma's Q8_0 logits run through 4-bit groups.
    """

    kind = "top_refined"
    # Outputs further than this below their row's ranked maximum are left as ranked: far beyond the
    # ranking's error (Gemma's int4 logits: std 0.25) and under e^-8 of the top in probability.
    margin = 8.0

    def __init__(self, inner: QuantizedWeight, *, top: int = 64) -> None:
        super().__init__(*inner.shape)
        self.inner, self.top = inner, min(top, inner.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if x.dim() != 2 or x.shape[0] == 0:
            return y
        if isinstance(self.inner, RowSwitchWeight) and x.shape[0] > self.inner.max_rows:
            return y  # these rows went through the exact weight
        near = y >= y.amax(dim=-1, keepdim=True) - self.margin
        if int(near.sum(dim=-1).max()) <= self.top:
            # Usually a few dozen per row: one threshold pass instead of a topk over the whole vocabulary
            # (0.2 against 1.5 ms for 262,144 logits on one core).
            row, col = near.nonzero(as_tuple=True)
            exact = (self.inner.rows(col, torch.float32) * x.float()[row]).sum(dim=-1)
            return y.index_put_((row, col), exact.to(y.dtype))
        index = y.topk(self.top, dim=-1, sorted=False).indices  # [B, top]
        rows = self.inner.rows(index, torch.float32)  # [B, top, K]
        exact = torch.bmm(rows, x.float()[:, :, None])[:, :, 0]
        return y.scatter(1, index, exact.to(y.dtype))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.inner.dequantize(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.inner.rows(ids, dtype)

    def to_tensors(self) -> tuple[dict, dict[str, torch.Tensor]]:
        meta, tensors = self.inner.to_tensors()
        return {"kind": self.kind, "top": self.top, "inner": meta}, {f"inner.{k}": v for k, v in tensors.items()}

    @classmethod
    def _from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "TopRefinedWeight":
        inner = {k.removeprefix("inner."): v for k, v in tensors.items()}
        return cls(QuantizedWeight.from_tensors(meta["inner"], inner), top=meta["top"])


class QuantizedEmbedding(nn.Module):
    """An embedding table held as a QuantizedWeight; a lookup dequantizes only the rows it reads."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight, self.dtype = weight, dtype
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.rows(ids, self.dtype)


def concat_weights(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Row-wise concatenation of quantized weights (merged q|k|v, gate|up).

    Parts of one format concatenate as they are. Mixed ones (a Q4_K query beside a Q6_K value, say)
    meet in the most general of their formats: grouped ints at the smallest group size, else int8
    per row from the exact dense weights.
    """
    kinds = {type(p) for p in parts}
    if len(kinds) == 1:
        cls = kinds.pop()
        if cls is GroupedIntWeight:
            group = min(p.group_size for p in parts)
            return GroupedIntWeight.concat([p.regrouped(group) for p in parts])
        if cls is not Int4PackedWeight or len({p.group_size for p in parts}) == 1:
            return cls.concat(parts)
    return Int8ChannelWeight.from_dense(torch.cat([p.dequantize() for p in parts]))
