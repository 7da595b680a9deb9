#!/usr/bin/env bash
# Installs postax into .venv and runs the RL demo: SFT a tiny model from scratch, then GRPO
# raises its held-out accuracy (examples/rl_demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[plot]'
python examples/rl_demo.py "$@"
