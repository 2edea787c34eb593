#!/usr/bin/env bash
# The GPU check of issue 23 as one run on an H100/H200 machine (under 7 minutes): the tests marked
# gpu, then on synthetic random-weight checkpoints built here in bf16 (Llama-3.2-1B and Llama-3-8B
# shapes): batch-1 decode eager against CUDA graphs with the fraction of the HBM roofline, the
# ShareGPT-like mix against transformers generate and generate_batch, and the prefix-sharing
# benchmark. Results go to benchmarks/results/*-h200.json (or -h100, -gpu), or under $OUT.
#
#   bash benchmarks/gpu/run.sh            # on the GPU machine (its own torch, triton, transformers)
#   bash benchmarks/gpu/run.sh --dry-run  # tiny shapes, CPU, eager: the default test suite runs it
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ "${1:-}" = "--dry-run" ]; then
  DRY=--dry-run; DEVICE=cpu; TAG=dry-run; SHAPES="tiny"; RESULTS="$WORK/results"
else
  DRY=; DEVICE=cuda; SHAPES="llama-3.2-1b llama-3-8b"
  TAG=$(python -c "import torch; name = torch.cuda.get_device_name(); \
print(next((t.lower() for t in ('H200', 'H100') if t in name), 'gpu'))")
  RESULTS="${OUT:-benchmarks/results}"
  python -m pip install -q --no-deps -e .
  python -m pytest -q -m gpu -p no:cacheprovider
fi
mkdir -p "$RESULTS"
DTYPE=bfloat16; QUICK=
if [ -n "$DRY" ]; then DTYPE=float32; QUICK=--quick; fi
for shape in $SHAPES; do
  python benchmarks/gpu/synthetic.py --shape "$shape" --output "$WORK/$shape" --device "$DEVICE" \
    --dtype "$DTYPE"
  python benchmarks/gpu/decode.py --model "$WORK/$shape" $DRY \
    --output "$RESULTS/decode-$shape-$TAG.json"
  if [ "$shape" != llama-3-8b ]; then
    # The ShareGPT-like mix against transformers, and prefix sharing, on the small shape.
    (cd benchmarks && python throughput.py --model "$WORK/$shape" --device "$DEVICE" \
      --dtype "$DTYPE" --num-requests 100 --peers static,continuous $QUICK \
      --output "$RESULTS/throughput-$shape-$TAG.json")
    (cd benchmarks && python sharing.py --model "$WORK/$shape" --device "$DEVICE" \
      --dtype "$DTYPE" $QUICK --output "$RESULTS/sharing-$shape-$TAG.json")
  fi
  rm -rf "${WORK:?}/$shape"  # the 8B checkpoint alone is 16 GB
done
echo "results in $RESULTS"
