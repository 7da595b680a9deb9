"""The RL demo's pipeline (examples/rl_demo.py) runs end to end on its shipped configs and data.

The full demo (400 SFT steps, 60 GRPO iterations, +31 points of held-out
accuracy) takes minutes; here both stages are cut short, which checks that
the configs, the data, the SFT -> GRPO hand-over, the evaluation, the metrics
file and the plot all work.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_rl_demo_runs_sft_then_grpo_and_writes_metrics_and_plot(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("rl_demo", ROOT / "examples" / "rl_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    status = demo.main(
        [
            "--out",
            str(tmp_path),
            "--sft-steps",
            "20",
            "--iterations",
            "2",
            "--eval-prompts",
            "8",
            "--min-gain",
            "-1",
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy (greedy, 8 unseen sums)" in printed
    rows = [
        json.loads(line)
        for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().split("\n")
        if line
    ]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2]
    assert {r["step"] for r in rows if "eval_accuracy" in r} >= {0, 2}
    assert (tmp_path / "grpo" / "rewards.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "grpo" / "final" / "config.json").exists()
