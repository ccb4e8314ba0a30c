"""The indexer's exceptions.

    IndexerError                 base; every error the CLI and API know how to report
    ├── ConfigError              a setting is invalid (names the setting)          → exit 2
    ├── ModelError               the model cannot be built or run
    │   └── WeightsNotFoundError no weights offline; names the files and where to put them
    ├── StoreError               the vector store failed
    │   ├── StoreBusyError       the embedded store is open in another process
    │   └── ModelMismatchError   the collection was made by another model
    └── DecodeError              one file cannot be turned into pixels (carried per file, never fails a batch)

The CLI maps them to exit codes in one place (`indexer.cli`): configuration and usage errors exit 2,
everything else that stops a command exits 2 as well, and a run that finished with some failed files exits 1.
"""

from __future__ import annotations

from pathlib import Path


class IndexerError(Exception):
    """Base class of every error the indexer raises on purpose."""


class ConfigError(IndexerError):
    """An invalid setting; `setting` names it (dotted, as in the config file)."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"invalid setting {setting}: {reason}")
        self.setting = setting
        self.reason = reason


class ModelError(IndexerError):
    """The model cannot be built, loaded or run."""


class WeightsNotFoundError(ModelError):
    """No weights could be found locally and none could be downloaded."""

    def __init__(self, model: str, expected: list[str], places: list[str], cause: str = "") -> None:
        lines = [f"no weights found for model {model}."]
        lines.append("Expected one of: " + ", ".join(expected))
        lines.append("Looked in: " + "; ".join(places))
        lines.append(
            "Put the file in the model directory (--model-dir / INDEXER_MODEL__DIR), pass --weights FILE, "
            "or run once with network access to fill the Hugging Face cache (HF_HOME)."
        )
        if cause:
            lines.append(f"Download failed: {cause}")
        super().__init__("\n".join(lines))
        self.model = model
        self.expected = expected
        self.places = places


class StoreError(IndexerError):
    """The vector store failed."""


class StoreBusyError(StoreError):
    """The embedded store directory is held by another process."""

    def __init__(self, path: Path, detail: str = "") -> None:
        msg = f"the store at {path} is in use by another process"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)
        self.path = path


class ModelMismatchError(StoreError):
    """The collection records a different model than the one asked for."""

    def __init__(self, store_model: str, model: str, where: str) -> None:
        super().__init__(
            f"the store {where} was built with model {store_model!r}, not {model!r}: "
            "use the same model, or a new store (--store DIR / --collection NAME)"
        )
        self.store_model = store_model
        self.model = model


class DecodeError(IndexerError):
    """One file could not be decoded; `reason` is the short human explanation."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
