"""Translating to and from Qdrant Edge: filters, records, ids, search parameters, payload indexes."""

from __future__ import annotations

from collections.abc import Sequence

import qdrant_edge as edge

from indexer.records import StoredPoint
from indexer.store.base import _as_vector
from indexer.store.filters import _AnyOf, _Cond, _Match, _Range
from indexer.store.protocol import FLOAT_FIELDS, INTEGER_FIELDS, KEYWORD_FIELDS

# The search's candidate list and rescoring of a quantized shard (see edge_store: CLIP-like data need more than
# Qdrant's defaults for recall@10 >= 0.98).
SEARCH_EF = 512
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


def search_params(exact: bool) -> edge.SearchParams:
    """Exact: the original vectors only. Else the graph and the int8 copies (where the shard has them), the best
    limit x OVERSAMPLING rescored with the originals, so that scores are the originals' and the order nearly so."""
    if exact:
        return edge.SearchParams(exact=True, quantization=edge.QuantizationSearchParams(ignore=True))
    return edge.SearchParams(
        hnsw_ef=SEARCH_EF, quantization=edge.QuantizationSearchParams(rescore=True, oversampling=OVERSAMPLING)
    )


def create_edge_indexes(shard: edge.EdgeShard) -> None:
    """Payload indexes for the filtered fields that lack one."""
    kinds = [
        *((f, edge.PayloadSchemaType.Keyword) for f in KEYWORD_FIELDS),
        *((f, edge.PayloadSchemaType.Integer) for f in INTEGER_FIELDS),
        *((f, edge.PayloadSchemaType.Float) for f in FLOAT_FIELDS),
    ]
    have = shard.info().payload_schema
    for field, kind in kinds:
        if field not in have:
            shard.update(edge.UpdateOperation.create_field_index(field, kind))
