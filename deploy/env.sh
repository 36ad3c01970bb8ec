# shellcheck shell=bash
# Sourced by the other deploy scripts: makes libtorch available to cargo.
#
# libtorch comes from the torch==2.13.0 wheel (the version tch 0.26 expects),
# installed once into a venv in a cache outside the checkout, where the cargo
# target dir lives too, so later runs and CI on the same machine reuse both.
# Override the location with FLGFN_CACHE_DIR.

FLGFN_TORCH_VERSION="2.13.0"
FLGFN_CACHE_DIR="${FLGFN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/flgfn}"
FLGFN_VENV="$FLGFN_CACHE_DIR/venv-torch-$FLGFN_TORCH_VERSION"

flgfn_ensure_libtorch() {
    if [ -x "$FLGFN_VENV/bin/python" ] &&
        "$FLGFN_VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$FLGFN_TORCH_VERSION')" 2>/dev/null; then
        return 0
    fi
    echo "flgfn: installing torch==$FLGFN_TORCH_VERSION into $FLGFN_VENV (one time, ~4.6 GB, a few minutes)" >&2
    mkdir -p "$FLGFN_CACHE_DIR"
    python3 -m venv "$FLGFN_VENV"
    "$FLGFN_VENV/bin/python" -m pip install --quiet --upgrade pip
    "$FLGFN_VENV/bin/python" -m pip install --quiet "torch==$FLGFN_TORCH_VERSION"
}

flgfn_ensure_libtorch || { echo "flgfn: could not install torch==$FLGFN_TORCH_VERSION" >&2; return 1; }

export PATH="$FLGFN_VENV/bin:$PATH"
# torch-sys finds libtorch inside the venv's torch package.
export LIBTORCH_USE_PYTORCH=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$FLGFN_CACHE_DIR/target}"
