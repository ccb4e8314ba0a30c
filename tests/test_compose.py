"""The compose stack, checked without a Docker engine: the file parses, names its services, wires them as the README
says, every INDEXER_* variable it (or its env example) sets is a real setting with a valid value, and the commands
it runs are real `indexer` commands."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from indexer.cli.main import build_parser
from indexer.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "config" / "compose.env.example"
DOCKERFILE = ROOT / "Dockerfile"
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def example_env() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"^\w+=", line))
    return dict(pairs)


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} against env; $$ is a literal $."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2) or "", match.group(3) or ""
        if env.get(name):
            return env[name]
        if op.endswith("?"):
            raise AssertionError(f"compose would stop: {arg}")
        return arg if op.endswith("-") else ""

    return INTERPOLATION.sub(one, value).replace("$$", "$")


def setting_exists(variable: str) -> bool:
    """INDEXER_SECTION__KEY (or INDEXER_KEY) names a field of the settings tree."""
    parts = variable.removeprefix("INDEXER_").lower().split("__")
    model: Any = Settings
    for part in parts:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return False
        model = field.annotation
    return True


def test_compose_names_the_three_services(compose: dict[str, Any]) -> None:
    assert {"qdrant", "watch", "serve"} <= set(compose["services"])


def test_qdrant_is_the_official_pinned_image_with_volume_healthcheck_and_key(compose: dict[str, Any]) -> None:
    qdrant = compose["services"]["qdrant"]
    assert re.fullmatch(r"qdrant/qdrant:v\d+\.\d+\.\d+", qdrant["image"])
    assert any(v.endswith(":/qdrant/storage") and v.split(":")[0] in compose["volumes"] for v in qdrant["volumes"])
    assert qdrant["healthcheck"]["test"][0] == "CMD" and "/readyz" in " ".join(qdrant["healthcheck"]["test"])
    assert "QDRANT_API_KEY" in environment(qdrant)["QDRANT__SERVICE__API_KEY"]


def test_watch_daemon_has_a_gpu_read_only_photos_and_a_model_volume(compose: dict[str, Any]) -> None:
    watch = compose["services"]["watch"]
    devices = watch["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
    assert any(v.endswith(":/photos:ro") for v in watch["volumes"])
    models = [v for v in watch["volumes"] if v.endswith(":/models")]
    assert models and models[0].split(":")[0] in compose["volumes"]
    env = environment(watch)
    assert env["HF_HOME"].startswith("/models/") and env["INDEXER_STORE__QDRANT_URL"] == "http://qdrant:6333"
    assert "QDRANT_API_KEY" in env["INDEXER_STORE__API_KEY"]
    assert watch["depends_on"]["qdrant"]["condition"] == "service_healthy"
    # the decoders' shared memory for a GPU's look-ahead (4 batches of 256 at 224 px, twice): Docker's 64 MB is not
    assert watch["shm_size"] == "1gb" and 2 * 4 * 256 * 3 * 224 * 224 < 2**30


def test_search_service_needs_a_key_and_sees_the_same_photos(compose: dict[str, Any]) -> None:
    serve = compose["services"]["serve"]
    env = environment(serve)
    assert env["INDEXER_SERVE__API_KEY_FILE"] == "/run/secrets/indexer_api_key"
    assert "indexer_api_key" in serve["secrets"] and "indexer_api_key" in compose["secrets"]
    assert any(v.endswith(":/photos:ro") for v in serve["volumes"])
    assert env["INDEXER_SERVE__ROOTS"] == '["/photos"]'
    published = interpolate(serve["ports"][0], example_env())
    assert published.startswith("127.0.0.1:"), "published on loopback unless the user says otherwise"
    assert serve["image"] == compose["services"]["watch"]["image"]  # one image, built once


@pytest.mark.parametrize("service", ["watch", "serve"])
def test_services_run_real_indexer_commands(compose: dict[str, Any], service: str) -> None:
    args = build_parser().parse_args(compose["services"][service]["command"])
    assert args.command == service


def all_indexer_variables(compose: dict[str, Any]) -> dict[str, str]:
    found = {k: v for svc in compose["services"].values() for k, v in environment(svc).items()}
    found.update(example_env())
    return {k: v for k, v in found.items() if k.startswith("INDEXER_")}


def test_every_indexer_variable_is_a_real_setting(compose: dict[str, Any]) -> None:
    variables = all_indexer_variables(compose)
    compose_only = ("INDEXER_API_KEY_FILE", "INDEXER_PUBLISH", "INDEXER_COLLECTION", "INDEXER_IMAGE")
    settings_vars = [v for v in variables if v not in compose_only]
    assert len(settings_vars) >= 8
    unknown = [v for v in settings_vars if not setting_exists(v)]
    assert unknown == [], f"not settings: {unknown}"


@pytest.mark.parametrize("service", ["watch", "serve"])
def test_service_environment_loads_as_valid_settings(
    compose: dict[str, Any], service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = example_env()
    for key, value in environment(compose["services"][service]).items():
        if key.startswith("INDEXER_"):
            monkeypatch.setenv(key, interpolate(value, env))
    settings = load_settings()
    assert settings.store.qdrant_url == "http://qdrant:6333" and settings.store.api_key == env["QDRANT_API_KEY"]
    if service == "serve":
        assert settings.serve.roots == ["/photos"] and settings.model.device == "cpu"
    else:
        assert settings.watch.control_port == 8001 and settings.model.device == "cuda"


def test_variables_used_by_compose_are_documented_in_the_env_example() -> None:
    used = {m.group(1) for m in INTERPOLATION.finditer(COMPOSE.read_text())}
    assert used <= set(example_env()), used - set(example_env())


def test_dockerfile_is_slim_python_with_pinned_torch_and_the_indexer_entrypoint() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r'^ENTRYPOINT \["indexer"\]', text, re.M)
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for package in ("torch", "torchvision"):
        pin = next(d for d in pins if d.startswith(f"{package}=="))
        assert pin in text, f"Dockerfile must install {pin} as pyproject.toml pins it"


def test_dockerfile_is_fit_for_real_use() -> None:
    text = DOCKERFILE.read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert not re.search(r"^# *syntax *=", text, re.M | re.I), "a syntax line makes every build pull a frontend"
    assert "ARG EXTRA_CA_CERTS" in text and "update-ca-certificates" in text
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the container runs as an unprivileged user"

    def first(prefix: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    torch = next(i for i, line in enumerate(lines) if "torch==" in line)
    context = next(i for i, line in enumerate(lines) if line.startswith("COPY") and "--from=" not in line)
    # torch before anything from the build context, the dependencies before the code.
    assert torch < context < first("COPY indexer")
    # The CA text is an argument of its own stage only: it does not show in the history of the image's layers.
    stages = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    assert len(stages) == 2 and stages[0] < first("ARG EXTRA_CA_CERTS") < stages[1]
    deps = next(i for i, line in enumerate(lines) if "pip install '.[heif]'" in line)
    assert first("COPY pyproject.toml") < deps < first("COPY indexer")


def test_dockerignore_sends_only_what_the_image_needs() -> None:
    text = (ROOT / ".dockerignore").read_text()
    patterns = [p.strip() for p in text.splitlines() if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", "an allowlist: .git, .venv, .env, keys and stores never reach the daemon"
    assert {p[1:] for p in patterns if p.startswith("!")} == {"pyproject.toml", "README.md", "indexer"}


def test_compose_file_is_readable_by_docker_compose_v1(compose: dict[str, Any]) -> None:
    # v1.29 rejects a top-level "name" and environment-backed secrets; v2 accepts this subset too.
    assert "name" not in compose
    assert all("file" in secret for secret in compose["secrets"].values())


def _interpolated(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: _interpolated(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolated(item, env) for item in node]
    return interpolate(node, env) if isinstance(node, str) else node


def _volume_target(volume: Any) -> str:
    return str(volume["target"]) if isinstance(volume, dict) else str(volume).split(":")[1]


def _merged(base: Any, override: Any, key: str = "") -> Any:
    """Compose's merge of an override file, for what these files hold: mappings merge key by key, a service's
    volumes by container path, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: _merged(base[k], v, k) if k in base else v for k, v in {**base, **override}.items()}
    if key == "volumes" and isinstance(base, list) and isinstance(override, list):
        by_target = {_volume_target(v): v for v in base} | {_volume_target(v): v for v in override}
        return list(by_target.values())
    return override


