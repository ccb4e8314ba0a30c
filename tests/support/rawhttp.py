"""One HTTP request with exactly the headers given (for the Host, Content-Length and JSON guards of both surfaces)."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Sequence
from typing import Any


def raw_request(
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: Sequence[tuple[str, str]] = (),
    timeout: float = 20,
) -> tuple[int, Any, float]:
    """(status, JSON body or None, seconds). http.client adds Host and, for a body, Content-Length itself unless
    ``headers`` has them."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    names = {name.lower() for name, _ in headers}
    started = time.monotonic()
    conn.putrequest(method, path, skip_host="host" in names)
    for name, value in headers:
        conn.putheader(name, value)
    if body and "content-length" not in names:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body or None)
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    return response.status, data, time.monotonic() - started
