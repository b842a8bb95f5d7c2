#!/usr/bin/env python3
"""Runs `vlad bench` and the reference (scripts/bench_reference.py) one after the other in the same
run, on the same sizes and dtypes, and prints the ratios against the targets of the speed work:

  vision, prefill   reference time / vlad time         (target >= 2)
  decode            vlad tokens/s / reference tokens/s, and vlad's weight bytes per second as a share
                    of the read bandwidth measured in this run (target >= 90%)
  quantized decode  vlad q8_0 / q4k tokens/s / reference bf16 tokens/s (target >= 2)
  peak RSS          vlad / reference                    (target <= 1)

and, per dtype, the compute rate each side reaches in the vision tower and the prefill (their FLOPs
counted from the 2B shapes) against torch's own matmul rate on this machine: a 2x target above that
ceiling cannot be met by any implementation in that dtype.

With --device cuda both run on the first GPU (scripts/gpu-check.sh) and the lines show the GPU
targets instead: a step (vision + prefill + 64 tokens) <= 0.25 s, decode >= 400 tokens/s, and peak
GPU memory against the reference's.

Called by scripts/bench-vs-reference.sh (which builds vlad and sets up the reference's venv).
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_DTYPE = {"bf16": "bfloat16", "f32": "float32"}


def run_json(cmd):
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if res.returncode != 0:
        sys.exit(f"failed ({res.returncode}): {' '.join(cmd)}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def vlad_rows(args, dtype, sizes, quantize=None):
    cmd = [args.vlad, "bench", "--config", "2b", "--tokenizer", args.tokenizer, "--sizes", sizes,
           "--dtype", dtype, "--decode-tokens", str(args.decode_tokens), "--runs", str(args.runs), "--json",
           "--device", args.device]
    if quantize:
        cmd += ["--quantize", quantize]
    return {r["size"]: r for r in run_json(cmd)}


def ref_result(args, dtype, sizes):
    return run_json([sys.executable, os.path.join(HERE, "bench_reference.py"), "--tokenizer", args.tokenizer,
                     "--dtype", TORCH_DTYPE[dtype], "--sizes", sizes, "--decode-tokens", str(args.decode_tokens),
                     "--runs", str(args.runs), "--device", args.device])


# Qwen2-VL-2B shapes (vision: 32 blocks of 1280 wide, MLP 5120, 2x2 merge into 1536; decoder: 28
# layers of 1536, 12 query and 2 key/value heads of 128, MLP 8960).
V_DEPTH, V_DIM, V_MLP, V_IN, MERGED, HIDDEN = 32, 1280, 5120, 1176, 5120, 1536
T_LAYERS, T_HEADS, T_KV_HEADS, HEAD_DIM, T_MLP = 28, 12, 2, 128, 8960


def vision_gflop(grid):
    """Multiply-adds x 2 of the vision tower for one image of `grid` (t, h, w): patch embedding,
    blocks (qkv, projection, MLP, attention within the frame), merger."""
    t, h, w = grid
    n, frame = t * h * w, h * w
    per_patch = V_IN * V_DIM + V_DEPTH * (4 * V_DIM * V_DIM + 2 * V_DIM * V_MLP + 2 * frame * V_DIM)
    merger = (n // 4) * (MERGED * MERGED + MERGED * HIDDEN)
    return 2 * (n * per_patch + merger) / 1e9


def prefill_gflop(tokens):
    """Multiply-adds x 2 of the decoder over a prompt of `tokens` (causal attention: half the
    square), the output layer for the last token aside."""
    kv = T_KV_HEADS * HEAD_DIM
    per_token = T_LAYERS * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * kv + 3 * HIDDEN * T_MLP)
    attention = T_LAYERS * T_HEADS * HEAD_DIM * tokens * tokens  # q.k and p.v over half the square
    return 2 * (tokens * per_token + attention) / 1e9


def gpu_line(dtype, ref, r, v):
    """One size on the GPU: times in ms, the step against 0.25 s, decode against 400 tokens/s."""
    ref_step = r["vision_s"] + r["prefill_s"] + 64 / r["decode_tokens_per_s"]
    vram = (v.get("peak_vram_bytes") or 0) / max(r.get("peak_vram_bytes") or 1, 1)
    return (f"{dtype:>5} {r['size']:>10} | vision {r['vision_s'] * 1e3:6.1f} / {v['vision_s'] * 1e3:6.1f} ms"
            f" = {r['vision_s'] / v['vision_s']:5.2f}x | prefill {r['prefill_s'] * 1e3:6.1f} / {v['prefill_s'] * 1e3:6.1f} ms"
            f" = {r['prefill_s'] / v['prefill_s']:5.2f}x | decode {v['decode_tokens_per_s']:6.1f} vs"
            f" {r['decode_tokens_per_s']:6.1f} tok/s {mark(v['decode_tokens_per_s'] >= 400)}"
            f" ({v['decode_gb_per_s']:6.0f} GB/s of weights = {v['decode_gb_per_s'] / ref['bandwidth_gb_s']:4.0%}"
            f" of the {ref['bandwidth_gb_s']:.0f} GB/s copy rate) | step {ref_step:5.3f} / {v['step_s']:5.3f} s"
            f" {mark(v['step_s'] <= 0.25)} | peak GPU memory {(v.get('peak_vram_bytes') or 0) / 2**30:5.2f} /"
            f" {(r.get('peak_vram_bytes') or 0) / 2**30:5.2f} GiB = {vram:4.2f}")


def cpu_line():
    """The CPU's model and whether it has AMX, which decides which matrix kernels either side uses."""
    model, flags = "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    amx = "amx_bf16" in flags
    return (f"machine: {model}, {os.cpu_count()} CPUs, AVX512-BF16 {'yes' if 'avx512_bf16' in flags else 'no'},"
            f" AMX-BF16 {'yes (oneDNN gives torch the tiles; vlad prints whether it uses them: CPU kernels)' if amx else 'no'}")