def compose_config(files: list[Path], env: dict[str, str]) -> dict[str, Any]:
    """What `docker compose config` prints for ``files`` (the parts these tests read), without Docker: each file
    interpolated with ``env`` (a missing ${VAR:?...} fails), then merged in order."""
    merged: dict[str, Any] = {}
    for file in files:
        merged = _merged(merged, _interpolated(yaml.safe_load(file.read_text()), env))
    return merged


def _smoke_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "key").write_text("k\n")
    return {
        **example_env(),
        "PATH": os.environ["PATH"],
        "INDEXER_API_KEY_FILE": str(tmp_path / "key"),
        "SMOKE_MODEL_DIR": str(tmp_path),
        "SMOKE_DATA_VOLUME": "smoke-data",
    }


def _check_smoke_stack(merged: dict[str, Any]) -> None:
    assert {"qdrant", "watch", "serve"} <= set(merged["services"])
    serve = merged["services"]["serve"]
    assert serve["environment"]["INDEXER_STORE__QDRANT_URL"] == ""
    assert any(
        str(v).endswith("/photos:ro") or (isinstance(v, dict) and v.get("target") == "/photos")
        for v in serve["volumes"]
    )


def test_the_stack_and_the_smoke_override_merge_as_compose_merges_them(tmp_path: Path) -> None:
    """The checks of the real parser's test below, on any machine: interpolation, the override merged over the
    stack, every named volume and secret a service uses declared, every service with an image."""
    smoke = ROOT / "tests" / "docker-compose.smoke.yml"
    env = _smoke_env(tmp_path)
    stack = compose_config([COMPOSE], env)
    merged = compose_config([COMPOSE, smoke], env)
    for config in (stack, merged):
        for name, service in config["services"].items():
            assert "image" in service, f"service {name} has no image"
            for volume in service.get("volumes", []):
                source = str(volume).split(":")[0]
                assert source.startswith(("/", ".")) or source in config["volumes"], f"{name}: volume {source}"
            assert set(service.get("secrets", [])) <= set(config.get("secrets", {})), name
    _check_smoke_stack(merged)
    assert merged["services"]["serve"]["environment"]["INDEXER_STORE__DIR"] == "/data/store"
    assert merged["volumes"]["smoke-data"] == {"external": True, "name": "smoke-data"}
    assert stack["services"]["serve"]["environment"]["INDEXER_STORE__QDRANT_URL"] == "http://qdrant:6333"
    with pytest.raises(AssertionError, match="set SMOKE_MODEL_DIR"):
        compose_config([COMPOSE, smoke], {k: v for k, v in env.items() if k != "SMOKE_MODEL_DIR"})


def test_docker_compose_config_accepts_the_stack_and_the_smoke_override(tmp_path: Path) -> None:
    """The real docker-compose (v1) or docker compose (v2) parser, when one is installed (no engine needed)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        command = [docker, "compose"]
    elif shutil.which("docker-compose"):
        command = ["docker-compose"]
    else:
        pytest.skip("neither docker compose (v2) nor docker-compose (v1) is installed")
    env = _smoke_env(tmp_path)
    for files in (["-f", str(COMPOSE)], ["-f", str(COMPOSE), "-f", str(ROOT / "tests" / "docker-compose.smoke.yml")]):
        proc = subprocess.run(
            [*command, "--project-directory", str(ROOT), *files, "config"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        merged = yaml.safe_load(proc.stdout)
        assert {"qdrant", "watch", "serve"} <= set(merged["services"])
    _check_smoke_stack(merged)
