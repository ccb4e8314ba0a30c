"""CLIP-like unit vectors for the library benchmarks (dedup, cluster, search): never uniform noise.

Real CLIP image embeddings are not spread evenly over the sphere: they share a common direction (two unrelated
photos score ≈ 0.2-0.4), fall into topics (≈ 0.5-0.7 within a topic), and a photo archive holds bursts of shots of
one scene (≈ 0.75-0.93), with variance concentrated in a few hundred directions. This generator builds each vector
as the normalised sum of

    a global direction + its topic's centre + its scene's offset + its own noise,

every random direction drawn with a power-law spectrum (variance ∝ 1/i^0.8 over the 768 axes, effective dimension
≈ 100), topics of Zipf-like sizes. Then it plants near-duplicates: 1% of the vectors start a group of 2-5 whose other
members sit at a known cosine to the group's first vector, drawn from 0.95-0.999, and one member in five is an exact
copy (the same vector). Members may score below the threshold against each other: they join through the first.

Rows are written chunk by chunk (a million 768-d rows is 3 GB), so the generator's memory stays a few chunks.

    python -m bench.vectors --n 100000 --out /tmp/v.f32   # writes the matrix and prints the planted groups' count
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

DIM = 768
CHUNK = 65_536
GROUP_SHARE = 0.01  # of the rows start a planted group
COPY_SHARE = 0.2  # of the planted members are exact copies
NEAR_COSINES = (0.95, 0.999)
# Squared weights of the parts (before the scene's own noise share): global, topic, scene.
GLOBAL_W2, TOPIC_W2, SCENE_W2 = 0.22, 0.30, 0.20
NOISE_W2 = (0.12, 0.45)  # each scene draws its points' own-noise share from this range
SPECTRUM_POWER = 0.8
# Text queries (`ClipLike.text_queries`), squared weights: the modality gap every text shares, the images' global
# direction, the topic the text names; the rest is the query's own wording.
TEXT_GAP_W2, TEXT_GLOBAL_W2, TEXT_TOPIC_W2 = 0.6, 0.02, 0.15

Matrix = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Planted:
    """The planted near-duplicate groups (row indices, first = the base) and each member's cosine to its base."""

    groups: list[list[int]]
    cosines: dict[int, float]  # member row → its cosine to its group's base (1.0 for exact copies)

    @property
    def points(self) -> int:
        return sum(len(g) for g in self.groups)


def _spectrum(dim: int) -> npt.NDArray[np.float32]:
    scale = (np.arange(1, dim + 1, dtype=np.float64) ** -SPECTRUM_POWER) ** 0.5
    out: npt.NDArray[np.float32] = (scale / np.sqrt((scale**2).sum())).astype(np.float32)
    return out


def _directions(rng: np.random.Generator, count: int, spectrum: npt.NDArray[np.float32]) -> Matrix:
    """``count`` random unit vectors with the power-law spectrum (variance mostly in the first axes)."""
    raw = rng.standard_normal((count, len(spectrum)), dtype=np.float32) * spectrum
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    return raw


def _normalise(rows: Matrix) -> Matrix:
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


