#!/usr/bin/env bash
# GPU figures, step 1 of 2, on this machine (no GPU needed): builds the
# learner, the actor and the two benchmarks against libtorch 2.11, the
# version the GPU machine's PyTorch ships (it has no Rust), and puts the
# stripped binaries in .gpu-bundle/ (git-ignored) for the device tool to
# carry:
#
#   deploy/gpu/prepare.sh            # ~15 min the first time (torch 2.11 wheel)
#   device run, carry [".gpu-bundle"]:  deploy/gpu/measure.sh   (step 2)
#
# tch 0.24 is the release for libtorch 2.11 and the code builds unchanged
# with it. The pin is changed only in a scratch copy of the working tree
# (committed and uncommitted files) under the cache: never commit it.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
cache="${FLGFN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/flgfn}"
venv="$cache/venv-torch-2.11.0"
scratch="$cache/gpu-build"
bundle="$repo/.gpu-bundle"

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "gpu: installing torch==2.11.0 into $venv (one time, a few GB)" >&2
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "torch==2.11.0"
fi

# The working tree as it is, without build outputs.
rm -rf "$scratch"
mkdir -p "$scratch"
# (Tracked files deleted here are left out: tar would stop at them.)
git ls-files -z --cached --others --exclude-standard |
    python3 -c 'import os, sys; sys.stdout.buffer.write(b"".join(p + b"\0" for p in sys.stdin.buffer.read().split(b"\0") if p and os.path.lexists(p)))' |
    tar --null -T - -cf - | tar -xf - -C "$scratch"
sed -i -e 's/^tch = "0\.26"/tch = "0.24"/' -e 's/^torch-sys = "0\.26"/torch-sys = "0.24"/' \
    "$scratch/Cargo.toml"
for crate in tch torch-sys; do
    grep -q "^$crate = \"0.24\"" "$scratch/Cargo.toml" || {
        echo "gpu: could not pin $crate 0.24 in the scratch Cargo.toml" >&2
        exit 1
    }
done

export PATH="$venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1
export CARGO_TARGET_DIR="$cache/target-gpu"
# The scratch copy has no git: its binaries' --version names this commit
# (marked if the tree differed) and the tch pin.
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
# (The code it builds, as the build scripts judge it, and the benches.)
code=(common learner/src learner/benches learner/build.rs learner/Cargo.toml
    actor/src actor/build.rs actor/Cargo.toml proto Cargo.toml Cargo.lock)
[ -z "$(git status --porcelain -- "${code[@]}" 2>/dev/null)" ] || commit="$commit, modified"
export FLGFN_BUILD_COMMIT="$commit, tch 0.24 for the GPU machine"
cd "$scratch"
cargo build --release --bins --quiet
# The benchmarks' executables, as cargo names them.
benches=$(cargo bench --no-run -p flgfn-learner --bench step --bench scale \
    --message-format=json |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-message" and m["message"]["level"] == "error":
        sys.stderr.write(m["message"]["rendered"])
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])
')

rm -rf "$bundle"
mkdir -p "$bundle"
for bin in flgfn-learner flgfn-actor; do
    cp "$CARGO_TARGET_DIR/release/$bin" "$bundle/"
done
while read -r name path; do
    cp "$path" "$bundle/$name"
done <<<"$benches"
strip "$bundle"/*
# torch-sys links libtorch_cuda only where the wheel has it: a CPU-only
# torch builds fine and would leave the device's run without CUDA.
for bin in flgfn-learner step scale; do
    readelf -d "$bundle/$bin" | grep -q 'NEEDED.*libtorch_cuda\.so' || {
        echo "gpu: $bin does not link libtorch_cuda.so (a CPU-only torch in $venv?): CUDA would not be used" >&2
        exit 1
    }
done
cd "$repo"
ls -la "$bundle"
du -sh "$bundle"
echo "gpu: ready; run deploy/gpu/measure.sh on the device with carry [\".gpu-bundle\"]"
