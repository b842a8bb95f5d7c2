#!/usr/bin/env bash
# Installs what building and testing vlad needs on Debian/Ubuntu: system packages and, when cargo
# is missing, a Rust toolchain through rustup. Safe to run again; skips what is already there.
set -euo pipefail

packages=(build-essential pkg-config ca-certificates curl git python3 python3-venv nodejs npm)
# Desktop environment: xcap links pipewire, wayland, gbm/EGL and xcb on Linux (no feature turns
# them off; bindgen needs libclang-dev's headers); enigo's X11 backend needs nothing more.
packages+=(libclang-dev libwayland-dev libpipewire-0.3-dev libgbm-dev libegl-dev libxcb1-dev libx11-dev)
# Desktop tests: a private X server, a window manager, X tools (xprop, xrandr, xrdb, xsetroot) and
# real toolkit apps (Tk through Debian's python3, zenity for GTK), CJK glyphs for screenshots.
packages+=(xvfb xauth x11-utils x11-xserver-utils openbox python3-tk zenity fonts-wqy-zenhei)
# The clipboard example tool plugin (tools/clipboard.toml) and its test.
packages+=(xclip)
# The real adb client and server (1.0.41 on Debian 12): the Android tests drive the fake device
# with it to prove the fake speaks the real protocol.
packages+=(adb)
# UI tests and reports: xmllint validates `vlad test --junit` output against the JUnit schema;
# headless Chromium opens `vlad report` pages (tests/uitest.rs, tests/report.rs).
packages+=(libxml2-utils chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# node/npm may come from elsewhere (nvm, NodeSource); accept working binaries.
if command -v node >/dev/null && command -v npm >/dev/null; then
  tmp=()
  for p in "${missing[@]}"; do [[ "$p" == nodejs || "$p" == npm ]] || tmp+=("$p"); done
  missing=("${tmp[@]+"${tmp[@]}"}")
fi
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  echo "installing system packages: ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
  if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    echo "cargo is in ~/.cargo/bin; add it to PATH (source ~/.cargo/env)" >&2
  else
    echo "installing the Rust toolchain with rustup" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  fi
fi
