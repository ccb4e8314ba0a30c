"""Settings: defaults < config file < INDEXER_* environment < CLI flags; clear errors naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from indexer.errors import ConfigError
from indexer.settings import load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("INDEXER_CONFIG", "INDEXER_MODEL__BATCH_SIZE", "INDEXER_STORE__DIR", "INDEXER_MODEL__DEVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no config/indexer.toml here


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_need_no_file() -> None:
    s = load_settings()
    assert s.model.name == "ViT-L-14" and s.model.pretrained == "openai"
    assert s.store.dir.name == "store" and s.store.collection == "images"


def test_precedence_file_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path / "c.toml", "[model]\nbatch_size = 5\ndevice = 'cpu'\n[store]\ndir = '/from/file'\n")
    assert load_settings(cfg).model.batch_size == 5
    monkeypatch.setenv("INDEXER_MODEL__BATCH_SIZE", "7")
    s = load_settings(cfg)
    assert s.model.batch_size == 7 and s.model.device == "cpu" and s.store.dir == Path("/from/file")
    assert load_settings(cfg, {"model": {"batch_size": 9}}).model.batch_size == 9


def test_default_config_file_and_env_pointer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config").mkdir()
    write(tmp_path / "config" / "indexer.toml", "[search]\nlimit = 3\n")
    assert load_settings().search.limit == 3
    other = write(tmp_path / "other.toml", "[search]\nlimit = 4\n")
    monkeypatch.setenv("INDEXER_CONFIG", str(other))
    assert load_settings().search.limit == 4


@pytest.mark.parametrize(
    ("text", "setting", "words"),
    [
        ("[model]\nbatch_size = -1\n", "model.batch_size", "greater than or equal to 0"),
        ("[model]\nbogus = 1\n", "model.bogus", "unknown setting"),
        ("[model]\ndevice = 'gpu'\n", "model.device", "auto, cpu, cuda or cuda:N"),
        ("[decode]\nmax_pixels = 'many'\n", "decode.max_pixels", "valid integer"),
        ("[model\n", "config file", "Expected"),
    ],
)
def test_invalid_settings_name_the_setting(tmp_path: Path, text: str, setting: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path / "bad.toml", text))
    assert err.value.setting == setting
    assert words in str(err.value)


def test_invalid_env_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INDEXER_MODEL__BATCH_SIZE", "lots")
    with pytest.raises(ConfigError, match=r"model\.batch_size"):
        load_settings()


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_example_config_is_valid_and_complete() -> None:
    """config/indexer.example.toml parses, and documents every setting of the tree (commented out or not)."""
    import re

    from pydantic import BaseModel

    from indexer.settings import Settings

    example = Path(__file__).resolve().parents[1] / "config" / "indexer.example.toml"
    load_settings(example)
    sections = re.split(r"^\[(\w+)\]$", example.read_text(), flags=re.M)
    texts = {"": sections[0], **dict(zip(sections[1::2], sections[2::2], strict=True))}
    for name, field in Settings.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            for key in kind.model_fields:
                assert re.search(rf"^#? ?{key} =", texts.get(name, ""), re.M), f"[{name}] {key} undocumented"
        else:
            assert re.search(rf"^{name} =", texts[""], re.M), f"{name} undocumented"
