"""The README's demo runs end to end and its model answers what it was taught."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

QUICKSTART = Path(__file__).parents[1] / "examples" / "quickstart.py"


def test_quickstart_trains_saves_reloads_and_generates(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--out", str(tmp_path), "--steps", "200"])
    runpy.run_path(str(QUICKSTART), run_name="__main__")
    out = capsys.readouterr().out
    assert "KV-cache decode equals full forward passes: True" in out
    correct = int(out.split("exact answers: ")[1].split("/")[0])
    assert correct >= 14, out
    assert (tmp_path / "model" / "model.safetensors").exists()
