#!/usr/bin/env bash
# Installs postax into .venv and runs the end-to-end demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e .
python examples/quickstart.py "$@"
