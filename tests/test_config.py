import pytest
import yaml

from noisymix.launch.config import Config, ConfigError, build_config, parse_overrides
from noisymix.mixing.method import method_names


def test_defaults_resolve_data_and_run_dirs():
    config = build_config()
    assert config.method.name == "selectmix" and config.data.noise_type == "symmetric" and config.data.noise_rate == 0.4
    assert config.data.data_dir.endswith("digits-symmetric40-seed0")
    assert config.run.run_dir.startswith("runs/selectmix-digits-symmetric40-")
    assert build_config(overrides={"train_subset": 500}).data.data_dir.endswith("digits-n500-symmetric40-seed0")


def test_overrides_parse_as_yaml_values():
    values = parse_overrides(["lr=0.1", "hflip=true", "milestones=[5, 8]", "noise_map={3: 5}", "source_path=/x/y"])
    assert values == {"lr": 0.1, "hflip": True, "milestones": [5, 8], "noise_map": {3: 5}, "source_path": "/x/y"}
    config = build_config(overrides=values)
    assert config.train.lr == 0.1 and config.train.hflip is True and config.data.noise_map == {3: 5}


def test_recipe_then_overrides_and_saved_config_round_trips(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "mixup", "epochs": 7, "alpha": 0.5}))
    config = build_config(recipe, {"epochs": 3})
    assert (config.method.name, config.train.epochs, config.method.config.alpha) == ("mixup", 3, 0.5)
    config.save(tmp_path / "saved.yaml")
    again = build_config(tmp_path / "saved.yaml")
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize("value", ["1-3", [1, 3], " 1 - 3 "])
def test_a_worker_range_is_an_elastic_group(value):
    resources = build_config(overrides={"num_workers": value, "num_shards": 6}).resources
    assert (resources.min_workers, resources.num_workers, resources.elastic) == (1, 3, True)
    fixed = build_config(overrides={"num_workers": 2}).resources
    assert (fixed.min_workers, fixed.elastic) == (0, False)


@pytest.mark.parametrize("overrides, loaders", [
    ({}, 0),                                                                   # CPU: the worker's threads decode
    ({"use_gpu": True}, 4),                                                    # one reserved CPU: the floor
    ({"use_gpu": True, "cpus_per_worker": 12, "num_shards": 64}, 11),         # the worker's CPUs less one
    ({"use_gpu": True, "cpus_per_worker": 12, "num_shards": 64, "num_workers": 8}, 8),   # its share of the shards
    ({"use_gpu": True, "cpus_per_worker": 12, "loader_workers": 2}, 2),       # as asked
])
def test_loader_workers_follow_the_workers_cpus_on_a_gpu_within_its_share_of_shards(overrides, loaders):
    assert build_config(overrides=overrides).resources.loader_workers == loaders


def test_asked_loader_workers_that_the_shards_cannot_feed_are_refused():
    with pytest.raises(ConfigError, match="num_shards=16 cannot feed num_workers x loader_workers = 24 readers"):
        build_config(overrides={"use_gpu": True, "num_workers": 2, "loader_workers": 12, "num_shards": 16})


