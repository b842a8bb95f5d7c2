#!/usr/bin/env bash
# vlad against the reference implementation (Hugging Face transformers), measured in the same run on
# the same machine, sizes and dtype: builds `vlad` in release mode, sets up the reference in
# .venv-fixtures (the versions tests/fixtures/requirements.txt pins), then runs
# scripts/bench_vs_reference.py, which prints the ratios.
#
#   scripts/bench-vs-reference.sh                          # 640x360, bf16 + f32, q8_0 and q4k decode
#   scripts/bench-vs-reference.sh --sizes 640x360,1280x720 --dtypes bf16 --runs 2
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -f "$HOME/.cargo/env" ]] && source "$HOME/.cargo/env"
./scripts/build-qwen2vl-tokenizer.sh >/dev/null
if ! .venv-fixtures/bin/python -c 'import torch, transformers, PIL' 2>/dev/null; then
  python3 -m venv .venv-fixtures
  .venv-fixtures/bin/pip install --quiet -r tests/fixtures/requirements.txt
fi
cargo build --release --bin vlad
exec .venv-fixtures/bin/python scripts/bench_vs_reference.py --vlad target/release/vlad "$@"
