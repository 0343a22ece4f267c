"""The design's dependency rule: selection/ and mixing/ never import ray, webdataset or faiss."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"ray", "webdataset", "wids", "faiss"}
ORDER = ["selection", "mixing", "distributed", "launch"]


def imported_modules(folder):
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                yield path, [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                yield path, [node.module]


@pytest.mark.parametrize("folder", ["selection", "mixing"])
def test_pure_layers_import_no_cluster_libraries(folder):
    for path, names in imported_modules(folder):
        bad = {n.split(".")[0] for n in names} & FORBIDDEN
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("folder", ORDER)
def test_arrows_point_down(folder):
    above = ORDER[ORDER.index(folder) + 1:]
    for path, names in imported_modules(folder):
        for name in names:
            parts = name.split(".")
            assert not (parts[0] == "noisymix" and len(parts) > 1 and parts[1] in above), \
                f"{path.relative_to(ROOT)} imports {name} from a layer above"


def test_importing_the_pure_layers_loads_no_cluster_library():
    modules = [f"noisymix.{folder}.{path.stem}" for folder in ("selection", "mixing")
               for path in sorted((ROOT / folder).glob("*.py")) if path.stem != "__init__"]
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {modules!r}]; "
            "from noisymix.mixing.method import method_names; method_names(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'webdataset', 'faiss'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_messages_to_the_driver_unpickle_without_the_training_stack():
    """The run's queue actor unpickles every message a worker sends: their types must not drag torch in."""
    code = ("import sys, noisymix.distributed.messages; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'ray', 'sklearn', 'webdataset'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
