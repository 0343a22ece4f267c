"""cluster.yaml passes Ray's own launcher validation (defaults merged, schema checked)."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-s3.yaml"])
def test_cluster_yaml_is_a_valid_ray_launcher_config(name):
    config = prepare_config(yaml.safe_load((ROOT / name).read_text()))
    validate_config(config)
    types = config["available_node_types"]
    assert types["gpu_worker"]["resources"]["GPU"] == 1 and types["head"]["resources"]["GPU"] == 0
    assert any("noisymix" in command for command in config["setup_commands"])


def test_the_object_storage_variant_mounts_no_shared_file_system_and_gives_every_node_a_profile():
    config = yaml.safe_load((ROOT / "cluster-s3.yaml").read_text())
    assert not config.get("initialization_commands") and "nfs" not in (ROOT / "cluster-s3.yaml").read_text()
    for node_type in config["available_node_types"].values():
        assert "IamInstanceProfile" in node_type["node_config"]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-s3.yaml"])
def test_dashboard_binds_to_localhost(name):
    config = yaml.safe_load((ROOT / name).read_text())
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
