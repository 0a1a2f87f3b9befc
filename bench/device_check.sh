#!/usr/bin/env bash
# Issue 17's device check, in one call of the device tool (about 8 minutes on an H200; its limit is 10):
#   1. the CUDA tests (tests/test_graphs.py's graphed = eager, tests/test_cuda.py);
#   2. `make bench GPU=1`'s table (python -m bench.compare --gpu) on fewer requests: raw and raw_forward, the
#      MiniLM- and BERT-base-sized cross-encoders and the embedding model, HTTP at 1/8/32/128, forward
#      utilization, and the text pool with cuda_graphs on beside it (http_cuda_graphs).
# Everything it writes lands in $OUT (tests.log, bench.log, the result JSON, or its .partial.json if cut off).
#
# Prepared here, on the CPU machine, before the call:
#   bash bench/device_wheels.sh        # .whl/ (~52 MiB): Ray, FastAPI, pydantic, grpcio, ... for the card's Python
#   .venv/bin/python -m bench.compare --gpu --dump-requests .gpu/requests.json   # then keep its first 200 requests
#   mkdir -p .gpu/embedding && cp <all-MiniLM-L6-v2 dir>/{*.json,vocab.txt,1_Pooling} .gpu/embedding
#     (config and tokenizer only, no weights: the bench builds random ones, which cost the same)
# .whl, .gpu and the tree together must stay under the tool's 64 MiB.
# The call:  run(command="bash bench/device_check.sh", carry=[".whl", ".gpu"], timeout_s=600)
set -o pipefail
REQUESTS=${REQUESTS:-160}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import ray, ray.serve, fastapi, torch, transformers; print('ray', ray.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" || exit 1
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -6
timeout 470 python3 -m bench.compare --gpu --skip-infinity --embedding-dir .gpu/embedding \
  --requests-file .gpu/requests.json --requests "$REQUESTS" --out "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.log" \
  | grep -v -E "Writing model|it/s\]" | tail -60
ls -la "$OUT"
