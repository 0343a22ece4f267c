"""A method is one object: a toy method defined and registered in this file alone (no library edit)
is configured, validated, saved and trained end to end through Ray like the built-in ones."""

import json
import sys
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import pytest
import ray.cloudpickle
import torch
import yaml

from noisymix.distributed.artifacts import RunDir
from noisymix.launch.cli import main
from noisymix.launch.config import ConfigError, build_config, config_from_record
from noisymix.mixing.config import Section, check_range
from noisymix.mixing.losses import one_hot
from noisymix.mixing.method import BatchContext, BatchRule, Method, method_class, method_names, register


# --- the whole toy method: label smoothing (Szegedy et al. 2016) as a noisy-label baseline -------------
@dataclass
class SmoothingConfig(Section):
    smoothing: float = 0.1

    def validate(self) -> None:
        super().validate()
        check_range("smoothing", self.smoothing, 0.0, 1.0, hi_open=True)


@dataclass
class SmoothedTargets(BatchRule):
    smoothing: float = 0.1

    def batch(self, ids, inputs, labels, rng):
        self.counts["smoothed"] = self.counts.get("smoothed", 0) + len(ids)
        return inputs, (1 - self.smoothing) * one_hot(labels, self.num_classes) + self.smoothing / self.num_classes


@register
class LabelSmoothing(Method):
    name = "toy_smoothing"
    summary = "cross-entropy on label-smoothed targets (a toy registered by a test)"
    Config = SmoothingConfig

    def batch_rule(self, context: BatchContext) -> BatchRule:
        return SmoothedTargets(context.num_classes, smoothing=self.config.smoothing)
# -----------------------------------------------------------------------------------------------------

# Ray's workers cannot import this test module: ship its classes by value, as a method kept in a script must be.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_the_registry_finds_the_toy_and_an_unknown_name_lists_the_known_ones():
    assert method_class("toy_smoothing") is LabelSmoothing
    assert {"ce", "clean", "mixup", "gmm_select", "selectmix", "mixnn", "toy_smoothing"} <= set(method_names())
    with pytest.raises(ConfigError, match="method='dividemix' is not one of .*mixnn.*toy_smoothing"):
        build_config(overrides={"method": "dividemix"})
    with pytest.raises(ValueError, match="taken"):
        register(type("Other", (Method,), {"name": "toy_smoothing"}))


def test_the_toys_knobs_are_typed_validated_and_owned_by_it_alone():
    config = build_config(overrides={"method": "toy_smoothing", "smoothing": 0.3, "folds": 3})
    assert isinstance(config.method.config, SmoothingConfig) and config.method.config.smoothing == 0.3
    assert config.ignored == ("folds",), "another method's knob is set aside, not silently applied"
    with pytest.raises(ConfigError, match=r"smoothing=1.5 is outside \[0.0, 1.0\)"):
        build_config(overrides={"method": "toy_smoothing", "smoothing": 1.5})
    with pytest.raises(ConfigError, match="smoothing must be float"):
        build_config(overrides={"method": "toy_smoothing", "smoothing": "lots"})
    assert "smoothing" in build_config(overrides={"method": "ce", "smoothing": 0.3}).ignored


@pytest.mark.parametrize("method", ["ce", "mixup", "gmm_select", "selectmix", "mixnn", "toy_smoothing"])
def test_the_typed_config_round_trips_through_yaml(tmp_path, method):
    config = build_config(overrides={"method": method, "epochs": 7, "lr": 0.02, "seed": 3})
    config.save(tmp_path / "config.yaml")
    again = config_from_record(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == config and again.to_dict() == config.to_dict()
    assert build_config(tmp_path / "config.yaml") == config, "a saved config is a recipe"


def test_the_toy_batch_rule_smooths():
    rule = LabelSmoothing(SmoothingConfig(0.2)).batch_rule(BatchContext(num_classes=4))
    x, targets = rule.batch(torch.arange(2), torch.zeros(2, 1), torch.tensor([0, 3]), np.random.default_rng(0))
    assert torch.allclose(targets[0], torch.tensor([0.85, 0.05, 0.05, 0.05])) and rule.counts == {"smoothed": 2}


def test_the_typed_config_round_trips_through_ray(ray_session):
    config = build_config(overrides={"method": "toy_smoothing", "smoothing": 0.25})
    echo = ray_session.remote(lambda value: value)
    assert ray_session.get(echo.remote(config)) == config


def test_the_toy_trains_end_to_end_through_ray(ray_session, digits_dir, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "method=toy_smoothing", "smoothing=0.3", f"data_dir={digits_dir}", f"run_dir={run}",
                 "epochs=2", "num_workers=2", "num_shards=4"])
    assert code == 0, capsys.readouterr().err
    summary = RunDir(run).summary()
    assert summary["method"] == "toy_smoothing" and summary["epochs"] == 2 and summary["workers"] == 2
    n_train = json.loads((digits_dir / "manifest.json").read_text())["splits"]["train"]["count"]
    assert [r["samples_smoothed"] for r in RunDir(run).metrics()] == [n_train, n_train], "the workers ran its rule"
    assert RunDir(run).config_values()["smoothing"] == 0.3


def test_the_readmes_method_example_registers_and_builds():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(example, "README.md", "exec"), {"__name__": "readme_example"})
    config = build_config(overrides={"method": "smoothing", "smoothing": 0.2})
    rule = config.method.batch_rule(BatchContext(num_classes=5))
    _, targets = rule.batch(torch.arange(1), torch.zeros(1, 1), torch.tensor([2]), np.random.default_rng(0))
    assert torch.allclose(targets, torch.tensor([[0.04, 0.04, 0.84, 0.04, 0.04]]))
