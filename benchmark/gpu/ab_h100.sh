#!/bin/bash
# DualPath A/B on the lent H100 (real SGLang 0.5.17 prefill + decode on one GPU, NIXL, per-role read caps).
# Not run yet: no session of this project has had a GPU so far (docs/cluster.md). Three device calls in a
# row, while the machine stays warm (~30 s between calls), each carrying one kit folder (< 64 MiB):
#
#   on the CPU machine, once:   benchmark/gpu/ab_h100.sh build        # -> .gpu-kit-1 .gpu-kit-2 .gpu-kit-3
#   device call 1 (carry .gpu-kit-1):  bash benchmark/gpu/ab_h100.sh unpack .gpu-kit-1
#   device call 2 (carry .gpu-kit-2):  bash benchmark/gpu/ab_h100.sh unpack .gpu-kit-2
#   device call 3 (carry .gpu-kit-3):  bash benchmark/gpu/ab_h100.sh unpack .gpu-kit-3 && bash benchmark/gpu/ab_h100.sh run
#   device call 4 (same warm machine):  bash benchmark/gpu/ab_h100.sh models
#
# `run` writes $OUT/cluster_ab_h100.json (benchmark records) and .png; `models` runs the CUDA cases of the
# layer gate's test (DE pages placed from the slots into the GPU pool) and the kernel tests, then the layerwise
# ablation on the GPU for a GQA and an MLA (DeepSeek-V2 architecture) tiny model,
# $OUT/layerwise_bench_{gqa,mla}_h100.json; copy them to benchmark/results/.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/../.." && pwd)
SITE=/tmp/site
case "${1:-}" in
build)
  bash "$HERE/../shared/gpu/build_sglang_kit.sh" "$HERE/.gpu-kit"
  W=$(mktemp -d); mkdir -p "$HERE/.gpu-kit-3"
  PLAT="--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any"
  pip download -q --no-deps $PLAT -d "$W/whl" nixl==1.5.1 nixl-cu13==1.5.1 xxhash aiohttp aiohappyeyeballs aiosignal \
    frozenlist multidict propcache yarl idna attrs prometheus-client rich markdown-it-py mdurl pygments \
    pytest pluggy iniconfig packaging hypothesis sortedcontainers
  pip install -q --no-deps --no-compile --target "$W/site" $PLAT "$W/whl"/*.whl
  (cd "$W/site" && tar cf - . | xz -6 -T2 > "$HERE/.gpu-kit-3/part3.tar.xz")
  cp "$HERE/../shared/gpu/unpack_kit.py" "$HERE/.gpu-kit-3/"
  rm -rf "$W"; ls -la "$HERE"/.gpu-kit-*
  echo "add .gpu-kit-1 .gpu-kit-2 .gpu-kit-3 to .git/info/exclude (they are not committed)";;
unpack)
  python3 "$2/unpack_kit.py" "$2" "$SITE";;
run|models)
  export PYTHONPATH=$SITE:$HERE/python:$HERE/sgl-kernel/python
  # SGLang discovers its plugins through installed distributions: declare DualPath's entry point.
  mkdir -p "$SITE/sglang_dualpath-0.1.0.dist-info"
  printf 'Metadata-Version: 2.1\nName: sglang-dualpath\nVersion: 0.1.0\n' > "$SITE/sglang_dualpath-0.1.0.dist-info/METADATA"
  printf '[sglang.srt.plugins]\ndualpath = dualpath.srt.plugin:register\n' > "$SITE/sglang_dualpath-0.1.0.dist-info/entry_points.txt"
  GPU_ARGS="--load-format dummy --skip-tokenizer-init --attention-backend triton --sampling-backend pytorch \
--grammar-backend none --disable-cuda-graph --mem-fraction-static 0.3"
  if [ "$1" = models ]; then
    # The slot -> GPU device pool placement (Triton kernel from cudaHostRegistered slots, CUDA events) and the
    # kernels' own tests, on the GPU; then layer by layer vs wait-for-all: GQA, then MLA.
    (cd "$HERE" && python3 -m pytest -q -p no:cacheprovider test/test_kernels.py \
      "test/test_srt_pages.py::test_the_forward_of_layer_i_waits_for_layer_i_only") 2>&1 | tail -15 \
      || echo "models: the GPU tests above failed; the ablation runs anyway"
    python3 "$HERE/benchmark/layerwise_bench.py" --device cuda --rounds 4 --compute-gbps "${COMPUTE_GBPS:-8}" \
      --server-args "$GPU_ARGS" --out "${OUT:-/tmp/out}/layerwise_bench_gqa_h100.json"
    python3 "$HERE/benchmark/layerwise_bench.py" --device cuda --rounds 4 --compute-gbps "${COMPUTE_GBPS:-8}" --mla \
      --server-args "$GPU_ARGS" --out "${OUT:-/tmp/out}/layerwise_bench_mla_h100.json"
    exit 0
  fi
  MODEL=/tmp/tiny8; mkdir -p $MODEL
  cp "$HERE/benchmark/gpu/tiny8-config.json" $MODEL/config.json
  echo '{"bos_token_id": 1, "eos_token_id": 2}' > $MODEL/generation_config.json
  # One GPU holds both servers: a third of its memory each. Per-node caps make the PE NIC the bottleneck.
  python3 -m dualpath.cli ab --device cuda --model $MODEL --prefill 1 --decode 1 --nic-gbps "${NIC_GBPS:-2}" \
    --kv-bytes-per-token 16384 --scale 1 --agents 8 --turns 4 --max-gen 64 --max-context 60000 --out "${OUT:-/tmp/out}" --name cluster_ab_h100 \
    --server-args "$GPU_ARGS";;
*)
  echo "usage: $0 build | unpack KIT_DIR | run | models" >&2; exit 2;;
esac
