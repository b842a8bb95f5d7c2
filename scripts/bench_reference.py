#!/usr/bin/env python3
"""The reference side of `scripts/bench-vs-reference.sh`: Hugging Face transformers' Qwen2-VL with the
real 2B configuration and random weights, timed on the same parts of an agent step as `vlad bench`:

  vision   the vision tower (32 ViT blocks + 2x2 merger) on one synthetic screenshot
  prefill  the language model over the whole prompt (image embeddings passed in), last logits only
  decode   N greedy steps with the KV cache, one token at a time (M-RoPE position = index + delta)

and the machine's memory read bandwidth (torch sums a 1 GiB tensor on all threads), which is what
decoding is bound by. Prints one JSON object on stdout. Works with transformers 4.57 (the version
the parity fixtures pin, tests/fixtures/requirements.txt) and 5.x.

With --device cuda it times the same parts on the first GPU (synchronising before every clock
read), reports the peak memory torch allocated per size, and measures the card's copy bandwidth
(bytes read + written) and bf16 matrix rate instead of the CPU's.

  python scripts/bench_reference.py --tokenizer tests/data/qwen2vl-tokenizer \
      --dtype bfloat16 --sizes 640x360,1280x720 --decode-tokens 16 --runs 2
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

CONFIG_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 1536,
    "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 32768,
    "max_window_layers": 28, "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
}
MAX_PIXELS = 12845056  # the released checkpoints' budget: 1920x1080 is not downscaled


def model_dir(tokenizer_dir):
    d = tempfile.mkdtemp(prefix="vlad-ref-bench-")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(CONFIG_2B, f)
    with open(os.path.join(d, "preprocessor_config.json"), "w") as f:
        json.dump({"min_pixels": 3136, "max_pixels": MAX_PIXELS, "patch_size": 14, "temporal_patch_size": 2,
                   "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711],
                   "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}, f)
    for name in os.listdir(tokenizer_dir):
        if name.endswith(".json") or name.endswith(".jinja"):
            shutil.copy(os.path.join(tokenizer_dir, name), d)
    return d


def screenshot(w, h):
    """Title bar, sidebar, text-like bars, buttons: the work does not depend on the pixels."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (w, h), (245, 246, 248))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, w, h // 18], fill=(40, 44, 52))
    d.rectangle([0, h // 18, w // 6, h], fill=(225, 228, 232))
    for y in range(h // 12, h - 10, max(6, h // 30)):
        for x in range(w // 5, w - 40, max(20, w // 16)):
            d.rectangle([x, y, x + w // 24, y + max(2, h // 90)], fill=((x * 7) % 120, 60, (y * 3) % 120))
    return img


def busy_s():
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def own_s():
    t = os.times()
    return t.user + t.system


def peak_rss_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def sync(torch, device):
    if device == "cuda":
        torch.cuda.synchronize()


def bandwidth_gb_s(torch, device):
    """Read bandwidth: the best of 5 sums over a 1 GiB f32 tensor (all torch threads); on a GPU,
    the best of 5 device-to-device copies of 1 GiB, counting the bytes read and written."""
    if device == "cuda":
        x = torch.ones(1 << 28, dtype=torch.float32, device=device)
        y = torch.empty_like(x)
        y.copy_(x)
        best = float("inf")
        for _ in range(5):
            sync(torch, device)
            t = time.perf_counter()
            y.copy_(x)
            sync(torch, device)
            best = min(best, time.perf_counter() - t)
        del x, y
        return 2 * (1 << 30) / best / 1e9
    x = torch.ones(1 << 28, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    del x
    return (1 << 30) / best / 1e9


def matmul_gflops(torch, dtype, device):
    """Compute ceiling: the best of 5 square matmuls in `dtype` (2048 on all CPU threads, 8192 on
    a GPU)."""
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(5):
        sync(torch, device)
        t = time.perf_counter()
        a @ b
        sync(torch, device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def rope_index(inner, ids, grid, attention_mask, image_token):
    """M-RoPE positions of the prompt: transformers 5.x also wants the token types (1 = image)."""
    import inspect
    if "mm_token_type_ids" in inspect.signature(inner.get_rope_index).parameters:
        return inner.get_rope_index(ids, (ids == image_token).int(), image_grid_thw=grid,
                                    attention_mask=attention_mask)
    return inner.get_rope_index(ids, grid, None, attention_mask)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--sizes", default="640x360")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--runs", type=int, default=1, help="timed runs after one warm-up (medians)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    dev = args.device
    torch.manual_seed(0)
    out = {"dtype": args.dtype, "device": dev, "torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "gpu": torch.cuda.get_device_name() if dev == "cuda" else None,
           "bandwidth_gb_s": bandwidth_gb_s(torch, dev), "matmul_gflops": matmul_gflops(torch, dtype, dev),
           "rows": []}
    d = model_dir(args.tokenizer)
    cfg = Qwen2VLConfig.from_pretrained(d)
    cfg.torch_dtype = dtype
    torch.set_default_dtype(dtype)
    with torch.no_grad():
        model = Qwen2VLForConditionalGeneration(cfg).to(dtype).to(dev).eval()
    torch.set_default_dtype(torch.float32)
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    assert dtypes == [str(dtype)], f"parameters are {dtypes}, not {dtype}"
    proc = AutoProcessor.from_pretrained(d)
    shutil.rmtree(d, ignore_errors=True)
    inner = model.model
    embed = model.get_input_embeddings()
    image_token = CONFIG_2B["image_token_id"]

    for size in args.sizes.split(","):
        w, h = map(int, size.split("x"))
        msgs = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "Where is the search box? Answer with a point."}]}]
        text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        inputs = proc(text=[text], images=[screenshot(w, h)], return_tensors="pt")
        inputs = {k: v.to(dev) for k, v in inputs.items()}
        ids, grid = inputs["input_ids"], inputs["image_grid_thw"]
        pixels = inputs["pixel_values"].to(dtype)
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        runs = []
        for run in range(args.runs + 1):
            b0, o0 = busy_s(), own_s()
            with torch.no_grad():
                sync(torch, dev)
                t0 = time.perf_counter()
                vis = inner.visual(pixels, grid_thw=grid)
                vis = getattr(vis, "pooler_output", vis)  # 5.x returns an output object
                sync(torch, dev)
                t1 = time.perf_counter()
                embeds = embed(ids)
                mask = (ids == image_token).unsqueeze(-1).expand_as(embeds)
                embeds = embeds.masked_scatter(mask, vis.to(embeds.dtype))
                position_ids, delta = rope_index(inner, ids, grid, inputs["attention_mask"], image_token)
                o = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], position_ids=position_ids,
                          use_cache=True, logits_to_keep=1)
                sync(torch, dev)
                t2 = time.perf_counter()
                cache, nxt, n = o.past_key_values, int(o.logits[0, -1].float().argmax()), ids.shape[1]
                delta = int(delta.reshape(-1)[0])
                for i in range(args.decode_tokens):
                    pos = torch.full((3, 1, 1), n + i + delta, dtype=torch.long, device=dev)
                    o = model(input_ids=torch.tensor([[nxt]], device=dev), position_ids=pos, past_key_values=cache,
                              use_cache=True, logits_to_keep=1)
                    cache, nxt = o.past_key_values, int(o.logits[0, -1].float().argmax())
                t3 = time.perf_counter()
            others = max(0.0, (busy_s() - b0) - (own_s() - o0)) / ((t3 - t0) * (os.cpu_count() or 1))
            r = {"vision_s": t1 - t0, "prefill_s": t2 - t1, "decode_tokens_per_s": args.decode_tokens / (t3 - t2),
                 "others_cpu_share": round(others, 3)}
            print(json.dumps({"size": size, "run": run, **r}), file=sys.stderr, flush=True)
            if run > 0 or args.runs == 0:
                runs.append(r)
            del cache, o, vis
        row = {"size": size, "grid_thw": grid[0].tolist(), "prompt_tokens": int(ids.shape[1]),
               "timed_runs": len(runs), "peak_rss_bytes": peak_rss_bytes(),
               "peak_vram_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None,
               "others_cpu_share_max": max(r["others_cpu_share"] for r in runs)}
        for k in ("vision_s", "prefill_s", "decode_tokens_per_s"):
            row[k] = statistics.median(r[k] for r in runs)
        out["rows"].append(row)
    out["weight_bytes_lm"] = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                 if not n.startswith("model.visual") and "embed_tokens" not in n) + \
        embed.weight.numel() * embed.weight.element_size()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
