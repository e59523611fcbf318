"""Row tables in reduced precision for serving: float16, bfloat16, or int8 with one scale per row.

Why: a serving replica holds the item tables of the whole catalogue: the node rows the backbone
reads for a history, and the per-level scoring tables beam search reads. In float32 at d 64 that
is about 2 x 256 bytes per item, so 10^8 items need ~51 GB before the trie; float16 halves it,
int8 quarters it. Rows are stored narrow and widened to float32 when read: a request gathers a few
hundred rows, and a GEMM over a whole level (exact ranking) widens one block of rows at a time, so
every dot product, sum and softmax is still float32. The ranking moves only where scores are
within the rounding of each other (bench.scale_serve measures the overlap with float32).
"""

from __future__ import annotations

import torch

PRECISIONS = ("float32", "float16", "bfloat16", "int8")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
BLOCK = 1 << 16  # rows widened at a time by the level-wide GEMMs
#: Scoring levels with at most this many nodes stay float32 (a few hundred KB: the top of the trie,
#: which per-user GEMMs read whole; narrowing them would widen the whole level on every call).
NARROW_MIN_ROWS = 4096


class LowPrecisionRows:
    """A [P, d] float32 table stored in `precision`; `gather` and `scores_t` return float32."""

    def __init__(self, x: torch.Tensor, precision: str):
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS[1:])}, not {precision!r}")
        x = x.detach().float()
        self.precision = precision
        self.scale = None
        if precision == "int8":  # symmetric, per row: the largest |value| of a row maps to 127
            self.scale = x.abs().amax(1).clamp(min=1e-30) / 127.0
            self.data = torch.round(x / self.scale[:, None]).clamp_(-127, 127).to(torch.int8)
        else:
            if precision == "float16" and x.numel() and float(x.abs().max()) > 65504:
                raise ValueError("table values beyond float16's range (65504): use bfloat16 or int8")
            self.data = x.to(_DTYPES[precision])

    def __len__(self) -> int:
        return len(self.data)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + (0 if self.scale is None else self.scale.numel() * 4)

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """float32 rows [len(idx), d]."""
        out = torch.index_select(self.data, 0, idx).float()
        return out if self.scale is None else out.mul_(torch.index_select(self.scale, 0, idx)[:, None])

    def block(self, lo: int, hi: int) -> torch.Tensor:
        out = self.data[lo:hi].float()
        return out if self.scale is None else out.mul_(self.scale[lo:hi, None])

    def scores_t(self, q: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """[P, B] = bias[:, None] + rows @ q.T, widening BLOCK rows at a time."""
        out = q.new_empty(len(self), len(q))
        for lo in range(0, len(self), BLOCK):
            hi = min(lo + BLOCK, len(self))
            torch.addmm(bias[lo:hi, None], self.block(lo, hi), q.T, out=out[lo:hi])
        return out


def gather(table, idx: torch.Tensor) -> torch.Tensor:
    """table[idx] as float32, for a float32 tensor or a LowPrecisionRows."""
    return table.gather(idx) if isinstance(table, LowPrecisionRows) else torch.index_select(table, 0, idx)


def scores_t(table, q: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[P, B] = bias[:, None] + table @ q.T."""
    return table.scores_t(q, bias) if isinstance(table, LowPrecisionRows) else torch.addmm(bias[:, None], table, q.T)


def scores(table, q: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[B, P] = bias + q @ table.T (small levels: float32 tables, one GEMM)."""
    if isinstance(table, LowPrecisionRows):
        return table.scores_t(q, bias).T
    return torch.addmm(bias, q, table.T)
