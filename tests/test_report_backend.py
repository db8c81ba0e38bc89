"""Writing figures leaves the process's matplotlib backend alone (a user's notebook keeps its own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from PIL import Image

SCRIPT = """
import json, sys
import numpy as np
from medboost.report import plots, segmentation_io

out = sys.argv[1]
plots.confusion_matrix_plot([[3, 1], [0, 4]], ["a", "b"], out + "/confusion.png")
labels = np.zeros((8, 8), dtype=int)
labels[2:5, 2:5] = 1
segmentation_io.overlay_png(np.random.default_rng(0).random((8, 8)), labels, labels, out + "/overlay.png")
import matplotlib
print(json.dumps({"backend": matplotlib.get_backend(), "pyplot": "matplotlib.pyplot" in sys.modules}))
"""


def test_writing_figures_keeps_the_users_backend(tmp_path):
    # A fresh process whose backend is chosen by the user (svg: non-interactive, so no display is needed).
    env = {**os.environ, "MPLBACKEND": "svg"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    assert state == {"backend": "svg", "pyplot": False}
    for name in ("confusion.png", "overlay.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 100