class ClipLike:
    """The generator: topics fixed by the seed, rows made a chunk at a time (the same rows for the same seed)."""

    def __init__(self, n: int, dim: int = DIM, seed: int = 0) -> None:
        self.n, self.dim, self.seed = n, dim, seed
        rng = np.random.default_rng(seed)
        self.spectrum = _spectrum(dim)
        self.global_dir = _directions(rng, 1, self.spectrum)[0]
        topics = max(8, n // 2_000)
        self.topics = _directions(rng, topics, self.spectrum)
        weights = 1.0 / np.arange(1, topics + 1) ** 0.7  # Zipf-like topic sizes
        self.topic_p = weights / weights.sum()

    def chunk(self, start: int, stop: int) -> tuple[Matrix, list[list[int]], dict[int, float]]:
        """Rows [start, stop) and the groups planted among them (global row indices)."""
        rng = np.random.default_rng([self.seed, start])
        count = stop - start
        rows = self._background(rng, count)
        groups, cosines = self._plant(rng, rows, start)
        return rows, groups, cosines

    def _background(self, rng: np.random.Generator, count: int) -> Matrix:
        sizes = rng.geometric(0.25, size=count)  # scene sizes, mean 4
        scene_of = np.repeat(np.arange(count), sizes)[:count]
        scenes = int(scene_of[-1]) + 1
        topic = rng.choice(len(self.topics), size=scenes, p=self.topic_p)
        noise_w2 = rng.uniform(*NOISE_W2, size=scenes).astype(np.float32)
        rows = np.sqrt(GLOBAL_W2) * self.global_dir + np.sqrt(TOPIC_W2) * self.topics[topic[scene_of]]
        rows += np.sqrt(SCENE_W2) * _directions(rng, scenes, self.spectrum)[scene_of]
        rows += np.sqrt(noise_w2[scene_of])[:, None] * _directions(rng, count, self.spectrum)
        return _normalise(rows.astype(np.float32))

    def _plant(self, rng: np.random.Generator, rows: Matrix, start: int) -> tuple[list[list[int]], dict[int, float]]:
        count = len(rows)
        order = rng.permutation(count)
        groups: list[list[int]] = []
        cosines: dict[int, float] = {}
        at = 0
        for _ in range(int(count * GROUP_SHARE)):
            size = int(rng.integers(2, 6))
            members = order[at : at + size].tolist()
            at += size
            base = rows[members[0]]
            for m in members[1:]:
                cos = 1.0 if rng.random() < COPY_SHARE else float(rng.uniform(*NEAR_COSINES))
                other = _directions(rng, 1, self.spectrum)[0]
                other -= (other @ base) * base
                other /= np.linalg.norm(other)
                rows[m] = base if cos == 1.0 else (cos * base + np.sqrt(1 - cos**2) * other).astype(np.float32)
                cosines[start + m] = cos
            groups.append(sorted(start + m for m in members))
        return groups, cosines

    def text_queries(self, count: int, seed: int = 1) -> Matrix:
        """``count`` CLIP-like text queries for this library. As CLIP's text vectors: a direction all texts share
        and images lack (the modality gap), a little of the images' global direction, the topic the text names (one
        of this library's, drawn by size: people search for what they have) and the text's own wording. Their best
        hits score ≈ 0.4-0.5 and unrelated images ≈ 0.05 (99th percentile ≈ 0.34): as CLIP's, text-to-image scores
        sit below image-to-image ones. (Rows of another library, `ClipLike(n, seed=other)`, are the harder case of
        a query for something the library does not hold.)"""
        rng = np.random.default_rng([self.seed, seed, 7])
        gap = _directions(rng, 1, self.spectrum)[0]
        topic = rng.choice(len(self.topics), size=count, p=self.topic_p)
        rest = 1.0 - TEXT_GAP_W2 - TEXT_GLOBAL_W2 - TEXT_TOPIC_W2
        rows = np.sqrt(TEXT_GAP_W2) * gap + np.sqrt(TEXT_GLOBAL_W2) * self.global_dir
        rows = rows + np.sqrt(TEXT_TOPIC_W2) * self.topics[topic]
        rows = rows + np.sqrt(rest) * _directions(rng, count, self.spectrum)
        return _normalise(rows.astype(np.float32))

    def write(self, path: Path, chunk: int = CHUNK) -> Planted:
        """Write all n rows (raw float32, row-major) to ``path``; returns the planted groups."""
        groups: list[list[int]] = []
        cosines: dict[int, float] = {}
        with path.open("wb") as fh:
            for start in range(0, self.n, chunk):
                rows, g, c = self.chunk(start, min(start + chunk, self.n))
                fh.write(rows.tobytes())
                groups += g
                cosines |= c
        return Planted(groups, cosines)

    def matrix(self) -> tuple[Matrix, Planted]:
        """All n rows in memory (small n: tests)."""
        parts = [self.chunk(s, min(s + CHUNK, self.n)) for s in range(0, self.n, CHUNK)]
        groups = [g for _, gs, _ in parts for g in gs]
        cosines = {k: v for _, _, cs in parts for k, v in cs.items()}
        return np.concatenate([rows for rows, _, _ in parts]), Planted(groups, cosines)


def clip_like(n: int, dim: int = DIM, seed: int = 0) -> tuple[Matrix, Planted]:
    """n CLIP-like unit vectors in memory and the planted groups."""
    return ClipLike(n, dim, seed).matrix()


def describe(matrix: Matrix, sample: int = 2_000, seed: int = 1) -> dict[str, float]:
    """Cosine statistics of a sample against all rows: the shape of the data (for the README)."""
    rng = np.random.default_rng(seed)
    rows = matrix[rng.choice(len(matrix), min(sample, len(matrix)), replace=False)]
    scores = rows @ matrix.T
    top = np.sort(scores, axis=1)[:, -6:-1]  # the 5 best other rows (the last is the row itself)
    return {
        "mean_cosine": round(float(scores.mean()), 3),
        "p99_cosine": round(float(np.quantile(scores, 0.99)), 3),
        "nn1_median": round(float(np.median(top[:, -1])), 3),
        "nn1_p99": round(float(np.quantile(top[:, -1], 0.99)), 3),
        "nn5_median": round(float(np.median(top[:, 0])), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--describe", action="store_true", help="print cosine statistics (n up to ~200k)")
    args = parser.parse_args()
    gen = ClipLike(args.n, seed=args.seed)
    if args.out is not None:
        planted = gen.write(args.out)
        print(json.dumps({"n": args.n, "groups": len(planted.groups), "planted_points": planted.points}))
    if args.describe:
        print(json.dumps(describe(gen.matrix()[0])))


if __name__ == "__main__":
    main()
