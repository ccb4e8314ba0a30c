"""The checks every HTTP surface makes before it reads a request: its Host, its key, its body's type and size.

Used by the ASGI middleware of the one app (`indexer.api.guards`: `indexer serve` and the watch daemon alike) and
by the control routes' own local-client check (`indexer.api.control`). Each check raises the IndexerError the app
answers with (`indexer.errors.body_for`). No web framework and no torch here.
"""

from __future__ import annotations

import hmac
import ipaddress

from indexer.errors import (
    ConfigError,
    HostNotAllowedError,
    PayloadTooLargeError,
    UnauthorizedError,
    UnsupportedMediaError,
)

LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the name localhost."""
    name = host.strip().lower().strip("[]")
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str | None:
    """The host name of a Host header without its port ('[::1]:8000' → '::1'), or None when the header is not
    ``host[:port]`` (nothing may follow a bracketed address but a port: '[::1]evil.example' is None)."""
    text = header.strip()
    if text.startswith("["):
        name, bracket, rest = text[1:].partition("]")
        return name if bracket and _is_port_suffix(rest) else None
    name, colon, port = text.partition(":")
    if colon and not _is_port_suffix(colon + port):
        return None
    return name


def _is_port_suffix(text: str) -> bool:
    return text == "" or (text.startswith(":") and text[1:].isdigit() and text[1:].isascii() and len(text) <= 6)


def check_host(host: str) -> None:
    """Without an API key only loopback Host headers are served: a DNS-rebinding guard (a page on evil.example
    resolving its name to 127.0.0.1 sends ``Host: evil.example``). A request without a Host header, or with one
    that is not ``host[:port]``, is refused too."""
    if not host.strip():
        raise HostNotAllowedError("no Host header: without an API key only requests to localhost are served")
    name = host_name(host)
    if name is None or not is_loopback(name):
        raise HostNotAllowedError(f"host {host!r} not allowed: without an API key only localhost is served")


def check_key(authorization: bytes, key: bytes) -> None:
    """``Authorization: Bearer KEY``, compared in constant time."""
    scheme, _, token = authorization.partition(b" ")
    if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)):
        raise UnauthorizedError("missing or wrong API key: send 'Authorization: Bearer KEY'")


def check_media(content_type: str, wanted: str) -> None:
    """A body must be declared as the type its route takes (``wanted``): a cross-origin page can post text/plain or
    a form without asking first, never another type."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media != wanted:
        raise UnsupportedMediaError(f"the body must be {wanted} (Content-Type: {wanted}), not {media or 'none'!r}")


def declared_length(header: str | None, limit: int, setting: str) -> int | None:
    """A Content-Length header as a number of bytes (None when absent); ConfigError when it is not a number,
    PayloadTooLargeError when it is above ``limit`` (``setting`` names the limit)."""
    if header is None:
        return None
    text = header.strip()
    if not text.isdigit() or not text.isascii():
        raise ConfigError("Content-Length", f"{header!r} is not a number of bytes")
    size = int(text)
    if size > limit:
        raise too_large(limit, setting)
    return size


def too_large(limit: int, setting: str) -> PayloadTooLargeError:
    """The error for a body above ``limit`` bytes, naming the setting that sets it."""
    return PayloadTooLargeError(f"request body larger than {limit / (1024 * 1024):g} MiB ({setting})")


def check_access(host: str, authorization: bytes, key: bytes, public: bool) -> None:
    """Without a key: only loopback Host headers. With one: the bearer token, except on ``public`` routes."""
    if not key:
        check_host(host)
    elif not public:
        check_key(authorization, key)
