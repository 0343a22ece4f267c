"""The command's bad-input paths: one clear message, exit code 2, no half-written output."""

import numpy as np
import pytest

from noisymix.launch.cli import main
from test_sources import make_idx_dir, write_idx


def run_cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr()


def test_prepare_writes_data_and_prints_its_directory(tmp_path, capsys):
    code, out = run_cli(capsys, "prepare", f"data_dir={tmp_path / 'd'}", "source=idx",
                        f"source_path={make_idx_dir(tmp_path)}", "num_shards=2", "val_fraction=0.25")
    assert code == 0 and out.out.strip().endswith(f"data_dir: {tmp_path / 'd'}")
    assert (tmp_path / "d" / "manifest.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["train", "epochs=0"], "epochs=0 is outside"),
    (["train", "colour=red"], "unknown config key"),
    (["prepare", "noise_type=gaussian"], "noise_type='gaussian'"),
    (["prepare", "noise_rate=1.2"], "noise_rate=1.2"),
    (["train", "/no/such/recipe.yaml"], "config file not found"),
    (["train", "lr=.nan"], "lr must be a finite number, got nan"),
    (["train", "noise_rate=.inf"], "noise_rate must be a finite number"),
    (["train", "num_workers=3-1"], "num_workers must be a number, MIN-MAX or [MIN, MAX]"),
    (["train", "resume=/no/such/run"], "resume=/no/such/run: no config.yaml there"),
])
def test_config_errors(tmp_path, capsys, argv, message):
    code, out = run_cli(capsys, *argv, f"data_dir={tmp_path / 'd'}", f"run_dir={tmp_path / 'r'}")
    assert code == 2 and message in out.err and out.err.startswith("noisymix: error:")
    assert not (tmp_path / "d").exists() and not (tmp_path / "r").exists()


def make_src(tmp_path):
    (tmp_path / "src").mkdir()
    return make_idx_dir(tmp_path / "src", gz=False)


def test_source_errors_leave_no_data_dir(tmp_path, capsys):
    src = make_src(tmp_path)
    write_idx(src / "train-labels-idx1-ubyte", np.arange(12) % 3, magic=7)
    cases = [
        ([f"source_path={tmp_path / 'missing'}"], "not found"),
        ([f"source_path={src}"], "wrong IDX magic 7"),
    ]
    for extra, message in cases:
        code, out = run_cli(capsys, "prepare", "source=idx", f"data_dir={tmp_path / 'd'}", *extra)
        assert code == 2 and message in out.err
        assert not (tmp_path / "d").exists()
        assert [p.name for p in tmp_path.iterdir()] == ["src"], "no staging directory is left behind"


def test_stray_label_is_named(tmp_path, capsys):
    src = make_src(tmp_path)
    labels = np.arange(6) % 3
    labels[4] = 200
    write_idx(src / "t10k-labels-idx1-ubyte", labels)
    code, out = run_cli(capsys, "prepare", "source=idx", f"source_path={src}", f"data_dir={tmp_path / 'd'}")
    assert code == 2 and "the largest label is 200" in out.err
    assert not (tmp_path / "d").exists()


@pytest.fixture
def real_noise_list(tmp_path):
    """An image-list source: its labels are the dataset's own (noisy) ones, the truth unknown."""
    from test_sources import write_image_list

    src = tmp_path / "list"
    src.mkdir()
    return write_image_list(src, labels=tuple(k % 3 for k in range(12)))


def test_clean_method_refused_without_true_labels(tmp_path, capsys, real_noise_list):
    code, out = run_cli(capsys, "train", "method=clean", "source=image_list", f"source_path={real_noise_list}",
                        "noise_type=none", "noise_rate=0", "num_shards=1", "val_fraction=0.25", "prepare_workers=1",
                        f"data_dir={tmp_path / 'd'}", f"run_dir={tmp_path / 'r'}")
    assert code == 2 and "method=clean trains on true labels" in out.err
    assert not (tmp_path / "r").exists()


def test_synthetic_noise_refused_on_real_noise_lists(tmp_path, capsys, real_noise_list):
    code, out = run_cli(capsys, "prepare", "source=image_list", f"source_path={real_noise_list}",
                        f"data_dir={tmp_path / 'd'}")
    assert code == 2 and "noise_type=none" in out.err
