"""The HTTP search service (`indexer serve`): FastAPI over the same store and model as the CLI.

    GET  /                        the web page (indexer/web: index.html, app.js, style.css; no CDN, no build step)
    GET  /search?q=TEXT           text search, with `not`, filters, limit, offset, threshold as query parameters
    POST /search                  JSON: positive and negative examples (texts, indexed image ids, base64 images),
                                  metadata filters, limit, offset, threshold
    POST /search/image            multipart: an uploaded image (`file`) or an indexed image's id (`id`)
    GET  /images/{id}             the indexed file itself, only from inside the served roots
    GET  /images/{id}/thumbnail   a JPEG thumbnail, cached on disk by content hash and size
    GET  /healthz                 liveness and the number of indexed images (never needs the key)
    GET  /metrics                 Prometheus metrics (per-app registry)
    GET  /openapi.json            the OpenAPI schema

Security: without an API key the service answers only requests whose Host is a loopback name (a DNS-rebinding
guard; `indexer serve` refuses to bind another address without a key). With a key, every route but the page, its
static files and /healthz needs ``Authorization: Bearer KEY``. Request bodies are capped (`serve.max_upload_mb`).
Files are served only for ids the store holds, and only when their real path (symlinks resolved) lies inside a
served root.

Errors: every IndexerError maps to one HTTP status (`indexer.errors.http_status_for`) and one body
(`indexer.errors.body_for`) (bad input is always a 4xx with a message);
request validation errors are 422 with FastAPI's field list.

Concurrency: the model is not thread-safe and decoding uses process-global Pillow state, so all model, decode and
store work runs on one engine thread; the event loop only parses requests and streams files.

Modules: `routes` (the app factory, routes and error handlers), `guards` (ASGI middleware: metrics, Host and key,
body size), `models` (request and response models and their conversions), `service` (the engine-thread work, the
file guard, metrics).
"""
