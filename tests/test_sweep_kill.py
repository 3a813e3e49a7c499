"""A sweep killed with SIGKILL in the middle of a point resumes to the result of an uninterrupted sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RECIPE = Path(__file__).parent / "fixtures" / "recipes" / "tiny_prune_sft.yaml"


def sweep_command(model_dir: Path, output_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "moe_specialist.cli", "sweep", "--config", str(RECIPE),
        "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir),
        "--ratios", "0,0.25,0.5,0.75", "--criteria", "frequency,gate_mass", "--max_eval_examples", "3",
        "--max_new_tokens", "4", "--report_to", "none",
    ]  # fmt: skip


def without_timings(results: dict) -> dict:
    for point in results["points"]:
        point.pop("seconds")
    return results


@pytest.mark.slow
def test_kill_9_mid_sweep_then_rerun(tiny_translator, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "uninterrupted"
    subprocess.run(sweep_command(tiny_translator, reference), env=env, check=True, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        sweep_command(tiny_translator, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (killed / "points" / "r0.250-frequency-uniform" / "result.json").is_file():
        assert process.poll() is None and time.time() < deadline, "the sweep ended before its second point"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "results.json").exists()  # written at the end only, atomically
    finished = {
        p.name: (p / "result.json").stat().st_mtime_ns
        for p in (killed / "points").iterdir()
        if (p / "result.json").is_file()
    }

    subprocess.run(sweep_command(tiny_translator, killed), env=env, check=True, capture_output=True)
    for name, written in finished.items():  # finished points are reused, not recomputed
        assert (killed / "points" / name / "result.json").stat().st_mtime_ns == written
    ours, theirs = (json.loads((d / "results.json").read_text()) for d in (killed, reference))
    assert without_timings(ours) == without_timings(theirs) | {"statistics": ours["statistics"]}
    assert (killed / "results.csv").read_text() == (reference / "results.csv").read_text()
