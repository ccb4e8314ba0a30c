"""k-means over the stored vectors; each point's cluster id goes into its payload ("cluster") so search can filter.

Memory stays bounded whatever the store's size: the vectors are copied into a temporary file
(`export.dump_vectors`) and read a block at a time. The centres come from scikit-learn's KMeans on a random sample
(every point when the store holds at most ``cluster.sample``); on bigger stores MiniBatchKMeans then refines them
with one pass over all the blocks, or, on a GPU (``cluster.device``: auto when CUDA is present, or cuda[:N]),
Lloyd's full iterations over every row start from them (`kmeans_torch`). ``auto`` picks k by the silhouette
(cosine) of the sample's clustering, trying every k from 2 to 20, then geometric steps up to ``cluster.max_k``.

Clusters are numbered by size, largest first (0, 1, ...); their representatives are the images nearest the centre.
Points indexed after a clustering run have no cluster until the next run.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from indexer.errors import ConfigError
from indexer.library.export import VectorFile, dump_vectors
from indexer.settings import ClusterSettings

if TYPE_CHECKING:
    from indexer.store.protocol import VectorStore

log = logging.getLogger(__name__)

DEFAULT_BLOCK = 4096
EXHAUSTIVE_UP_TO = 20  # --auto tries every k up to this, then geometric steps
GEOMETRIC_STEPS = 10
SILHOUETTE_SAMPLE = 2000  # silhouette is quadratic in its sample

Matrix = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Cluster:
    """One cluster: its id (0 is the largest), size, and the paths of the images nearest its centre."""

    id: int
    size: int
    representatives: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "size": self.size, "representatives": list(self.representatives)}


@dataclass(frozen=True, slots=True)
class ClusterReport:
    """What a clustering run found and wrote."""

    k: int
    auto: bool
    silhouette: float | None  # of the chosen k on the sample, when picked automatically
    points: int
    clusters: tuple[Cluster, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "auto": self.auto,
            "silhouette": self.silhouette,
            "points": self.points,
            "clusters": [c.as_dict() for c in self.clusters],
        }


def resolve_k(k: int | None, auto: bool, settings: ClusterSettings) -> int | None:
    """The k asked for (``--k``, else the ``cluster.k`` setting), or None for automatic; both asked: an error."""
    if auto and k is not None:
        raise ConfigError("--k/--auto", "give either --k N or --auto, not both")
    if k is not None and k < 1:
        raise ConfigError("--k", f"{k} clusters: give a positive number")
    if auto:
        return None
    chosen = k if k is not None else settings.k
    return chosen or None


def cluster_store(
    store: VectorStore,
    settings: ClusterSettings,
    *,
    k: int | None,
    representatives: int = 8,
    block: int = DEFAULT_BLOCK,
    workdir: Path | None = None,
) -> ClusterReport:
    """Cluster every stored vector into k clusters (None: choose k), write "cluster" into each payload."""
    with tempfile.TemporaryDirectory(prefix="indexer-cluster-", dir=workdir) as tmp:
        dump = dump_vectors(store, Path(tmp))
        n = len(dump.ids)
        if k is not None and k > n:
            raise ConfigError("--k", f"{k} clusters for {n} images: give at most {n}")
        if n == 0:
            raise ConfigError("cluster", "the store holds no images")
        sample = _sample(dump.matrix, settings)
        if k is not None and k > len(sample):
            raise ConfigError("cluster.sample", f"a sample of {len(sample)} vectors cannot seed {k} clusters")
        silhouette = None
        if k is None:
            k, silhouette = choose_k(sample, settings)
        centres = fit_centres(sample, k, settings.seed)
        if n > len(sample):
            centres = _refine(dump.matrix, centres, settings, block)
        else:
            log.info("k-means on all %d vectors (the sample holds them all) on the CPU", n)
        labels, distances = assign(dump.matrix, centres, block)
    labels = _by_size(labels, k)
    _write_labels(store, dump.ids, labels)
    clusters = _describe(store, dump.ids, labels, distances, representatives)
    log.info("clustered %d images into %d clusters", n, len(clusters))
    return ClusterReport(k, silhouette is not None, silhouette, n, clusters)


def _sample(matrix: VectorFile, settings: ClusterSettings) -> Matrix:
    """A random sample of rows (all rows when there are at most ``settings.sample``)."""
    n = len(matrix)
    if n <= settings.sample:
        return matrix.rows(0, n)
    rng = np.random.default_rng(settings.seed)
    return matrix.take(np.sort(rng.choice(n, settings.sample, replace=False)).tolist())


def candidate_ks(n: int, max_k: int) -> list[int]:
    """The k values --auto tries for n sample points: every one up to 20, then geometric steps to max_k."""
    upper = min(max_k, n - 1)
    if upper < 2:
        return []
    ks = set(range(2, min(upper, EXHAUSTIVE_UP_TO) + 1))
    if upper > EXHAUSTIVE_UP_TO:
        ks.update(np.rint(np.geomspace(EXHAUSTIVE_UP_TO, upper, GEOMETRIC_STEPS)).astype(int).tolist())
    return sorted(ks)


def choose_k(sample: Matrix, settings: ClusterSettings) -> tuple[int, float | None]:
    """The k whose clustering of the sample has the best cosine silhouette, and that silhouette."""
    from sklearn.metrics import silhouette_score  # type: ignore[import-untyped]

    best: tuple[float, int] | None = None
    distinct = len(np.unique(sample, axis=0))
    for k in candidate_ks(distinct, settings.max_k):
        labels = _kmeans(sample, k, settings.seed).labels_
        score = float(
            silhouette_score(
                sample,
                labels,
                metric="cosine",
                sample_size=min(len(sample), SILHOUETTE_SAMPLE),
                random_state=settings.seed,
            )
        )
        log.debug("k=%d: silhouette %.4f", k, score)
        if best is None or score > best[0]:
            best = (score, k)
    if best is None:
        return 1, None
    log.info("chose k=%d (silhouette %.4f)", best[1], best[0])
    return best[1], best[0]


def _kmeans(sample: Matrix, k: int, seed: int) -> Any:
    from sklearn.cluster import KMeans  # type: ignore[import-untyped]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning when the sample has fewer distinct points than k
        return KMeans(n_clusters=k, n_init=3, random_state=seed).fit(sample)


def fit_centres(sample: Matrix, k: int, seed: int) -> Matrix:
    """k-means centres of the sample."""
    return np.asarray(_kmeans(sample, k, seed).cluster_centers_, dtype=np.float32)


def torch_device(device: str) -> str | None:
    """The torch device Lloyd's pass runs on for a ``cluster.device`` value, or None for the CPU's MiniBatchKMeans
    pass ("auto": a GPU when CUDA is present, else the CPU)."""
    if device == "auto":
        from indexer.library.pairs_torch import cuda_present

        return "cuda" if cuda_present() else None
    return None if device == "cpu" else device


def _refine(matrix: VectorFile, centres: Matrix, settings: ClusterSettings, block: int) -> Matrix:
    """The sample's centres refined over every row: Lloyd's iterations on a torch device, or one MiniBatchKMeans
    pass on the CPU (`torch_device`)."""
    device = torch_device(settings.device)
    if device is None:
        log.info("k-means: one MiniBatchKMeans pass over %d vectors on the CPU", len(matrix))
        return refine_centres(matrix, centres, settings.seed, block)
    from indexer.library.kmeans_torch import lloyd

    log.info("k-means: Lloyd's iterations over %d vectors on %s", len(matrix), device)
    return lloyd(matrix, centres, device).centres


def refine_centres(matrix: VectorFile, centres: Matrix, seed: int, block: int) -> Matrix:
    """One MiniBatchKMeans pass over every block of the matrix, starting from ``centres``."""
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(n_clusters=len(centres), init=centres, n_init=1, batch_size=block, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _, rows in matrix.blocks(block):
            km.partial_fit(rows)
    return np.asarray(km.cluster_centers_, dtype=np.float32)


def assign(matrix: VectorFile, centres: Matrix, block: int) -> tuple[npt.NDArray[np.int64], Matrix]:
    """The nearest centre of every row, and its squared distance to it, one block at a time."""
    norms = (centres * centres).sum(axis=1)
    labels: list[npt.NDArray[np.int64]] = []
    distances: list[Matrix] = []
    for _, rows in matrix.blocks(block):
        d = norms[None, :] - 2.0 * (rows @ centres.T)  # + |row|², the same for every centre
        best = np.argmin(d, axis=1)
        labels.append(best.astype(np.int64))
        distances.append((d[np.arange(len(rows)), best] + (rows * rows).sum(axis=1)).astype(np.float32))
    if not labels:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(labels), np.concatenate(distances)


def _by_size(labels: npt.NDArray[np.int64], k: int) -> npt.NDArray[np.int64]:
    """Renumber clusters by size, largest first (ties: the old order)."""
    counts = np.bincount(labels, minlength=k)
    order = np.argsort(-counts, kind="stable")
    new_id = np.empty(k, np.int64)
    new_id[order] = np.arange(k)
    return new_id[labels]


def _members(labels: npt.NDArray[np.int64]) -> list[npt.NDArray[np.int64]]:
    """Row indices of each non-empty cluster, by cluster id."""
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    return [part.astype(np.int64) for part in np.split(order, bounds)] if len(order) else []


def _write_labels(store: VectorStore, ids: Sequence[str], labels: npt.NDArray[np.int64]) -> None:
    for rows in _members(labels):
        store.set_payload([ids[i] for i in rows.tolist()], {"cluster": int(labels[rows[0]])})
    store.flush()


def _describe(
    store: VectorStore,
    ids: Sequence[str],
    labels: npt.NDArray[np.int64],
    distances: Matrix,
    representatives: int,
) -> tuple[Cluster, ...]:
    parts = _members(labels)
    nearest = [rows[np.argsort(distances[rows], kind="stable")[:representatives]] for rows in parts]
    paths = {p.id: p.path for p in store.retrieve([ids[i] for rows in nearest for i in rows.tolist()])}
    return tuple(
        Cluster(int(labels[rows[0]]), len(rows), tuple(paths[ids[i]] for i in best.tolist() if ids[i] in paths))
        for rows, best in zip(parts, nearest, strict=True)
    )
