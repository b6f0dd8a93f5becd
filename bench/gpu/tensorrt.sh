#!/usr/bin/env bash
# TensorRT benchmark for a machine with an NVIDIA GPU; self-contained.
#
# Creates its own virtual environment, installs edgemodel with TensorRT, polygraphy and
# onnxruntime-gpu, then for each packaged model builds FP16 and INT8 TensorRT engines with
# `edgemodel build` (each validated against fp32 ONNX Runtime on CPU), and times TensorRT
# against ONNX Runtime's CUDA execution provider in interleaved rounds. The last line printed
# is one JSON object with every figure.
#
#   bash bench/gpu/tensorrt.sh            # from the repository root
#   VENV=/tmp/em-gpu SECONDS_PER_VARIANT=5 bash bench/gpu/tensorrt.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=${VENV:-/tmp/edgemodel-gpu-venv}
WORK=${WORK:-/tmp/edgemodel-gpu-bench}
command -v nvidia-smi >/dev/null || { echo "no nvidia-smi: this benchmark needs an NVIDIA GPU" >&2; exit 1; }
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv

python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet -e '.[tensorrt]'
# The GPU build of ONNX Runtime replaces the CPU one (same module name).
"$VENV/bin/pip" uninstall --quiet -y onnxruntime
"$VENV/bin/pip" install --quiet onnxruntime-gpu
"$VENV/bin/python" -c 'import onnxruntime, tensorrt; print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers()); print("tensorrt", tensorrt.__version__)'

mkdir -p "$WORK"
exec "$VENV/bin/python" bench/gpu/tensorrt_bench.py --work "$WORK" --seconds "${SECONDS_PER_VARIANT:-3}"
