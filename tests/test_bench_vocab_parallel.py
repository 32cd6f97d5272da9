"""benchmarks/vocab_parallel.py on 2 spawned gloo ranks: its JSON holds O(N) bytes per call,
positive times, and a vocab-parallel loss equal to the single-process one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N, V = 64, 500


def test_vocab_parallel_benchmark_runs_and_records(tmp_path):
    out = tmp_path / "vp.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
    )}  # fmt: skip
    script = str(ROOT / "benchmarks" / "vocab_parallel.py")
    command = [sys.executable, script, "--world", "2", "--tokens", str(N), "--vocab", str(V),
               "--repeats", "2", "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "vocab-parallel" in done.stdout and "single process" in done.stdout
    result = json.loads(out.read_text())

    vp, single = result["vocab_parallel"], result["single_process"]
    assert result["case"]["divergence"] == "forward_kl" and result["meta"]["world"] == 2
    # forward_kl without CE: the 64-byte handshake, then one (N, 5) float64 round.
    assert [c["name"] for c in vp["collectives"]] == ["handshake", "statistics"]
    assert vp["collectives"][0]["bytes"] <= 64
    assert vp["bytes_per_call"] <= 64 * N + 64
    assert vp["bytes_per_call"] < N * V * 4 == result["allgather_logits"]["gathered_bytes"]

    assert vp["median_ms"] > 0 and single["median_ms"] > 0
    assert len(vp["times_ms"]) == 2 and all(t > 0 for t in vp["times_ms"] + single["times_ms"])

    assert vp["losses_by_rank"] == [vp["loss"]] * 2  # the whole loss on every rank
    assert abs(vp["loss"] - single["loss"]) <= 1e-5 * abs(single["loss"])
