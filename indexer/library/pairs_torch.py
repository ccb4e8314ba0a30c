"""The exact pair pass on a torch device (a GPU where there is one): the same pairs as the numpy pass, faster.

The rows go to the device once, in half precision (float16: 1.5 GB per million 768-d rows), and the upper triangle
of ``block x block`` products runs there. Half-precision products are off by at most `pairs.product_margin` (about
1.5e-3 for float16 at 768-d: inputs and output rounded to 11 bits, accumulation in float32, which is forced on
CUDA by turning off cuBLAS's reduced-precision reduction for the pass), so every pair scoring >= threshold - margin
is a candidate, and the host decides each candidate with the same float64 rule as every other pass
(`pairs.Verifier`): no pair is gained or lost against the numpy pass.

torch is imported here only, when this pass is asked for (or chosen because a GPU is present).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.library.export import VectorFile
from indexer.library.pairs import Pairs, RowProgress, Verifier, product_margin, unique_pairs

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

HALF_UNIT = 2.0**-11  # float16's unit roundoff
DEFAULT_DEVICE_BLOCK = 16_384
UPLOAD_ROWS = 65_536


def cuda_present() -> bool:
    """A CUDA device that torch can use, checked without importing torch where no NVIDIA driver is visible (so
    that dedup on a machine without a GPU never pays torch's import)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return False
    if not (Path("/proc/driver/nvidia").exists() or Path("/dev/nvidia0").exists()):
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def torch_pairs(
    matrix: VectorFile,
    threshold: float,
    device: str,
    *,
    block: int = DEFAULT_DEVICE_BLOCK,
    on_rows: RowProgress | None = None,
) -> Pairs:
    """Every pair (i < j) of rows at cosine >= threshold, the products on ``device`` ("cuda", "cuda:1", "cpu")."""
    import torch

    n = len(matrix)
    dev = torch.device(device)
    verifier = Verifier(matrix, threshold)
    floor = threshold - product_margin(matrix.dim, HALF_UNIT, HALF_UNIT)
    found: list[Pairs] = []
    with _full_precision_reduction(), torch.inference_mode():
        half = _upload(matrix, dev)
        for r0 in range(0, n, block):
            rows = half[r0 : r0 + block]
            for c0 in range(r0, n, block):
                left, right = _candidates(rows, half[c0 : c0 + block], r0, c0, floor)
                found.append(verifier.keep(left, right))
            if on_rows is not None:
                on_rows(min(r0 + block, n), n)
    left, right = unique_pairs(found, n)
    log.info("%s pass: %d candidates checked, %d pairs", dev, verifier.checked, len(left))
    return left, right


def _upload(matrix: VectorFile, dev: torch.device) -> torch.Tensor:
    import torch

    half = torch.empty((len(matrix), matrix.dim), dtype=torch.float16, device=dev)
    for start, rows in matrix.blocks(UPLOAD_ROWS):
        half[start : start + len(rows)] = torch.from_numpy(rows).to(dev).to(torch.float16)
    return half


def _candidates(rows: torch.Tensor, cols: torch.Tensor, r0: int, c0: int, floor: float) -> Pairs:
    """Pairs (r0 + i, c0 + j), i < j on the diagonal block, whose half-precision score is >= floor."""
    import torch

    scores = rows @ cols.T
    if r0 == c0:
        scores.fill_diagonal_(float("-inf"))
    # Row maxima first: most rows have no candidate, and a max is cheaper than a full nonzero().
    hot = torch.nonzero(scores.amax(dim=1) >= floor).flatten()
    if hot.numel() == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty
    i, j = torch.nonzero(scores[hot] >= floor, as_tuple=True)
    left = (hot[i] + r0).cpu().numpy().astype(np.int64)
    right = (j + c0).cpu().numpy().astype(np.int64)
    keep = left < right
    return left[keep], right[keep]


@contextmanager
def _full_precision_reduction() -> Iterator[None]:
    """float32 accumulation for half-precision products on CUDA for the pass (the margin assumes it)."""
    import torch

    matmul: Any = torch.backends.cuda.matmul
    before = matmul.allow_fp16_reduced_precision_reduction
    matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_fp16_reduced_precision_reduction = before
