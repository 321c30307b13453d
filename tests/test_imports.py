"""Commands import only what they use: the heavy optional libraries load where a command needs them (start-up is a
user-facing cost; docs/performance.md#start-up has the figures). Checked in fresh processes, not timed."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torchvision", "open_clip", "sklearn", "scipy", "matplotlib", "onnxruntime", "torch._dynamo")

PROBE = """
import json, sys
from taskres.app.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "loaded": [m for m in %r if m in sys.modules]}))
"""


def _loaded(*argv: str) -> tuple[int, list[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE % (HEAVY,), *argv], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["code"], result["loaded"]


def test_methods_imports_no_heavy_library():
    assert _loaded("methods") == (0, [])


def test_predict_needs_no_scikit_learn(tmp_path):
    """predict builds the encoder (open_clip, and through it torchvision) but fits nothing: no scikit-learn/scipy.
    A missing run folder is refused after the imports the command makes at start."""
    code, loaded = _loaded("predict", "--run", str(tmp_path / "missing"), str(tmp_path / "x.jpg"))
    assert code == 2 and "sklearn" not in loaded and "scipy" not in loaded and "matplotlib" not in loaded
