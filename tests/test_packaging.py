"""The dependency policy (issue #16): TensorFlow is the user's; without it, one clear line."""

import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run with a 'tensorflow' that cannot be imported, as on a machine without TensorFlow.
_BLOCK_TENSORFLOW = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Block())
"""


def test_tensorflow_is_not_a_hard_dependency_and_each_distribution_has_an_extra():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith("tensorflow")]
    extras = project["optional-dependencies"]
    assert extras["tensorflow"] == ["tensorflow>=2.16"] and extras["tensorflow-cpu"] == ["tensorflow-cpu>=2.16"]
    for name in ("keras", "keras-hub", "tf-keras"):  # never a runtime dependency
        assert not [d for d in project["dependencies"] if d.startswith(name)]


def test_without_tensorflow_the_api_and_the_cli_say_what_to_install():
    code = _BLOCK_TENSORFLOW + """
import graphprune
try:
    graphprune.prune
except graphprune.GraphPruneError as error:
    print("API:", error)
from graphprune.tools import main
sys.argv = ["graphprune", "prune", "--input=x", "--output=y", "--final_sparsity=0.5", "--end_step=10"]
main.run()
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "API: graphprune needs TensorFlow 2.16 or newer" in result.stdout, result.stdout + result.stderr
    assert "pip install 'graphprune[tensorflow]'" in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "graphprune needs TensorFlow" in lines[0], result.stderr
