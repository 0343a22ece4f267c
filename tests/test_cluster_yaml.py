"""cluster.yaml passes Ray's own launcher validation (defaults merged, schema checked)."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_is_a_valid_ray_launcher_config():
    config = prepare_config(yaml.safe_load(CLUSTER.read_text()))
    validate_config(config)
    types = config["available_node_types"]
    assert types["gpu_worker"]["resources"]["GPU"] == 1 and types["head"]["resources"]["GPU"] == 0
    assert any("noisymix" in command for command in config["setup_commands"])


def test_dashboard_binds_to_localhost():
    config = yaml.safe_load(CLUSTER.read_text())
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
