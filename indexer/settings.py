"""One typed settings tree, built once at the entry point and passed down.

Precedence (lowest first): defaults < config file < ``INDEXER_*`` environment variables (nested with ``__``,
e.g. ``INDEXER_MODEL__DIR``) < command-line flags. The config file is ``--config FILE``, else ``$INDEXER_CONFIG``,
else ``config/indexer.toml`` in the working directory when present. Every setting is documented in
``config/indexer.example.toml``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from indexer.errors import ConfigError
from indexer.records import SEARCH_LIMIT, SEARCH_LIMIT_MAX, SEARCH_THRESHOLD

DEFAULT_CONFIG_FILE = Path("config/indexer.toml")


def default_store_dir() -> Path:
    """``$XDG_DATA_HOME/indexer/store`` (``~/.local/share/indexer/store`` when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "indexer" / "store"


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/indexer`` (``~/.cache/indexer`` when unset): where the facts remembered between runs live
    (open_clip configs, weights hashes, resolved models, the CPU dtype, thumbnails of a server store)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")) / "indexer"


def check_device(value: str) -> str:
    """A device setting: auto, cpu, cuda or cuda:N (else ValueError, which names the setting in a ConfigError)."""
    ok = value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())
    if not ok:
        raise ValueError("must be auto, cpu, cuda or cuda:N")
    return value


