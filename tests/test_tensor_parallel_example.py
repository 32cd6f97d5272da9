"""examples/tensor_parallel_distill.py under torchrun on 2 gloo ranks: the training run with a
vocab-parallel LM head is the single-process run (rank 0 trains both and compares)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_torchrun_two_ranks_equals_one_process(tmp_path):
    out = tmp_path / "curves.json"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--standalone", str(ROOT / "examples" / "tensor_parallel_distill.py"), "--tiny",
         "--json", str(out)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    curves = json.loads(out.read_text())
    assert curves["world"] == 2
    # One training run: float32 sums in another order, 12 SGD steps.
    assert curves["max_relative_difference"] <= 1e-5, curves
    assert curves["parallel"][-1] < curves["parallel"][0], curves  # it learns
