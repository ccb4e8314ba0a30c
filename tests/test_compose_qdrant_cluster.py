"""The 3-node Qdrant cluster compose file, checked without a Docker engine: it parses, its three nodes run in
cluster mode under one profile, the second and third bootstrap from the first, and each keeps its own storage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

COMPOSE = Path(__file__).resolve().parent.parent / "docker-compose.qdrant-cluster.yml"


def _services() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    services: dict[str, Any] = data["services"]
    return services


def test_three_nodes_in_cluster_mode_under_one_profile() -> None:
    services = _services()
    assert sorted(services) == ["qdrant-1", "qdrant-2", "qdrant-3"]
    for service in services.values():
        assert service["profiles"] == ["qdrant-cluster"]
        assert service["environment"]["QDRANT__CLUSTER__ENABLED"] == "true"
        assert "QDRANT__SERVICE__API_KEY" in service["environment"]


def test_followers_bootstrap_from_the_first_node_and_keep_their_own_storage() -> None:
    services = _services()
    assert "--uri http://qdrant-1:6335" in " ".join(services["qdrant-1"]["command"])
    for name in ("qdrant-2", "qdrant-3"):
        command = " ".join(services[name]["command"])
        assert "--bootstrap http://qdrant-1:6335" in command and f"--uri http://{name}:6335" in command
    volumes = [s["volumes"][0].split(":")[0] for s in services.values()]
    assert len(set(volumes)) == 3
