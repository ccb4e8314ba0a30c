"""The vector store: one interface (`VectorStore`), two backends.

    EdgeStore          the embedded default: Qdrant Edge (the Qdrant engine in-process) in a directory
    QdrantServerStore  a Qdrant server (or qdrant-client's ":memory:" mode, the server's test double)

`open_store` / `open_store_from_settings` pick one. Both backends hold the same points (id =
`records.point_id(path)`, a cosine vector, the payload of `indexer.store.payload`), record the model that made the
vectors, keep a capped log of files that failed, and evaluate `SearchFilter` the same way (`filters`).

    protocol     VectorStore, FailureRecord, the shared constants
    filters      SearchFilter → backend-neutral conditions
    base         the shared implementation over each backend's primitives
    directory    the Edge store's directory: store.json, lock, failure file
    edge_store   EdgeStore
    server       QdrantServerStore
    factory      open_store, open_store_from_settings (torch-free)

`QdrantServerStore` is imported on first use: the embedded store's commands never import qdrant-client (≈ 1 s of a
cold start).
"""