def test_the_allocator_setting_becomes_the_environment_of_the_runs_processes():
    assert build_config().resources.heap_env() == {}
    fixed = build_config(overrides={"heap_mmap_threshold_kb": 128}).resources.heap_env()
    assert fixed == {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


# glibc's default behaviour, probed: after an 8 MB block is freed, a 1 MB block comes from the heap (the mmap threshold
# rose to 8 MB) instead of a mapping of its own, which would be returned when freed.
FREED_HEAP_IS_KEPT = """
import ctypes

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.mallinfo2.restype = [ctypes.c_void_p], MallInfo2
libc.free(libc.malloc(8 << 20))
mapped = libc.mallinfo2().hblkhd
block = libc.malloc(1 << 20)
print(libc.mallinfo2().hblkhd - mapped < 1 << 20)
libc.free(block)
"""


@pytest.mark.parametrize("threshold_kb, kept", [(0, "True"), (128, "False")])
def test_a_process_started_with_the_allocator_environment_keeps_no_freed_heap(threshold_kb, kept):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(build_config(overrides={"heap_mmap_threshold_kb": threshold_kb}).resources.heap_env())
    probe = subprocess.run([sys.executable, "-c", FREED_HEAP_IS_KEPT], capture_output=True, text=True, check=True,
                           env=env)
    assert probe.stdout.strip() == kept


def test_passes_without_gradient_batch_as_training_does_unless_told():
    assert build_config(overrides={"batch_size": 64}).train.eval_batch == 64
    assert build_config(overrides={"batch_size": 64, "eval_batch_size": 512}).train.eval_batch == 512


def test_ints_are_accepted_for_floats():
    assert build_config(overrides={"lr": 1}).train.lr == 1.0


@pytest.mark.parametrize("overrides, message", [
    ({"learning_rate": 0.1}, "unknown config key.*learning_rate"),
    ({"method": "dividemix"}, "method='dividemix' is not one of"),
    ({"noise_type": "gaussian"}, "noise_type='gaussian'"),
    ({"noise_rate": 1.0}, r"noise_rate=1.0 is outside \[0.0, 1.0\)"),
    ({"noise_rate": -0.1}, "noise_rate"),
    ({"epochs": 0}, "epochs=0 is outside"),
    ({"method": "mixnn", "target_dtype": "float64"}, "target_dtype='float64' is not one of float32, float16"),
    ({"method": "mixnn", "target_topk": -1}, r"target_topk=-1 is outside \[0, inf\)"),
    ({"method": "gmm_select", "state_checkpoint_every": 0}, "state_checkpoint_every=0 is outside"),
    ({"epochs": "ten"}, "epochs must be int"),
    ({"hflip": "maybe"}, "hflip must be bool"),
    ({"batch_size": True}, "batch_size must be int"),
    ({"eval_batch_size": -1}, r"eval_batch_size=-1 is outside \[0, inf\)"),
    ({"lr": 0}, "lr=0.0 is outside"),
    ({"alpha": -1}, "alpha"),
    ({"method": "selectmix", "fold_epochs": 0}, "fold_epochs must be -1 .auto. or a number of epochs >= 1"),
    ({"method": "crossmix", "fold_rounds": 0}, r"fold_rounds=0 is outside \[1, inf\)"),
    ({"method": "selectmix", "fold_mixup": -0.5}, r"fold_mixup=-0.5 is outside \[0.0, inf\)"),
    ({"method": "selectmix", "fold_round_train": "flagged"}, r"fold_round_train=.flagged. is not one of corrected, kept"),
    ({"val_fraction": 0}, "val_fraction"),
    ({"milestones": [8, 5]}, "milestones"),
    ({"noise_type": "none"}, "noise_rate=0"),
    ({"noise_type": "file", "noise_rate": 0}, "needs noise_file"),
    ({"num_shards": 2, "num_workers": 4}, "num_shards=2 cannot feed"),
    ({"noise_map": {"a": "b"}}, "noise_map must map"),
    ({"seed": None}, "seed cannot be null"),
    ({"train_subset": -1}, "train_subset=-1 is outside"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"noise_rate": float("inf")}, "noise_rate must be a finite number"),
    ({"num_workers": "2-1"}, r"num_workers must be .*MIN-MAX"),
    ({"num_workers": "0-2"}, r"num_workers must be .*1 <= MIN <= MAX"),
    ({"num_workers": [1, 2, 3]}, "num_workers must be"),
    ({"num_workers": "two"}, "num_workers must be"),
    ({"min_workers": 3, "num_workers": 2}, r"min_workers=3 is outside \[0, 2\]"),
    ({"heap_mmap_threshold_kb": 65536}, r"heap_mmap_threshold_kb=65536 is outside \[0, 32768\]"),
    ({"heap_mmap_threshold_kb": -1}, "heap_mmap_threshold_kb=-1 is outside"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides=overrides)


def test_bad_override_syntax_and_recipe(tmp_path):
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["epochs"])
    with pytest.raises(ConfigError, match="not found"):
        build_config(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        build_config(tmp_path / "list.yaml")


def test_every_field_has_a_default():
    assert Config().resolve()
    for name in method_names():
        assert build_config(overrides={"method": name}).method.name == name


def test_shipped_recipes_validate():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        build_config(recipe)