def mark(ok):
    return "ok " if ok else "BELOW"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vlad", required=True)
    ap.add_argument("--tokenizer", default="tests/data/qwen2vl-tokenizer")
    ap.add_argument("--sizes", default="640x360")
    ap.add_argument("--dtypes", default="bf16,f32")
    ap.add_argument("--quantize", default="q8_0,q4k", help="quantized decode runs ('' for none)")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json-out", help="also write every measurement here")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()

    record = {"sizes": args.sizes, "dtypes": {}, "quantized": {}}
    lines = []
    bandwidths = []
    ref_bf16_decode = {}
    for dtype in [d for d in args.dtypes.split(",") if d]:
        ref = ref_result(args, dtype, args.sizes)
        ours = vlad_rows(args, dtype, args.sizes)
        bandwidths.append(ref["bandwidth_gb_s"])
        record["dtypes"][dtype] = {"reference": ref, "vlad": ours}
        for r in ref["rows"]:
            v = ours[r["size"]]
            if dtype == "bf16":
                ref_bf16_decode[r["size"]] = r["decode_tokens_per_s"]
            vis = r["vision_s"] / v["vision_s"]
            pre = r["prefill_s"] / v["prefill_s"]
            dec = v["decode_tokens_per_s"] / r["decode_tokens_per_s"]
            share = v["decode_gb_per_s"] / ref["bandwidth_gb_s"]
            rss = (v["peak_rss_bytes"] or 0) / max(r["peak_rss_bytes"] or 1, 1)
            if args.device == "cuda":
                lines.append(gpu_line(dtype, ref, r, v))
                continue
            lines.append(
                f"{dtype:>5} {r['size']:>10} | vision {r['vision_s']:7.2f} / {v['vision_s']:7.2f} s = {vis:5.2f}x {mark(vis >= 2)}"
                f" | prefill {r['prefill_s']:6.2f} / {v['prefill_s']:6.2f} s = {pre:5.2f}x {mark(pre >= 2)}"
                f" | decode {v['decode_tokens_per_s']:5.2f} vs {r['decode_tokens_per_s']:5.2f} tok/s = {dec:4.2f}x,"
                f" {v['decode_gb_per_s']:5.1f} GB/s = {share:4.0%} of {ref['bandwidth_gb_s']:.1f} {mark(share >= 0.9)}"
                f" | peak RSS {v['peak_rss_bytes'] / 2**30:5.2f} / {r['peak_rss_bytes'] / 2**30:5.2f} GiB"
                f" = {rss:4.2f} {mark(rss <= 1)}"
                f"{'  (reference contended: ' + str(r['others_cpu_share_max']) + ')' if r['others_cpu_share_max'] > 0.1 else ''}")
        for r in ref["rows"]:
            v = ours[r["size"]]
            vf, pf = vision_gflop(v["grid_thw"]), prefill_gflop(v["prompt_tokens"])
            peak = ref["matmul_gflops"]
            lines.append(
                f"{'':>5} {'':>10} | compute: vision {vf:.0f} GFLOP, reference {vf / r['vision_s']:4.0f} / vlad"
                f" {vf / v['vision_s']:4.0f} GFLOP/s; prefill {pf:.0f} GFLOP, reference {pf / r['prefill_s']:4.0f} / vlad"
                f" {pf / v['prefill_s']:4.0f} GFLOP/s; torch's {dtype} matmul ceiling here {peak:4.0f} GFLOP/s"
                f" (2x the reference's vision rate {'is above' if 2 * vf / r['vision_s'] > peak else 'fits under'} it)")
    smallest = args.sizes.split(",")[0]
    for q in [q for q in args.quantize.split(",") if q]:
        ours = vlad_rows(args, "f32", smallest, quantize=q)[smallest]
        record["quantized"][q] = ours
        base = ref_bf16_decode.get(smallest)
        bw = max(bandwidths) if bandwidths else float("nan")
        vs = f"{ours['decode_tokens_per_s'] / base:4.2f}x the reference's bf16 {mark(ours['decode_tokens_per_s'] / base >= 2)}" \
            if base else "(no bf16 reference run)"
        lines.append(f"{q:>5} {smallest:>10} | decode {ours['decode_tokens_per_s']:5.2f} tok/s = {vs}, "
                     f"{ours['decode_gb_per_s']:5.1f} GB/s of weights = {ours['decode_gb_per_s'] / bw:4.0%} of the bandwidth"
                     f" | peak RSS {ours['peak_rss_bytes'] / 2**30:5.2f} GiB")
    if args.device == "cuda":
        print("\nreference / vlad on the GPU, measured in this run (ratios > 1: vlad faster; targets: step <= 0.25 s,"
              " decode >= 400 tok/s)")
    else:
        print("\nreference / vlad, measured in this run (ratios > 1: vlad faster; targets: vision and prefill >= 2x,"
              " decode >= 90% of bandwidth, quantized decode >= 2x reference bf16, RSS <= reference)")
    if args.device == "cpu":
        print(cpu_line())
    print("\n".join(lines))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
