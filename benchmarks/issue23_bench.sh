#!/usr/bin/env bash
# Issue 23's figures in one sequence (docs/performance.md, "Quiet re-measurement"): run it with nothing else on
# the machine. Each command is its own process; outputs go to OUT (default results/bench-HHMM).
#   bash benchmarks/issue23_bench.sh [OUT]
set -u
out=${1:-results/bench-$(date +%H%M)}; mkdir -p "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
py=${PYTHON:-python}
lscpu | grep -E "Model name|Flags" > "$out/cpu.txt"
$py benchmarks/step_cost.py --bf16 --selection > "$out/vits-spread.txt" 2>&1
$py benchmarks/step_cost.py --model dinov2_vits14_offline --img 224 > "$out/vits-collapsed.txt" 2>&1
for img in 28 56; do
  $py benchmarks/step_cost.py --model dinov2_vits14_offline --img $img --selection --bf16 --no-fp32 --select-images 256 \
    > "$out/selection-$img.txt" 2>&1
done
$py benchmarks/step_cost.py --model resnet50 --img 128 --batch 32 > "$out/resnet50.txt" 2>&1
$py benchmarks/step_cost.py --model mobilenetv2_100 --img 128 --batch 32 > "$out/mobilenetv2.txt" 2>&1
$py benchmarks/step_cost.py --model convnext_tiny --img 128 --batch 32 > "$out/convnext.txt" 2>&1
$py benchmarks/switch_cost.py --model vit_small_patch16_224 --mixed 1,4,16,64 --batch 64 > "$out/mixed.txt" 2>&1
$py benchmarks/step_cost.py --rss --model vit_base_patch16_224 --batch 8 --no-fp32 --rss-repeats 1 > "$out/rss-vitb.txt" 2>&1
