"""Translating to and from Qdrant Edge: filters, records, ids, search parameters, payload indexes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager

import qdrant_edge as edge

from indexer.records import Hit, StoredPoint
from indexer.store.base import _as_vector
from indexer.store.filters import _AnyOf, _Cond, _Match, _Range
from indexer.store.protocol import FLOAT_FIELDS, INTEGER_FIELDS, KEYWORD_FIELDS

# The search's candidate list and rescoring of a quantized shard (bench/README.md "Search": at 1M CLIP-like points,
# text-like queries reach recall@10 0.97 at ef 512 and 0.99 at 1024, p50 ≈ 3 ms; search.hnsw_ef overrides it).
SEARCH_EF = 1024
# A filtered search's walk (ACORN looks at neighbours' neighbours, so each step costs more): text queries in a folder
# holding 10% of 1M points, recall@10 0.973 in 43 ms at ef 256, 0.993 in 79 ms at 512, 0.9985 in 121 ms at 1024
# (bench/README.md). search.hnsw_ef sets both.
FILTERED_SEARCH_EF = 512
OVERSAMPLING = 8.0


def edge_filter(conds: list[_Cond]) -> edge.Filter | None:
    if not conds:
        return None
    return edge.Filter(must=[edge_condition(c) for c in conds])


def edge_condition(cond: _Cond) -> edge.FieldCondition | edge.Filter:
    if isinstance(cond, _Match):
        return edge.FieldCondition(cond.key, match=edge.MatchValue(cond.value))
    if isinstance(cond, _AnyOf):
        return edge.FieldCondition(cond.key, match=edge.MatchAny(list(cond.values)))
    if isinstance(cond, _Range):
        return edge.FieldCondition(cond.key, range=edge.RangeFloat(gte=cond.gte, lte=cond.lte))
    return edge.Filter(should=[edge_condition(c) for c in cond.options])


def edge_point(record: edge.Record, with_vectors: bool) -> StoredPoint:
    vector = _as_vector(record.vector) if with_vectors else None
    return StoredPoint(id=str(record.id), payload=dict(record.payload or {}), vector=vector)


def edge_ids(ids: Sequence[str]) -> list[edge.PointId]:
    return list(ids)


def search_params(exact: bool, ef: int = 0, filtered: bool = False) -> edge.SearchParams:
    """Exact: the original vectors only. Else the graph and the int8 copies (where the shard has them), the best
    limit x OVERSAMPLING rescored with the originals, so that scores are the originals' and the order nearly so.
    A filtered search walks the graph with ACORN (neighbours' neighbours past the points the filter drops): the
    payload indexes have no graph links of their own, and a plain walk then misses what a filter keeps (a folder
    holding 10% of 100k points: recall@10 0.58 plain, 1.0 with ACORN)."""
    if exact:
        return edge.SearchParams(exact=True, quantization=edge.QuantizationSearchParams(ignore=True))
    return edge.SearchParams(
        hnsw_ef=ef or (FILTERED_SEARCH_EF if filtered else SEARCH_EF),
        quantization=edge.QuantizationSearchParams(rescore=True, oversampling=OVERSAMPLING),
        acorn=edge.AcornSearchParams(enable=True) if filtered else None,
    )


def _index_params() -> list[tuple[str, object]]:
    """The payload indexes of a new store: on disk (read through the page cache) and without Qdrant's extra graph
    links per indexed value (``enable_hnsw``). Those links tripled the graph's build (100k CLIP-like points: 39 s
    against 13 s), grew its memory and slowed unfiltered queries (3.2 against 1.8 ms); filtered queries get their
    recall from ACORN instead (`search_params`; bench/README.md "Search")."""
    keyword = edge.KeywordIndexParams(enable_hnsw=False, memory=edge.Memory.Cold)
    integer = edge.IntegerIndexParams(lookup=True, range=True, enable_hnsw=False, memory=edge.Memory.Cold)
    number = edge.FloatIndexParams(enable_hnsw=False, memory=edge.Memory.Cold)
    return [
        *((f, keyword) for f in KEYWORD_FIELDS),
        *((f, integer) for f in INTEGER_FIELDS),
        *((f, number) for f in FLOAT_FIELDS),
    ]


def create_edge_indexes(shard: edge.EdgeShard) -> None:
    """Payload indexes for the filtered fields that lack one (`_index_params`)."""
    kinds = _index_params()
    have = shard.info().payload_schema
    for field, kind in kinds:
        if field not in have:
            shard.update(edge.UpdateOperation.create_field_index(field, kind))  # type: ignore[arg-type]


class EdgeReads:
    """The read primitives of `EdgeStore` over its live shard (`_live_shard`, `_errors` are the store's)."""

    hnsw_ef = 0  # the graph walk's breadth (search.hnsw_ef); 0: SEARCH_EF

    def _live_shard(self) -> edge.EdgeShard | None:
        raise NotImplementedError

    def _errors(self, what: str) -> AbstractContextManager[None]:
        raise NotImplementedError

    def _retrieve_batch(self, ids: list[str], with_vectors: bool) -> list[StoredPoint]:
        shard = self._live_shard()
        if shard is None:
            return []
        with self._errors("retrieve"):
            records = shard.retrieve(edge_ids(ids), with_payload=True, with_vector=with_vectors)
        return [edge_point(r, with_vectors) for r in records]

    def _scroll(self, conds: list[_Cond], with_vectors: bool, batch_size: int) -> Iterator[StoredPoint]:
        flt = edge_filter(conds)
        offset: edge.PointId | None = None
        while (shard := self._live_shard()) is not None:
            request = edge.ScrollRequest(
                offset=offset, limit=batch_size, filter=flt, with_payload=True, with_vector=with_vectors
            )
            with self._errors("scroll"):
                records, offset = shard.scroll(request)
            yield from (edge_point(r, with_vectors) for r in records)
            if offset is None:
                return

    def _query(
        self, vector: list[float], limit: int, offset: int, threshold: float | None, conds: list[_Cond]
    ) -> list[Hit]:
        shard = self._live_shard()
        if shard is None:
            return []
        with self._errors("search"):
            # Exact while nothing is HNSW-indexed; after optimize() the index serves the indexed segments
            # and Edge still scans the small unindexed remainder exactly.
            exact = shard.info().indexed_vectors_count == 0
            request = edge.QueryRequest(
                limit=limit,
                offset=offset,
                query=edge.Query.Nearest(vector),
                with_payload=True,
                filter=edge_filter(conds),
                score_threshold=threshold,
                params=search_params(exact, self.hnsw_ef, filtered=bool(conds)),
            )
            found = shard.query(request)
        return [Hit(id=str(p.id), score=float(p.score), payload=dict(p.payload or {})) for p in found]

    def _count(self, conds: list[_Cond]) -> int:
        shard = self._live_shard()
        if shard is None:
            return 0
        with self._errors("count"):
            return shard.count(edge.CountRequest(exact=True, filter=edge_filter(conds)))
