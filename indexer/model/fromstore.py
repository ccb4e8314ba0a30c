"""The model a store records, found again: a command given no model uses the store's.

A store records the identity of the model that made its vectors (``NAME@sha256:<16 hex>``, or ``NAME/random``).
When no model is given (``model.name``, ``model.pretrained`` and ``model.weights`` left at their defaults by flags,
environment and config file), a command on an existing store uses that model. Its weights are looked for, and each
candidate is accepted only if its identity is the recorded one:

1. the models this machine resolved before (``$XDG_CACHE_HOME/indexer/models.json``: identity → the settings that
   built it, written whenever a model is resolved);
2. the configured route (``model.dir``, the Hugging Face cache, with the recorded name as the architecture);
3. the weights files hashed before (``weights-sha256.json``) and the Hugging Face cache's blobs (named by their
   sha256) whose hash starts with the recorded one.

Not found: a ConfigError naming the recorded model and saying to pass ``--model`` / ``--weights``. A model that is
given and does not match the store is refused when the store is opened, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from indexer.atomicio import read_json_cache, write_json_cache
from indexer.errors import ConfigError, IndexerError
from indexer.model import hfclip
from indexer.model.weights import ModelSource, hash_cache_file, hf_cache_dir, packaged_config, resolve_source
from indexer.settings import ModelSettings, Settings, cache_dir

__all__ = [
    "CHOICE_FIELDS",
    "model_for_store",
    "model_given",
    "remember_source",
    "settings_for_model",
    "with_store_model",
]

log = logging.getLogger(__name__)

CHOICE_FIELDS = frozenset({"name", "pretrained", "weights"})  # the settings that choose a model (model.dir: where)
_ROUTE_FIELDS = ("name", "pretrained", "weights", "dir")


def model_given(settings: ModelSettings) -> bool:
    """Whether a flag, the environment or the config file chose a model (not just where weights are kept)."""
    return bool(settings.model_fields_set & CHOICE_FIELDS)


def with_store_model(settings: Settings) -> Settings:
    """``settings`` with the model the embedded store records, where no model was given (`model_for_store`)."""
    if settings.store.qdrant_url or model_given(settings.model):
        return settings
    from indexer.store.directory import recorded_model

    return model_for_store(settings, recorded_model(settings.store.dir))


def model_for_store(settings: Settings, recorded: str | None) -> Settings:
    """``settings`` with the model the store records (``recorded``), where none was given; else unchanged."""
    if recorded is None or model_given(settings.model):
        return settings
    found = settings_for_model(recorded, settings.model)
    if found is None:
        raise ConfigError(
            "model",
            f"the store {settings.store.dir} holds vectors of {recorded}, and its weights are not found here "
            "(looked in the models used before on this machine, model.dir and the Hugging Face cache); "
            "give them with --model / --weights / --model-dir",
        )
    log.info("model %s: the one the store records", recorded)
    return settings.model_copy(update={"model": found})


def settings_for_model(recorded: str, base: ModelSettings) -> ModelSettings | None:
    """Model settings (``base``'s device, dtype, batch size and the like kept) that build the model ``recorded``,
    or None where its weights are not found."""
    for candidate in _candidates(recorded, base):
        try:
            source = resolve_source(candidate)
        except IndexerError as exc:
            log.debug("not %s: %s", recorded, exc)
            continue
        if source.model_id == recorded:
            return candidate
    return None


def _candidates(recorded: str, base: ModelSettings) -> Iterator[ModelSettings]:
    label, _, digest = recorded.partition("@sha256:")
    if not digest:
        name = recorded.removesuffix("/random")
        if name != recorded:
            yield _with(base, name=name, pretrained="none", weights="")
        return
    remembered = read_json_cache(models_cache_file()).get(recorded)
    if isinstance(remembered, dict):
        yield _with(base, **{k: str(remembered.get(k, "")) for k in _ROUTE_FIELDS})
    builtin = packaged_config(label) is not None  # an open_clip architecture (known without importing open_clip)
    for path in _files_with_hash(digest):
        yield from _routes_for_file(path, label if builtin else None, base)
    if builtin:
        yield _with(base, name=label)


def _routes_for_file(path: Path, builtin: str | None, base: ModelSettings) -> Iterator[ModelSettings]:
    folder = path.parent
    for config in (folder / "config.json", folder / "open_clip_config.json"):
        if config.is_file():
            transformers = hfclip.is_transformers_dir(folder)
            yield _with(base, name=str(config), weights="" if transformers else str(path))
            break
    if builtin is not None:
        yield _with(base, name=builtin, weights=str(path))


def _files_with_hash(digest: str) -> Iterator[Path]:
    """Weights files whose sha256 starts with ``digest``: hashed before on this machine, or Hugging Face blobs."""
    for key, entry in read_json_cache(hash_cache_file()).items():
        if isinstance(entry, dict) and str(entry.get("sha256", "")).startswith(digest) and Path(key).is_file():
            yield Path(key)
    hub = Path(hf_cache_dir())
    for blob in hub.glob(f"models--*/blobs/{digest}*") if hub.is_dir() else ():
        yield from _snapshot_links(blob)


def _snapshot_links(blob: Path) -> Iterator[Path]:
    """The snapshot files of a hub repo that point at ``blob`` (their folder holds the config), else the blob."""
    found = False
    for link in blob.parent.parent.glob("snapshots/*/*"):
        if link.is_symlink() and link.resolve() == blob.resolve():
            found = True
            yield link
    if not found:
        yield blob


def _with(base: ModelSettings, **route: str) -> ModelSettings:
    return base.model_validate({**base.model_dump(), "weights": "", "pretrained": "openai", **route})


def remember_source(settings: ModelSettings, source: ModelSource) -> None:
    """Remember which settings built ``source`` (best effort; only when it changed), so that a store it made can
    find it again with no model given."""
    if source.weights is None:
        return
    cache = models_cache_file()
    known = read_json_cache(cache)
    route = {k: str(getattr(settings, k)) for k in _ROUTE_FIELDS}
    for key in ("weights", "dir", "name"):  # paths made absolute: the cache serves commands run from anywhere
        if route[key] and (key != "name" or route[key].endswith(".json")):
            route[key] = str(Path(route[key]).expanduser().absolute())
    if known.get(source.model_id) != route:
        write_json_cache(cache, {**known, source.model_id: route})


def models_cache_file() -> Path:
    return cache_dir() / "models.json"
