"""Lloyd's k-means on a torch device (a GPU where there is one): every row in every iteration, where the CPU path
refines the sample's centres with one MiniBatchKMeans pass.

The objective is the CPU path's (`cluster`): Euclidean k-means over the stored unit vectors. A row goes to the
centre minimising ``|c|² - 2·x·c`` (the nearest centre: the centres are means, shorter than the unit rows, so this
is not the largest dot product), and a centre is the mean of its rows. The start is the centres the sample's KMeans
gives (`cluster.fit_centres`), so the choice of k (``--auto`` or not) and the start are the CPU path's; then full
iterations until fewer than ``tol`` of the rows change cluster, at most ``max_iter``.

Memory: on CUDA the rows go to the device once, in float16 (1.5 GB per million 768-d rows), when they fit in half
of its free memory; otherwise (and always on the CPU device, in float32) each iteration reads the file a block at a
time, so the host holds a block. Both ways split the rows into the same blocks, so they give the same centres.
Products in the rows' precision with float32 accumulation (cuBLAS's reduced-precision reduction off for the pass);
each block's per-cluster sums are a one-hot product in float32, added up across blocks in float64. No atomic adds:
the same rows, start and device give the same centres on every run.

A cluster left empty by an iteration takes the row farthest from its own centre (the next empty one the next
farthest row): deterministic, and the row the centres explain worst.

torch is imported here only, when this pass is asked for (or chosen because a GPU is present).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from indexer.library.export import VectorFile
from indexer.library.pairs_torch import _full_precision_reduction

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MAX_ITER = 20
TOL = 1e-3  # stop when fewer than this share of the rows change cluster
DEVICE_BLOCK = 16_384
RESIDENT_SHARE = 0.5  # of the device's free memory the rows may take to stay there between iterations

Matrix = npt.NDArray[np.float32]
Blocks = Callable[[], Iterator[tuple[int, "torch.Tensor"]]]


@dataclass(frozen=True, slots=True)
class LloydResult:
    """The centres (float32, k x dim), the iterations run, the rows that changed cluster in the last one, and how
    many times an empty cluster was re-seeded."""

    centres: Matrix
    iterations: int
    changed: int
    reseeded: int


@dataclass(slots=True)
class _Pass:
    """One assignment pass's totals: per-cluster sums (float64) and counts, rows that changed cluster, and the
    farthest rows from their centres (candidates for empty clusters), farthest first."""

    sums: torch.Tensor
    counts: torch.Tensor
    changed: int
    far: torch.Tensor


def lloyd(
    matrix: VectorFile,
    centres: Matrix,
    device: str,
    *,
    max_iter: int = MAX_ITER,
    tol: float = TOL,
    block: int = DEVICE_BLOCK,
    resident: bool | None = None,
    half: bool | None = None,
) -> LloydResult:
    """Lloyd's iterations over every row of ``matrix`` from ``centres``, on ``device`` ("cuda", "cuda:1", "cpu").

    ``half``: float16 rows and products (None: on CUDA only). ``resident``: the rows stay on the device between
    iterations (None: on CUDA when they fit in `RESIDENT_SHARE` of its free memory; never on the CPU device unless
    asked, so the host's memory stays a block).
    """
    import torch

    if max_iter < 1 or block < 1:
        raise ValueError("max_iter and block must be positive")
    dev = torch.device(device)
    dtype = torch.float16 if (dev.type == "cuda" if half is None else half) else torch.float32
    n, k = len(matrix), len(centres)
    c = torch.from_numpy(np.ascontiguousarray(centres, dtype=np.float32)).to(dev)
    labels = torch.full((n,), -1, dtype=torch.int64, device=dev)
    iterations = changed = reseeded = 0
    with _full_precision_reduction(), torch.inference_mode():
        blocks = _block_source(matrix, dev, dtype, block, resident)
        while iterations < max_iter:
            iterations += 1
            step = _assign_pass(blocks, c, labels, dtype)
            changed = step.changed
            c, empty = _update(matrix, c, step, dev)
            reseeded += empty
            if changed < tol * n and not empty:
                break
    log.info(
        "Lloyd's k-means on %s: %d rows, k=%d, %d iterations, %d rows changed in the last, %d empty clusters re-seeded",
        dev,
        n,
        k,
        iterations,
        changed,
        reseeded,
    )
    out: Matrix = c.cpu().numpy().astype(np.float32)
    return LloydResult(out, iterations, changed, reseeded)


def _block_source(
    matrix: VectorFile, dev: torch.device, dtype: torch.dtype, block: int, resident: bool | None
) -> Blocks:
    """A function that yields (start, rows on the device) for every block of ``block`` rows, each time it is called."""
    import torch

    itemsize = torch.empty((), dtype=dtype).element_size()
    if resident is None:
        resident = dev.type == "cuda" and len(matrix) * matrix.dim * itemsize <= RESIDENT_SHARE * _free_bytes(dev)
    if not resident:

        def read() -> Iterator[tuple[int, torch.Tensor]]:
            for start, rows in matrix.blocks(block):
                yield start, torch.from_numpy(rows).to(dev).to(dtype)

        return read
    whole = torch.empty((len(matrix), matrix.dim), dtype=dtype, device=dev)
    for start, rows in matrix.blocks(block):
        whole[start : start + len(rows)] = torch.from_numpy(rows).to(dev).to(dtype)
    log.debug("%d rows resident on %s (%s)", len(matrix), dev, dtype)

    def stay() -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, len(whole), block):
            yield start, whole[start : start + block]

    return stay


def _free_bytes(dev: torch.device) -> int:
    import torch

    free, _ = torch.cuda.mem_get_info(dev)
    return int(free)


def _assign_pass(blocks: Blocks, c: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> _Pass:
    """Each row to its nearest centre (``labels`` updated in place), with the totals the update needs."""
    import torch

    k, dim = c.shape
    dev = c.device
    cw = c.to(dtype)
    norms = (cw.float() ** 2).sum(dim=1)
    sums = torch.zeros((k, dim), dtype=torch.float64, device=dev)
    counts = torch.zeros(k, dtype=torch.int64, device=dev)
    far_d = torch.empty(0, dtype=torch.float32, device=dev)
    far_i = torch.empty(0, dtype=torch.int64, device=dev)
    changed = torch.zeros((), dtype=torch.int64, device=dev)
    for start, rows in blocks():
        d = (rows @ cw.T).float().mul_(-2.0).add_(norms)  # + |row|², the same for every centre
        dmin, best = d.min(dim=1)
        stop = start + len(rows)
        changed += (labels[start:stop] != best).sum()
        labels[start:stop] = best
        onehot = torch.zeros((len(rows), k), dtype=torch.float32, device=dev).scatter_(1, best[:, None], 1.0)
        sums += (onehot.T @ rows.float()).double()
        counts += torch.bincount(best, minlength=k)
        # Squared distance of each row to its centre; keep the k farthest rows seen so far.
        dist = dmin.add_(torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32).square_())
        top_d, top_i = torch.topk(dist, min(k, len(dist)))
        far_d, order = torch.topk(torch.cat([far_d, top_d]), min(k, len(far_d) + len(top_d)))
        far_i = torch.cat([far_i, top_i + start])[order]
    return _Pass(sums, counts, int(changed), far_i)


def _update(matrix: VectorFile, c: torch.Tensor, step: _Pass, dev: torch.device) -> tuple[torch.Tensor, int]:
    """The new centres (the means of their rows), an empty cluster taking the next farthest row; and how many were
    empty."""
    import torch

    filled = step.counts > 0
    means = (step.sums / step.counts.clamp(min=1).double()[:, None]).to(torch.float32)
    new = torch.where(filled[:, None], means, c)
    empty = torch.nonzero(~filled).flatten().cpu().tolist()
    if empty:
        rows = step.far[: len(empty)].cpu().tolist()
        new[empty[: len(rows)]] = torch.from_numpy(matrix.take(rows)).to(dev)
        log.debug("re-seeded %d empty clusters from the farthest rows", len(rows))
    return new, len(empty)
