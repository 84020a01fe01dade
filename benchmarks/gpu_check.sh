#!/usr/bin/env bash
# GPU check, at most 8 minutes on one GPU (each part has its own timeout):
#   1. scorer throughput: our OpenClipScorer on an open_clip ViT-H-14 (random weights, real size, 224 px) under
#      its CUDA autocast (bf16), and the same model with bf16 weights, against the device's bf16 dense FLOP
#      roofline; FLOPs per image are counted from the architecture (and checked with torch's FlopCounterMode);
#   2. one Diffusion-DPO step (time, peak CUDA memory) of our trainer against the public full-copy design with
#      the real SD1.5 UNet/VAE/text-encoder architecture (random weights, public configs) at 512 px (latent
#      64x64), 1 pair, fp16 autocast: benchmarks/bench_train_step.py --sd15, each design in its own process.
# Figures are written as a markdown block to $OUT/gpu_check.md when $OUT is set, and to stdout.
#
#   benchmarks/gpu_check.sh             # on a GPU machine
#   benchmarks/gpu_check.sh --dry-run   # CPU, tiny sizes: checks that the script runs (about 2-4 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DRY=0
T_SCORER=240 T_STEP=330  # seconds: 8 minutes in all on a GPU machine
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1 T_SCORER=900 T_STEP=900; fi  # a loaded CPU is slow to build models
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
REPORT=${OUT:+$OUT/gpu_check.md}
emit() { if [[ -n "$REPORT" ]]; then tee -a "$REPORT"; else cat; fi; }
if [[ -n "$REPORT" ]]; then : > "$REPORT"; fi

echo "## GPU check ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$([[ $DRY == 1 ]] && echo ', DRY RUN: tiny sizes on the CPU'))" | emit
echo | emit

# ---------------------------------------------------------------- 1. scorer throughput vs the bf16 roofline
timeout "$T_SCORER" "$PY" - "$DRY" <<'PYTHON' | emit
import sys, time
import torch
import open_clip
from torch.utils.flop_counter import FlopCounterMode
from prefcurate.curation.scorers.clip_family import OpenClipScorer

dry = sys.argv[1] == "1"
cuda = torch.cuda.is_available() and not dry
device = torch.device("cuda" if cuda else "cpu")
# bf16 dense tensor-core peak, TFLOPS (vendor data sheets, without sparsity)
PEAK_BF16 = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
             "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0}
name = torch.cuda.get_device_name(0) if cuda else "CPU (dry run)"
peak = next((v for k, v in PEAK_BF16.items() if k in name), None)

if dry:  # the same code path on a tiny ViT: 64 px, 2 layers
    model = open_clip.model.CLIP(embed_dim=64, vision_cfg={"image_size": 64, "layers": 2, "width": 64,
                                                           "patch_size": 16, "head_width": 32},
                                 text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                                           "layers": 2})
    arch, size, batch, iters = "tiny ViT (dry run)", 64, 4, 2
else:
    model = open_clip.create_model("ViT-H-14", pretrained=None)  # random weights, nothing downloaded
    arch, size, batch, iters = "ViT-H-14", 224, 64, 10
tokenizer = open_clip.get_tokenizer("ViT-H-14")

def image_flops(visual) -> float:
    """Forward FLOPs per image (2 per multiply-add): patch embedding, per block the qkv/out projections
    (4·d² per token), the MLP (2·d·mlp per token) and attention scores and values (2·n²·d), final projection."""
    d, layers = visual.transformer.width, visual.transformer.layers
    gh, gw = visual.grid_size
    n = gh * gw + 1  # patches + class token
    patch = visual.conv1.kernel_size[0]
    mlp = visual.transformer.resblocks[0].mlp.c_fc.out_features
    macs = gh * gw * 3 * patch * patch * d + layers * (n * (4 * d * d + 2 * d * mlp) + 2 * n * n * d)
    macs += d * visual.proj.shape[1] if visual.proj is not None else 0
    return 2.0 * macs

flops = image_flops(model.visual)
with FlopCounterMode(display=False) as counter, torch.no_grad():
    model.encode_image(torch.zeros(1, 3, size, size))
counted = counter.get_total_flops()

scorer = OpenClipScorer("clip", "gpu-check", model, None, tokenizer, clip_score=True, device=str(device),
                        batch_size=batch)
pixels = torch.randn(batch, 3, size, size, device=device)
prompts = ["a photo of a cat"] * batch

def rate(fn) -> float:
    for _ in range(2):
        fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - t0)

rows = [("our OpenClipScorer.score_tensors (fp32 weights, bf16 autocast)", rate(lambda: scorer.score_tensors(pixels, prompts)))]
if cuda:
    bf16 = model.to(torch.bfloat16)
    px = pixels.to(torch.bfloat16)
    def forward():
        with torch.inference_mode():
            bf16.encode_image(px)
    rows.append(("encode_image with bf16 weights (ceiling)", rate(forward)))

print(f"Scorer throughput: {arch}, {size} px, batch {batch}, {iters} timed batches on {name}; "
      f"{flops / 1e9:.4g} GFLOP per image from the architecture (FlopCounterMode: {counted / 1e9:.4g}); "
      f"bf16 dense peak {peak if peak else 'unknown for this device'} TFLOPS.")
print()
print("| path | images/s | achieved TFLOPS | share of bf16 peak |")
print("|---|---|---|---|")
for label, r in rows:
    achieved = r * flops / 1e12
    share = f"{100 * achieved / peak:.1f} %" if peak else "n/a"
    print(f"| {label} | {r:,.1f} | {achieved:.3g} | {share} |")
print()
PYTHON

# ---------------------------------------------------------------- 2. one DPO step at SD1.5 size vs the public design
if [[ $DRY == 1 ]]; then
  BENCH=(--tiny --steps 1 --warmup 1 --threads 1 --pairs 1)
else
  BENCH=(--sd15 --pairs 1 --steps 5 --warmup 2 --mixed-precision fp16)
fi
LOG=$(mktemp)
timeout "$T_STEP" "$PY" benchmarks/bench_train_step.py "${BENCH[@]}" --designs ours reference > "$LOG" 2>&1 || {
  echo "DPO step benchmark failed or timed out (exit $?); last lines:" | emit; tail -5 "$LOG" | emit; exit 1; }
tail -n 1 "$LOG" > "$LOG.json"
"$PY" - "$LOG.json" "${BENCH[*]}" <<'PYTHON' | emit
import json, sys
r = json.loads(open(sys.argv[1]).read())
ours, ref = r["ours"], r["reference"]
size = "SD1.5 architecture (random weights), 512 px, latent 64x64" if r["sd15"] else "tiny pipeline, 32 px (dry run)"
print(f"One Diffusion-DPO step, {size}, {r['pairs']} pair; `bench_train_step.py {sys.argv[2]} --designs ours reference`")
print()
print("| design | step (mean) | step (min) | peak memory | trainable parameters |")
print("|---|---|---|---|---|")
for name, x in (("ours: LoRA, adapters-off reference, latent cache", ours),
                ("public design: full fine-tune, frozen UNet copy, VAE every step", ref)):
    print(f"| {name} | {x['step_s']:.3f} s | {x['min_step_s']:.3f} s | {x['peak_mib']:,.0f} MiB | "
          f"{x['trainable_params']:,} |")
print()
print(f"Ratios ours / public: time {ours['step_s'] / ref['step_s']:.2f}x, peak memory "
      f"{ours['peak_mib'] / ref['peak_mib']:.2f}x.")
PYTHON
rm -f "$LOG" "$LOG.json"
