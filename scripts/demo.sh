#!/usr/bin/env bash
# Sets up prunevlm, exports LLaVA-1.5 with FasterVLM at K=32, and asks a question about a real photo
# through the runtime. Uses llava-hf/llava-1.5-7b-hf when it is in the local Hugging Face cache,
# otherwise the built-in small random-weight model (its answers are gibberish; the pipeline is real).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
model=tiny
if "$PY" -c "from huggingface_hub import snapshot_download as s; s('llava-hf/llava-1.5-7b-hf', local_files_only=True)" 2>/dev/null; then
  model=llava-hf/llava-1.5-7b-hf
fi
out=exports/llava15-k32-$( [ "$model" = tiny ] && echo tiny || echo 7b )
"$PY" -m export llava15 --keep 32 --model "$model" --out "$out" --force
mkdir -p exports
"$PY" -c "import skimage.data as d; from PIL import Image; Image.fromarray(d.chelsea()).save('exports/cat.jpg')"
"$PY" -m runtime "$out" --image exports/cat.jpg --prompt "What is in the picture?" --max-new-tokens 24 \
  --save-kept exports/cat-kept.png