class _Section(BaseModel):
    # No inf/nan anywhere: every number here is a size, a count or a time that must be finite.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class StoreSettings(_Section):
    """Where vectors live: the embedded Qdrant Edge directory, or a Qdrant server."""

    dir: Path = Field(default_factory=default_store_dir)
    qdrant_url: str = ""
    api_key: str = ""
    collection: str = "images"
    optimize_after: int = Field(default=1000, ge=0)
    # Free space (MB) the embedded store keeps on its filesystem: it refuses to open or write below it, since
    # Qdrant Edge memory-maps its files and a write into a full disk kills the process (SIGBUS).
    min_free_mb: float = Field(default=64.0, ge=0, allow_inf_nan=False)
    # `indexer index` and `indexer watch` open the embedded store in a process of its own (`store/child.py`), so
    # that Qdrant Edge's GIL-holding point conversion and writes run beside the main process's threads. auto: where
    # the model runs on CUDA (there the main process's CPU paces the run); on; off.
    separate_process: Literal["auto", "on", "off"] = "auto"

    @field_validator("dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()


class ModelSettings(_Section):
    """Which CLIP model, where its weights are, and how to run it."""

    name: str = "ViT-L-14"
    pretrained: str = "openai"
    weights: str = ""
    dir: str = ""
    device: str = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    batch_size: int = Field(default=0, ge=0)
    allow_download: bool = True
    compile: bool = False  # torch.compile the image tower (GPU: +15% measured; costs a compile at start)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        return check_device(value)


class DecodeSettings(_Section):
    """Decoding: worker processes, look-ahead and limits against hostile files."""

    workers: int = Field(default=0, ge=0)
    lookahead: int = Field(default=0, ge=0)
    max_pixels: int = Field(default=178_956_970, gt=0)
    max_file_mb: float = Field(default=512.0, gt=0)
    full_resolution: bool = False  # JPEGs at full size instead of a DCT draft: exact reference parity, slower
    # MB of big images (PNG, TIFF, ... decode at full size) the workers decode at once; 0: a quarter of the memory
    memory_mb: int = Field(default=0, ge=0)
    # nvJPEG on the GPU for JPEGs, mixed with the CPU workers (indexer.decode.mixed): auto = where the model is on CUDA
    gpu: Literal["auto", "on", "off"] = "auto"


class IndexSettings(_Section):
    """Which files a scan picks up."""

    follow_symlinks: bool = True
    include_hidden: bool = False


class SearchSettings(_Section):
    """Defaults for queries."""

    limit: int = Field(default=SEARCH_LIMIT, ge=1, le=SEARCH_LIMIT_MAX)
    threshold: float | None = Field(default=SEARCH_THRESHOLD, ge=-1.0, le=1.0)
    # How far a search walks the HNSW graph (Qdrant's hnsw_ef): higher finds more of the true nearest at more cost.
    # 0: the store's default (the embedded store: 1024, bench/README.md "Search"; a server: its collection's).
    hnsw_ef: int = Field(default=0, ge=0, le=65_536)

    def resolve(self, limit: int | None, threshold: float | None) -> tuple[int, float | None]:
        """A query's limit and threshold: the ones asked, else these defaults (a bad one is refused by the query)."""
        return limit if limit is not None else self.limit, threshold if threshold is not None else self.threshold


class WatchSettings(_Section):
    """The watch daemon (`indexer watch`)."""

    paths: list[str] = Field(default_factory=list)
    max_wait: float = Field(default=0.5, gt=0)
    stable_seconds: float = Field(default=1.0, gt=0)
    unclosed_timeout: float = Field(default=300.0, gt=0)
    poll: bool = False
    poll_interval: float = Field(default=1.0, gt=0)
    rescan_interval: float = Field(default=3600.0, ge=0)
    mass_delete_fraction: float = Field(default=0.5, gt=0, le=1)
    mass_delete_min: int = Field(default=10, ge=0)
    confirm_delay: float = Field(default=600.0, gt=0)
    queue_size: int = Field(default=10_000, ge=1)
    control_host: str = "127.0.0.1"
    control_port: int = Field(default=0, ge=0, le=65535)
    json_logs: bool = False


class ServeSettings(_Section):
    """The HTTP search service (`indexer serve`)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: str = ""
    api_key_file: str = ""
    roots: list[str] = Field(default_factory=list)
    thumbnail_dir: str = ""
    thumbnail_size: int = Field(default=256, ge=16, le=2048)
    max_upload_mb: float = Field(default=20.0, gt=0)
    threads: int = Field(default=1, ge=0, le=1024)
    # Search requests with uploaded images decoded at once (off the event loop and the engine thread); one
    # more is refused with 503 and Retry-After. Bounds the memory of huge-pixel uploads.
    max_decodes: int = Field(default=2, ge=1, le=64)
    # Deadlines of a client (seconds): its headers after connecting, its body after the headers; and the open
    # connections at most (fewer when the open-files limit is lower). See indexer.api.server.
    header_timeout: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    body_timeout: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    max_connections: int = Field(default=1000, ge=8)


# The lowest cosine a duplicate tier may use: below it most unrelated images join one group, and an action on
# that group would move or delete nearly everything.
DEDUP_MIN_THRESHOLD = 0.5


class DedupSettings(_Section):
    """Duplicate tiers (cosine thresholds; "exact" means same sha256) and the neighbour pass."""

    near_threshold: float = Field(default=0.95, ge=DEDUP_MIN_THRESHOLD, le=1)
    similar_threshold: float = Field(default=0.90, ge=DEDUP_MIN_THRESHOLD, le=1)
    block_size: int = Field(default=4096, ge=1)
    report_max_groups: int = Field(default=500, ge=1)
    # The pair pass (indexer.library.dedup.PairPlan): exact, cells (k-means cells, for big libraries on the CPU),
    # or auto (exact on a GPU, and on the CPU up to exact_up_to vectors); device auto = a GPU when CUDA is present.
    method: Literal["auto", "exact", "cells"] = "auto"
    device: str = "auto"
    exact_up_to: int = Field(default=200_000, ge=0)
    probes: int = Field(default=16, ge=1)
    reach: float = Field(default=0.06, ge=0, le=2)
    # A folder duplicates may always be moved to (`indexer dedup --move-to` without DIR, the page's default);
    # files moved there leave the index unless it lies under watch.paths or serve.roots.
    duplicates_dir: str = ""


class ClusterSettings(_Section):
    """k-means over the stored vectors (`indexer cluster`)."""

    k: int = Field(default=0, ge=0)
    seed: int = 0
    max_k: int = Field(default=50, ge=2)
    sample: int = Field(default=10_000, ge=2)
    # Where the centres are refined (indexer.library.cluster): auto = Lloyd's k-means on a GPU when CUDA is present,
    # else the CPU's MiniBatchKMeans pass; cpu; cuda or cuda:N.
    device: str = "auto"

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        return check_device(value)


class Settings(BaseSettings):
    """The whole tree. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="INDEXER_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    store: StoreSettings = Field(default_factory=StoreSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    decode: DecodeSettings = Field(default_factory=DecodeSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    search: SearchSettings = Field(default_factory=SearchSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    dedup: DedupSettings = Field(default_factory=DedupSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file comes from model_config["toml_file"], set per load by load_settings().
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def resolve_config_file(explicit: Path | None) -> Path | None:
    """``--config`` > ``$INDEXER_CONFIG`` > ``config/indexer.toml`` if it exists > none."""
    if explicit is not None:
        return _must_exist(explicit, "--config")
    env = os.environ.get("INDEXER_CONFIG")
    if env:
        return _must_exist(Path(env), "INDEXER_CONFIG")
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def _must_exist(path: Path, setting: str) -> Path:
    if not path.is_file():
        raise ConfigError(setting, f"config file {path} does not exist")
    return path


def load_settings(config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build the settings tree; ``overrides`` (from CLI flags, nested dicts) win over everything else."""
    path = resolve_config_file(config_file)
    bound: type[Settings] = type(
        "Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": path}}
    )
    try:
        return bound(**(overrides or {}))
    except ValidationError as exc:
        raise _config_error(exc) from None
    except SettingsError as exc:  # an environment variable that must hold JSON (a list) does not
        raise _env_error(exc) from None
    except (OSError, ValueError) as exc:  # unreadable or malformed TOML
        raise ConfigError("config file", f"{path}: {exc}") from None


def _config_error(exc: ValidationError) -> ConfigError:
    first = exc.errors()[0]
    setting = ".".join(str(part) for part in first["loc"]) or "settings"
    reason = first["msg"]
    if first["type"] == "extra_forbidden":
        reason = "unknown setting (see config/indexer.example.toml)"
    elif "input" in first and not isinstance(first["input"], dict):
        reason = f"{reason} (got {first['input']!r})"
    return ConfigError(setting, reason)


def _env_error(exc: SettingsError) -> ConfigError:
    """Name the ``INDEXER_*`` variable whose value is not the JSON its setting needs (pydantic names the section)."""
    for name, value in sorted(os.environ.items()):
        if name.upper().startswith("INDEXER_") and "__" in name and value[:1] in ("[", "{") and not _is_json(value):
            return ConfigError(name, f'not valid JSON (got {value!r}; a list is written like ["a", "b"])')
    for name, value in sorted(os.environ.items()):
        if name.upper().startswith("INDEXER_") and "__" in name and not _is_json(value) and _wants_json(name):
            return ConfigError(name, f'must be a JSON list (got {value!r}; write it like ["a", "b"])')
    return ConfigError("environment", str(exc))


def _is_json(value: str) -> bool:
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _wants_json(name: str) -> bool:
    """True when the variable names a list or dict setting (``INDEXER_SECTION__FIELD``)."""
    section, _, leaf = name[len("INDEXER_") :].lower().partition("__")
    field = Settings.model_fields.get(section)
    model = field.annotation if field is not None else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)) or leaf not in model.model_fields:
        return False
    return str(model.model_fields[leaf].annotation).startswith(("list", "dict"))
