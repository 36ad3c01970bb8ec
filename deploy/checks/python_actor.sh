#!/usr/bin/env bash
# Check: the Python actor (examples/python_actor) trains a real learner:
# the learner accepts its handshake (in one call, the handshake in the
# Session's headers) and chunks (no rejection), counts its
# transitions, and reaches the end of a 600-step run at quality (which
# energies computed wrongly would not reach: the learner trains on the
# actor's); the actor exits 0 when told training is over. Then a learner is killed (SIGKILL) under a
# running actor and started again on the same port: the actor reconnects
# by itself and trains it to the end; and a learner stopped for a
# restart (SIGUSR1) tells the actor to reconnect: it waits, and trains the
# learner started again, which goes on from the step it stopped at. An
# actor refused for good (no
# token) exits 1 with the refusal in one line; one that gives up on an
# unreachable learner exits 75 (at once where nothing listens); one told to stop (SIGTERM) hands over its
# last chunk (the learner receives every chunk it says it sent), leaves
# the session and exits 0. One learner sends f32 weights, the others
# bf16. Refused by a learner of the medium set task, an actor names
# --task; given that learner's task, it trains it. Last, without a
# learner: the energies of proto/TASKS.md's
# example, safetensors decoding (F32, BF16), the network worked by hand,
# a task stuck before its end, weights and settings refused; and a
# scripted learner that takes handshakes only as calls of their own. Its
# requirements go into a venv in the cache.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=deploy/env.sh
source deploy/env.sh >/dev/null
# shellcheck source=deploy/tools.sh
source deploy/tools.sh
# (Run alone too: the learners here read the caller's FLGFN_* otherwise.)
ignore_caller_settings
requirements=examples/python_actor/requirements.txt
venv="$FLGFN_CACHE_DIR/venv-python-actor-$(sha256sum "$requirements" | cut -c1-12)"
# The marker is written last: an install that failed halfway is redone.
if [ ! -e "$venv/.installed" ]; then
    echo "flgfn: installing the Python actor's requirements into $venv (one time)" >&2
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements" >&2
    touch "$venv/.installed"
fi
cargo build --release --quiet --bin flgfn-learner
work="$(mktemp -d)"
learner_pid=""
actor_pid=""
silent_pid=""
cleanup() {
    # Waited for: a learner stopped by SIGTERM writes its final checkpoint
    # into $work, which would outlive the rm otherwise.
    for pid in $learner_pid $actor_pid $silent_pid; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
# Fails the check: what went wrong ($1), and the end of the logs that
# show it (the rest).
failed() {
    echo "python_actor: FAILED: $1" >&2
    shift
    tail -n 20 "$@" >&2
    exit 1
}
# Waits for process $1 for at most $2 seconds (then kills it); its status.
wait_at_most() {
    local waited=0
    while kill -0 "$1" 2>/dev/null && [ "$waited" -lt "$(($2 * 10))" ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1"
}
# Waits (at most 60 s) for the learner to end, then sets `ingested` and
# `rejected` from its last report ($1: its metrics file, $2: its log), or
# fails the check.
learner_totals() {
    if ! wait_at_most "$learner_pid" 60 || [ ! -s "$1" ]; then
        learner_pid=""
        echo "python_actor: FAILED: the learner failed or reported nothing" >&2
        tail -n 20 "$2" >&2
        exit 1
    fi
    learner_pid=""
    read -r ingested rejected < <(python3 -c '
import json, sys
last = [json.loads(line) for line in open(sys.argv[1])][-1]
print(last["ingested_transitions"], sum(last["rejections"].values()))' "$1")
}
# Chunks an actor's log ($1) says it sent, by its last line, where it
# ended told that training is done.
chunks_sent() {
    sed -n 's/.*training done: sent \([0-9]*\) chunks, .*/\1/p' "$1"
}
# Chunks a learner's log ($1) says its sessions received, late ones
# included, then the late ones alone.
chunks_received() {
    sed -n 's/.*session ended .* chunks=\([0-9]*\) late_chunks=\([0-9]*\) .*/\1 \2/p' "$1" |
        awk '{ received += $1 + $2; late += $2 } END { print received + 0, late + 0 }'
}
# Waits (at most 60 s) for a learner's first report in metrics file $1.
first_report() {
    for _ in $(seq 1 600); do
        if [ -s "$1" ]; then return 0; fi
        sleep 0.1
    done
    return 1
}
# (Quality comes at about step 250 of 600 here: a third of a run's
# default length.)
port="$(free_port)"
"$CARGO_TARGET_DIR/release/flgfn-learner" --listen "127.0.0.1:$port" --max-steps 600 \
    --checkpoint-dir "" --metrics "$work/metrics.jsonl" >"$work/learner.log" 2>&1 &
learner_pid=$!
if ! timeout 300 "$venv/bin/python" examples/python_actor/flgfn_actor.py --learner "http://127.0.0.1:$port" \
    --envs 64 --truncate-fraction 0.3 --seed 1 --reconnect-attempts 5 >"$work/actor.log" 2>&1; then
    echo "python_actor: FAILED: the actor exited non-zero" >&2
    tail -n 20 "$work/actor.log" "$work/learner.log" >&2
    exit 1
fi
learner_totals "$work/metrics.jsonl" "$work/learner.log"
sent="$(sed -n 's/.*sent [0-9]* chunks, \([0-9]*\) transitions.*/\1/p' "$work/actor.log")"
grep -q "actor joined .*handshake_in_session=true" "$work/learner.log" ||
    failed "the learner logged no handshake in a Session's headers (actor joined ... handshake_in_session=true)" "$work/actor.log" "$work/learner.log"
# Every chunk sent reached the learner: in time, or late (on its way when
# training ended; the actor sends what it had queued before it leaves).
sent_chunks="$(chunks_sent "$work/actor.log")"
read -r received_chunks _ < <(chunks_received "$work/learner.log")
finished="$(grep "training finished steps=600 " "$work/learner.log" || true)"
if [ -n "$finished" ] && [ -n "$sent" ] &&
    [ "$ingested" -gt 0 ] && [ "$ingested" -le "$sent" ] && [ "$rejected" -eq 0 ] &&
    [ -n "$sent_chunks" ] && [ "$received_chunks" -eq "$sent_chunks" ] &&
    grep -q " quality_reached=true" <<<"$finished"; then
    echo "python_actor: ok: the Python actor sent $sent transitions in $sent_chunks chunks, the learner received them all ($received_chunks chunks, late ones included), ingested $ingested by its last report, refused none, and finished 600 steps at quality ($(grep -o 'time_to_quality_s=[0-9.]*' <<<"$finished"))"
else
    echo "python_actor: FAILED: sent '$sent' ($sent_chunks chunks), received $received_chunks chunks, ingested '$ingested', rejected '$rejected'; the learner ended: ${finished:-(no training finished line)}" >&2
    tail -n 20 "$work/actor.log" "$work/learner.log" >&2
    exit 1
fi

# A learner stopped (SIGINT) in the middle of training, the actor busy:
# the chunks on their way then are still received, counted late. This
# learner sends its weights as f32 (the others as bf16, the default).
port="$(free_port)"
FLGFN_LEARNER__WEIGHT_ENCODING=f32 "$CARGO_TARGET_DIR/release/flgfn-learner" --listen "127.0.0.1:$port" --max-steps 0 \
    --checkpoint-dir "" --metrics "$work/stopped.jsonl" >"$work/learner-stopped.log" 2>&1 &
learner_pid=$!
timeout 300 "$venv/bin/python" examples/python_actor/flgfn_actor.py --learner "127.0.0.1:$port" \
    --envs 16 --seed 3 --reconnect-attempts 5 >"$work/actor-stopped.log" 2>&1 &
actor_pid=$!
first_report "$work/stopped.jsonl" || true
sleep 1
kill -INT "$learner_pid" 2>/dev/null || true
actor_status=0
wait "$actor_pid" || actor_status=$?
actor_pid=""
learner_totals "$work/stopped.jsonl" "$work/learner-stopped.log"
sent_chunks="$(chunks_sent "$work/actor-stopped.log")"
read -r received_chunks late_chunks < <(chunks_received "$work/learner-stopped.log")
if [ "$actor_status" -eq 0 ] && [ -n "$sent_chunks" ] && [ "$sent_chunks" -gt 0 ] &&
    [ "$received_chunks" -eq "$sent_chunks" ]; then
    echo "python_actor: ok: a learner stopped mid-run, sending f32 weights, received every chunk the actor sent ($sent_chunks, $late_chunks of them late)"
else
    failed "a learner stopped mid-run: the actor (status $actor_status) sent '$sent_chunks' chunks, the learner received $received_chunks" "$work/actor-stopped.log" "$work/learner-stopped.log"
fi

# Reconnect: the learner dies under a running actor and comes back on the
# same port.
port="$(free_port)"
start_learner() { # $1: a name for its log and metrics
    "$CARGO_TARGET_DIR/release/flgfn-learner" --listen "127.0.0.1:$port" --max-steps 300 \
        --checkpoint-dir "$work/checkpoints" --metrics "$work/$1.jsonl" >"$work/$1.log" 2>&1 &
    learner_pid=$!
}
start_learner learner-1
# Bounded (20 failed attempts of at most 10 s each, and a timeout), so
# that a learner that never comes back fails the check.
timeout 300 "$venv/bin/python" examples/python_actor/flgfn_actor.py --learner "127.0.0.1:$port" \
    --envs 16 --seed 2 --reconnect-attempts 20 >"$work/actor-2.log" 2>&1 &
actor_pid=$!
# Killed once it has trained on the actor's chunks (its first report).
if ! first_report "$work/learner-1.jsonl"; then
    echo "python_actor: FAILED: the first learner reported nothing within 60 s" >&2
    tail -n 20 "$work/actor-2.log" "$work/learner-1.log" >&2
    exit 1
fi
if ! kill -KILL "$learner_pid" 2>/dev/null; then
    echo "python_actor: FAILED: the first learner exited before it could be killed" >&2
    tail -n 20 "$work/actor-2.log" "$work/learner-1.log" >&2
    exit 1
fi
wait "$learner_pid" 2>/dev/null || true
sleep 1
start_learner learner-2
actor_status=0
wait "$actor_pid" || actor_status=$?
if [ "$actor_status" -ne 0 ]; then
    actor_pid=""
    # (The status tells a refusal or giving up, 1 or 75, from a crash at
    # exit, 128 + its signal, and from the timeout, 124.)
    echo "python_actor: FAILED: the actor did not survive the learner's restart (exit status $actor_status)" >&2
    tail -n 20 "$work/actor-2.log" "$work/learner-2.log" >&2
    exit 1
fi
actor_pid=""
learner_totals "$work/learner-2.jsonl" "$work/learner-2.log"
sessions="$(sed -n 's/.*weight versions, \([0-9]*\) sessions.*/\1/p' "$work/actor-2.log")"
if grep -q "reconnecting" "$work/actor-2.log" && grep -Eq "training finished steps=300 " "$work/learner-2.log" &&
    [ -n "$sessions" ] && [ "$sessions" -ge 2 ] && [ "$ingested" -gt 0 ] && [ "$rejected" -eq 0 ]; then
    echo "python_actor: ok: after the learner was killed and restarted, the actor reconnected ($sessions sessions) and the new learner ingested $ingested transitions, refused none, and finished 300 steps"
else
    echo "python_actor: FAILED: sessions '$sessions', ingested '$ingested', rejected '$rejected'" >&2
    tail -n 20 "$work/actor-2.log" "$work/learner-2.log" >&2
    exit 1
fi

# A restart by hand: a learner stopped with SIGUSR1 tells the actor to
# reconnect; the actor waits for the learner started again, which goes on
# from the step it stopped at.
port="$(free_port)"
restart_learner() { # $1: a name for its log; $2: its max steps
    "$CARGO_TARGET_DIR/release/flgfn-learner" --listen "127.0.0.1:$port" --max-steps "$2" \
        --checkpoint-dir "$work/restart-checkpoints" --metrics "$work/restart.jsonl" >"$work/$1.log" 2>&1 &
    learner_pid=$!
}
restart_learner restart-1 0
timeout 300 "$venv/bin/python" examples/python_actor/flgfn_actor.py --learner "127.0.0.1:$port" \
    --envs 16 --seed 4 --reconnect-attempts 20 >"$work/actor-4.log" 2>&1 &
actor_pid=$!
first_report "$work/restart.jsonl" || failed "the learner to restart reported nothing within 60 s" "$work/actor-4.log" "$work/restart-1.log"
kill -USR1 "$learner_pid"
learner_status=0
wait_at_most "$learner_pid" 60 || learner_status=$?
learner_pid=""
stopped_at="$(sed -n 's/.*training finished steps=\([0-9]*\) .*ended_by=restart.*/\1/p' "$work/restart-1.log")"
sleep 1
if [ "$learner_status" -ne 0 ] || [ -z "$stopped_at" ] || ! kill -0 "$actor_pid" 2>/dev/null; then
    failed "stopped for a restart, the learner exited $learner_status at step '$stopped_at'; the actor should wait" "$work/actor-4.log" "$work/restart-1.log"
fi
restart_learner restart-2 $((stopped_at + 100))
actor_status=0
wait "$actor_pid" || actor_status=$?
actor_pid=""
learner_totals "$work/restart.jsonl" "$work/restart-2.log"
resumed_at="$(sed -n 's/.*resuming from a checkpoint.* step=\([0-9]*\) .*/\1/p' "$work/restart-2.log")"
sessions="$(sed -n 's/.*weight versions, \([0-9]*\) sessions.*/\1/p' "$work/actor-4.log")"
if [ "$actor_status" -eq 0 ] && grep -q "(the learner stops for a restart); reconnecting" "$work/actor-4.log" &&
    [ "$resumed_at" = "$stopped_at" ] && grep -Eq "training finished steps=$((stopped_at + 100)) " "$work/restart-2.log" &&
    [ -n "$sessions" ] && [ "$sessions" -ge 2 ] && [ "$rejected" -eq 0 ]; then
    echo "python_actor: ok: stopped for a restart at step $stopped_at, the learner told the actor to reconnect; it waited, and the learner started again resumed at step $resumed_at and finished with it ($sessions sessions)"
else
    failed "a restart: the actor exited $actor_status after $sessions sessions; stopped at step '$stopped_at', resumed at '$resumed_at'" "$work/actor-4.log" "$work/restart-2.log"
fi

# Refused for good (a learner with a token, an actor with none): the actor
# exits 1 with the refusal on one line, not buried under a traceback.
port="$(free_port)"
FLGFN_TOKEN=python-actor-check-token-0123456789 "$CARGO_TARGET_DIR/release/flgfn-learner" \
    --listen "127.0.0.1:$port" --max-steps 0 --checkpoint-dir "" >"$work/learner-3.log" 2>&1 &
learner_pid=$!
status=0
env -u FLGFN_TOKEN timeout 120 "$venv/bin/python" examples/python_actor/flgfn_actor.py \
    --learner "127.0.0.1:$port" --envs 4 --reconnect-attempts 60 >"$work/actor-3.log" 2>&1 || status=$?
if [ "$status" -eq 1 ] && grep -q "^flgfn_actor: the learner refused this actor: UNAUTHENTICATED.*(this actor sent none: set FLGFN_TOKEN)" "$work/actor-3.log" &&
    ! grep -q "Traceback" "$work/actor-3.log"; then
    echo "python_actor: ok: refused for its missing token, the actor exited 1 saying so in one line"
else
    failed "a refused actor exited $status" "$work/actor-3.log"
fi
# With the token, another network: the learner's refusal names its key,
# model.hidden, and the actor says which flag that is here.
status=0
FLGFN_TOKEN=python-actor-check-token-0123456789 timeout 120 "$venv/bin/python" examples/python_actor/flgfn_actor.py \
    --learner "127.0.0.1:$port" --envs 4 --hidden 8 >"$work/actor-3b.log" 2>&1 || status=$?
if [ "$status" -eq 1 ] && grep -q "^flgfn_actor: the learner refused this actor: .*model.hidden.*(model.hidden is --hidden here)" "$work/actor-3b.log"; then
    echo "python_actor: ok: refused for another network, the actor names --hidden"
else
    failed "an actor of another network exited $status" "$work/actor-3b.log"
fi
# (Stopped here: the cases below start learners of their own.)
kill -TERM "$learner_pid"
wait_at_most "$learner_pid" 30 || true
learner_pid=""

# A learner of another set task (medium): the actor of the default task is
# refused, told of --task; given the learner's task as the learner's log
# writes it, it trains the learner to its end.
port="$(free_port)"
FLGFN_TASK__SIZE=medium "$CARGO_TARGET_DIR/release/flgfn-learner" --listen "127.0.0.1:$port" \
    --max-steps 30 --checkpoint-dir "" --metrics "$work/medium.jsonl" >"$work/learner-medium.log" 2>&1 &
learner_pid=$!
status=0
timeout 120 "$venv/bin/python" examples/python_actor/flgfn_actor.py --learner "127.0.0.1:$port" \
    --envs 16 --reconnect-attempts 60 >"$work/actor-medium-1.log" 2>&1 || status=$?
if ! { [ "$status" -eq 1 ] && grep -q "task mismatch: .*(the task is --task here" "$work/actor-medium-1.log"; }; then
    failed "an actor of the default task, against a learner of the medium one, exited $status" "$work/actor-medium-1.log"
fi
task="$(grep -o "task=set_generation([^)]*)" "$work/learner-medium.log" | head -n 1)"
status=0
timeout 120 "$venv/bin/python" examples/python_actor/flgfn_actor.py --learner "127.0.0.1:$port" \
    --envs 16 --task "${task#task=}" >"$work/actor-medium-2.log" 2>&1 || status=$?
learner_totals "$work/medium.jsonl" "$work/learner-medium.log"
# (The one refusal counted is the first actor's handshake.)
if [ "$status" -eq 0 ] && [ "$rejected" -eq 1 ] && [ "$ingested" -gt 0 ] &&
    grep -q "training finished steps=30 " "$work/learner-medium.log"; then
    echo "python_actor: ok: refused by a learner of another set task, the actor named --task; given that learner's task, it trained it to its end"
else
    failed "an actor given --task '${task#task=}' exited $status; ingested '$ingested', rejected '$rejected'" "$work/actor-medium-2.log" "$work/learner-medium.log"
fi

# Gives up on a learner nobody serves: status 75 (EX_TEMPFAIL, as the Rust
# actor), the cause in one line. A refused connection is a failed attempt
# at once, not after --connect-timeout: two attempts of 30 s would outlast
# the timeout.
port="$(free_port)"
status=0
timeout 20 "$venv/bin/python" examples/python_actor/flgfn_actor.py --learner "127.0.0.1:$port" \
    --envs 4 --reconnect-attempts 2 --connect-timeout 30 >"$work/actor-4.log" 2>&1 || status=$?
if [ "$status" -eq 75 ] &&
    grep -q "^flgfn_actor: gave up after 2 attempts: UNAVAILABLE: cannot connect to 127.0.0.1:$port: Connection refused" "$work/actor-4.log" &&
    ! grep -q "Traceback" "$work/actor-4.log"; then
    echo "python_actor: ok: with nothing listening, the actor gave up after its attempts with status 75, at once, naming the address"
else
    failed "an actor with no learner exited $status" "$work/actor-4.log"
fi

# An address that takes connections and never answers (a firewall, a
# learner too busy): each attempt waits --connect-timeout, then says so.
"$venv/bin/python" -c 'import socket, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(64)
print(s.getsockname()[1], flush=True); time.sleep(600)' >"$work/silent.port" &
silent_pid=$!
for _ in $(seq 1 100); do
    if [ -s "$work/silent.port" ]; then break; fi
    sleep 0.1
done
port="$(cat "$work/silent.port")"
status=0
timeout 60 "$venv/bin/python" examples/python_actor/flgfn_actor.py --learner "127.0.0.1:$port" \
    --envs 4 --reconnect-attempts 2 --connect-timeout 0.5 >"$work/actor-4a.log" 2>&1 || status=$?
if [ "$status" -eq 75 ] && grep -q "^flgfn_actor: gave up after 2 attempts: no answer from 127.0.0.1:$port" "$work/actor-4a.log" &&
    ! grep -q "Traceback" "$work/actor-4a.log"; then
    echo "python_actor: ok: with an address that never answers, the actor gave up after its attempts with status 75, naming the address"
else
    failed "an actor of an address that never answers exited $status" "$work/actor-4a.log"
fi

# Told to stop while it waits for a learner: not a failed attempt (status
# 0, not 75), and at once, not at the end of the wait.
"$venv/bin/python" examples/python_actor/flgfn_actor.py --learner "127.0.0.1:$port" \
    --envs 4 --reconnect-attempts 1 --connect-timeout 30 >"$work/actor-4b.log" 2>&1 &
actor_pid=$!
# (Its handlers are in place once it says it connects.)
for _ in $(seq 1 300); do
    if grep -q ": connecting to " "$work/actor-4b.log"; then break; fi
    sleep 0.1
done
sleep 0.5
kill -TERM "$actor_pid"
status=0
wait_at_most "$actor_pid" 10 || status=$?
actor_pid=""
if [ "$status" -eq 0 ] && grep -q ": stopped: sent 0 chunks" "$work/actor-4b.log"; then
    echo "python_actor: ok: told to stop while waiting for a learner, the actor stopped at once with status 0"
else
    failed "an actor stopped while waiting for a learner exited $status" "$work/actor-4b.log"
fi

# Settings it cannot use, refused before it connects (status 2), each in
# one line naming it: widths that are not, a token as a .env line or in
# shell quotes (the learner would refuse it, blaming the token). (Bounded:
# one that took them would give up on the absent learner within a second.)
# refused_at_start WHAT SAID ARGS...: the actor given ARGS (WHAT, for the
# failure) exits 2, its error saying SAID.
refused_at_start() {
    local what=$1 said=$2 status=0
    shift 2
    "$venv/bin/python" examples/python_actor/flgfn_actor.py "$@" \
        --learner "127.0.0.1:$port" --reconnect-attempts 1 --connect-timeout 1 \
        >"$work/actor-refused.log" 2>&1 || status=$?
    if ! { [ "$status" -eq 2 ] && grep -qF -- "$said" "$work/actor-refused.log"; }; then
        failed "an actor given $what exited $status" "$work/actor-refused.log"
    fi
}
refused_at_start "--hidden 256,abc" "argument --hidden: '256,abc': give positive layer widths" \
    --hidden 256,abc
for token in '"0123456789abcdef0123"' 'FLGFN_TOKEN=0123456789abcdef0123'; do
    FLGFN_TOKEN="$token" refused_at_start "FLGFN_TOKEN=$token" "error: FLGFN_TOKEN: the token"
done
for task in 'lattice(side=4)' 'set_generation(universe=30, set_size=40, levels=1.0)'; do
    refused_at_start "--task $task" "argument --task: '" --task "$task"
done
for name in '' '   ' "$(printf 'actor\001')"; do
    refused_at_start "--name '$name'" "error: --name: a name must" --name "$name"
done
echo "python_actor: ok: --hidden of no widths, --task of another task or of a set larger than its universe, a token in quotes or as a .env line, and a blank --name or one with control characters are refused at start, by name"
# Without its requirements (-S: no site-packages), one line saying what
# to install, not a traceback; --help too.
status=0
python3 -S examples/python_actor/flgfn_actor.py --help >"$work/actor-bare.log" 2>&1 || status=$?
if ! { [ "$status" -eq 1 ] && grep -q "is not installed: install the requirements first" "$work/actor-bare.log" &&
    ! grep -q "Traceback" "$work/actor-bare.log"; }; then
    failed "the actor without its requirements exited $status" "$work/actor-bare.log"
fi
echo "python_actor: ok: without its requirements, the actor says what to install"

# Told to stop (SIGTERM, as compose, Kubernetes and Slurm send): the actor
# finishes its rollout, hands the chunk over, leaves the session (the
# learner logs it as left, not as a lost connection) and exits 0.
port="$(free_port)"
"$CARGO_TARGET_DIR/release/flgfn-learner" --listen "127.0.0.1:$port" --max-steps 0 \
    --checkpoint-dir "" --metrics "$work/learner-5.jsonl" >"$work/learner-5.log" 2>&1 &
learner_pid=$!
"$venv/bin/python" examples/python_actor/flgfn_actor.py --learner "127.0.0.1:$port" --envs 16 \
    >"$work/actor-5.log" 2>&1 &
actor_pid=$!
first_report "$work/learner-5.jsonl" || true
kill -TERM "$actor_pid"
status=0
wait_at_most "$actor_pid" 30 || status=$?
actor_pid=""
# (The learner logs the session's end once it has read the closed stream.)
for _ in $(seq 1 50); do
    if grep -q "session ended" "$work/learner-5.log"; then break; fi
    sleep 0.1
done
stopped_sent="$(sed -n 's/.*: stopped: sent \([0-9]*\) chunks.*/\1/p' "$work/actor-5.log")"
read -r received_chunks _ < <(chunks_received "$work/learner-5.log")
if [ "$status" -eq 0 ] && [ -n "$stopped_sent" ] && [ "$stopped_sent" -gt 0 ] &&
    [ "$received_chunks" -eq "$stopped_sent" ] &&
    grep -q 'ended_by="the actor left"' "$work/learner-5.log"; then
    echo "python_actor: ok: told to stop, the actor handed over its chunks (the learner received all $received_chunks it sent), left its session and exited 0"
else
    failed "a stopped actor exited $status, saying it sent '$stopped_sent' chunks; the learner received $received_chunks" "$work/actor-5.log" "$work/learner-5.log"
fi
kill -TERM "$learner_pid"
wait_at_most "$learner_pid" 30 || true
learner_pid=""

# Weights that do not fit are named, not a traceback; a gRPC server that is
# not a learner (every method UNIMPLEMENTED) is a final refusal with a hint,
# not retried forever.
if "$venv/bin/python" - >"$work/unit.log" 2>&1 <<'PYTHON'
import json
import struct
import sys
from concurrent import futures

import grpc
import numpy as np

sys.path.insert(0, "examples/python_actor")
import flgfn_actor as fa

# Task params are compared as strings: floats as Rust's {:?} writes them
# (the right-hand sides are rustc's output), not as Python's repr.
for x, rust in [(1.0, "1.0"), (-0.0, "-0.0"), (0.3, "0.3"), (5e-5, "5e-5"), (1.5e-7, "1.5e-7"),
                (1e16, "1e16"), (2.5e300, "2.5e300"), (0.0001, "0.0001"),
                (123456789012345.0, "123456789012345.0"), (-0.4381397850674522, "-0.4381397850674522")]:
    assert fa.rust_float(x) == rust, (x, fa.rust_float(x), rust)
assert fa.SetGeneration(levels=[5e-5, 1.0]).params()[2] == "levels=5e-5,1.0"

# The energies of proto/TASKS.md's example (U 4, S 2, levels 0.0,1.0): the
# learner trains on whatever energies an actor sends, so only this shows
# them wrong.
example = fa.SetGeneration(universe=4, set_size=2, levels=[0.0, 1.0])
for actions, energies in [([1, 2], [1.0, 0.0]), ([3, 0], [1.0, 0.0])]:
    states, terms = example.initial(1), []
    for a in actions:
        terms.append(float(example.step_energy(states, np.array([a]))[0]))
        example.step(states, np.array([0]), np.array([a]))
    assert terms == energies, (actions, terms, energies)
    assert example.is_terminal(states).all(), states

# safetensors as the learner writes them: an 8-byte little-endian header
# length, the JSON header, offsets from the data's start; F32, and BF16 as
# the upper half of an f32 (0x3FC0 is 1.5, 0xC000 is -2.0).
header = json.dumps({"__metadata__": {"version": "3"},
                     "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "b": {"dtype": "BF16", "shape": [1, 2], "data_offsets": [8, 12]}}).encode()
buffer = (struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.5, -2.0)
          + struct.pack("<2H", 0x3FC0, 0xC000))
arrays, metadata = fa.read_safetensors(buffer)
assert arrays["a"].tolist() == [1.5, -2.0] and arrays["b"].tolist() == [[1.5, -2.0]], arrays
assert metadata == {"version": "3"}, metadata

# The network, worked by hand: Linear layers as [out, in] (x @ W.T + b),
# leaky ReLU of slope 0.01, and the forward logits first in the heads.
# State [1, 1, 0, 0] gives hidden [1, -1] -> [1, -0.01]; head row i is
# [i, 1] plus bias 0.5, so forward logit i is i - 0.01 + 0.5.
hand = {"hidden0.weight": np.array([[1, 0, 0, 0], [0, -1, 0, 0]], np.float32),
        "hidden0.bias": np.zeros(2, np.float32),
        "heads.weight": np.array([[i, 1] for i in range(2 * 4 + 1)], np.float32),
        "heads.bias": np.full(2 * 4 + 1, 0.5, np.float32)}
logits = fa.Policy(hand, (2,)).forward_logits(np.array([[1, 1, 0, 0]], np.float32), 4)
assert np.allclose(logits, [[0.49, 1.49, 2.49, 3.49]]), logits

# A task whose code leaves a state with no valid action before its end
# (here: a mask that allows nothing from the second step on) ends that
# trajectory there, as the Rust actor does, rather than draw action 0.
class Stuck(fa.SetGeneration):
    def forward_mask(self, states):
        return super().forward_mask(states) & (states.sum(axis=1, keepdims=True) < 1)
stuck = Stuck(universe=4, set_size=2, levels=[0.0, 1.0])
zero = {"hidden0.weight": np.zeros((8, 4), np.float32), "hidden0.bias": np.zeros(8, np.float32),
        "heads.weight": np.zeros((9, 8), np.float32), "heads.bias": np.zeros(9, np.float32)}
actions, _ = fa.rollout(stuck, fa.Policy(zero, (8,)), 3, 0.0, 0.0, np.random.default_rng(0))
assert [len(a) for a in actions] == [1, 1, 1], actions

task = fa.SetGeneration()
good = {"hidden0.weight": np.zeros((8, task.state_dim), np.float32),
        "hidden0.bias": np.zeros(8, np.float32),
        "heads.weight": np.zeros((2 * task.forward_actions + 1, 8), np.float32),
        "heads.bias": np.zeros(2 * task.forward_actions + 1, np.float32)}
fa.check_weights(good, task, (8,))
for change, expected in [
        (lambda w: w.pop("heads.bias"), "missing ['heads.bias']"),
        (lambda w: w.__setitem__("hidden0.bias", np.zeros(9, np.float32)), "hidden0.bias has shape [9]"),
        (lambda w: w["heads.weight"].__setitem__((0, 0), np.nan), "heads.weight holds a non-finite"),
]:
    weights = {name: array.copy() for name, array in good.items()}
    change(weights)
    try:
        fa.check_weights(weights, task, (8,))
        sys.exit(f"not refused: {expected}")
    except ValueError as error:
        assert expected in str(error), (expected, str(error))

# Weights whose metadata names another task, network or version than the
# grant's are refused by name (a key left out passes).
ours = {"task": f"set_generation({', '.join(task.params())})",
        "model": f"mlp(input=30, hidden=[8], pf=30, pb=30)", "version": "7"}
fa.check_metadata(ours, task, (8,), 7)
fa.check_metadata({}, task, (8,), 7)
for key, theirs, said in [
        ("task", "set_generation(universe=8)", "they are for task set_generation(universe=8)"),
        ("model", "mlp(input=30, hidden=[9], pf=30, pb=30)", "they are for model mlp("),
        ("version", "6", "their metadata says version 6, the grant that brought them 7")]:
    try:
        fa.check_metadata({**ours, key: theirs}, task, (8,), 7)
        sys.exit(f"not refused: {key} {theirs}")
    except ValueError as error:
        assert said in str(error), str(error)

# A rollout whose session ended is abandoned at its next step.
steps = []
policy = fa.Policy(good, (8,))
assert fa.rollout(task, policy, 4, 0.0, 0.0, np.random.default_rng(0),
                  abandon=lambda: steps.append(1) or len(steps) > 3) is None
assert len(steps) == 4, steps
actions, _ = fa.rollout(task, policy, 4, 0.0, 0.0, np.random.default_rng(0))
assert all(len(a) == task.max_len for a in actions), actions

# Settings outside their range are refused before any connection.
for setting in [{"epsilon": 1.5}, {"epsilon": -0.1}, {"truncate_fraction": 2.0},
                {"truncate_fraction": 1.0}, {"envs": 0}]:
    try:
        fa.run(task, "127.0.0.1:1", **setting)
        sys.exit(f"not refused: {setting}")
    except ValueError as error:
        assert next(iter(setting)) in str(error), str(error)



def actor_against(handlers, reconnect_attempts):
    """Runs an actor against a gRPC server of `handlers`, which must stop
    it: the Refused or GaveUp it stopped with."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=handlers)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        fa.run(task, f"127.0.0.1:{port}", envs=4, reconnect_attempts=reconnect_attempts,
               reconnect_initial_s=0.01, reconnect_max_s=0.02)
    except (fa.Refused, fa.GaveUp) as error:
        return error
    finally:
        server.stop(0)
    sys.exit("the actor trained against a scripted server")


# A gRPC server that is not a learner: a final refusal at once.
error = actor_against([], reconnect_attempts=50)
assert isinstance(error, fa.Refused), repr(error)
assert "UNIMPLEMENTED" in str(error) and "flgfn learner" in str(error), str(error)

# A learner that predates sessions carrying their handshake refuses one for
# want of an actor id: the actor makes the two calls instead, and on each
# reconnect after (here every session is aborted, which is retried).
pb, _ = fa.load_protocol()
calls = []


def handshake(request, context):
    calls.append("Handshake")
    return pb.HandshakeReply(actor_id=7, session_key="0" * 32)


def session(requests, context):
    headers = dict(context.invocation_metadata())
    if "flgfn-handshake-bin" in headers:
        calls.append("Session with its handshake")
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "`flgfn-actor-id` is missing")
    calls.append(f"Session of actor {headers.get('flgfn-actor-id')}")
    context.abort(grpc.StatusCode.ABORTED, "scripted: try again")


old_learner = grpc.method_handlers_generic_handler("flgfn.v1.Learner", {
    "Handshake": grpc.unary_unary_rpc_method_handler(
        handshake, request_deserializer=pb.HandshakeRequest.FromString,
        response_serializer=pb.HandshakeReply.SerializeToString),
    "Session": grpc.stream_stream_rpc_method_handler(
        session, request_deserializer=pb.TrajectoryChunk.FromString,
        response_serializer=pb.Grant.SerializeToString)})
error = actor_against([old_learner], reconnect_attempts=2)
assert isinstance(error, fa.GaveUp) and "scripted: try again" in str(error), repr(error)
assert calls == ["Session with its handshake", "Handshake", "Session of actor 7",
                 "Handshake", "Session of actor 7"], calls

# A learner that grants a credit with weights and cuts each session
# (INTERNAL, which actors retry) at its first chunk: no session served, so
# the actor gives up after its attempts rather than retry at the shortest
# pause for ever.
def zero_weights(hidden):
    """The network of `task` and `hidden`, all zeros, as safetensors."""
    header, offset = {}, 0
    for name, shape in fa.weight_shapes(task, hidden).items():
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + bytes(offset)


cut = {"sessions": 0, "chunks": 0}


def cutting_session(requests, context):
    cut["sessions"] += 1
    if cut["sessions"] > 10:
        # (An actor that would retry for ever is stopped, and fails below.)
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "scripted: still retrying")
    reply = pb.HandshakeReply(actor_id=1, session_key="0" * 32)
    context.send_initial_metadata([("flgfn-handshake-reply-bin", reply.SerializeToString())])
    yield pb.Grant(credits=1, weights=pb.Weights(version=1, safetensors=zero_weights((256, 256))))
    next(requests)
    cut["chunks"] += 1
    context.abort(grpc.StatusCode.INTERNAL, "scripted: cut after the first chunk")


cutting = grpc.method_handlers_generic_handler("flgfn.v1.Learner", {
    "Session": grpc.stream_stream_rpc_method_handler(
        cutting_session, request_deserializer=pb.TrajectoryChunk.FromString,
        response_serializer=pb.Grant.SerializeToString)})
error = actor_against([cutting], reconnect_attempts=3)
assert isinstance(error, fa.GaveUp) and "cut after the first chunk" in str(error), repr(error)
assert cut == {"sessions": 3, "chunks": 3}, cut

# A server that ends a session carrying its handshake without a reply (an
# empty stream, status OK) is not a learner: a final refusal, saying so.
no_reply = grpc.method_handlers_generic_handler("flgfn.v1.Learner", {
    "Session": grpc.stream_stream_rpc_method_handler(
        lambda requests, context: iter(()), request_deserializer=pb.TrajectoryChunk.FromString,
        response_serializer=pb.Grant.SerializeToString)})
error = actor_against([no_reply], reconnect_attempts=2)
assert isinstance(error, fa.Refused) and "flgfn-handshake-reply-bin" in str(error), repr(error)

# A learner that serves TLS answers plain text with a TLS alert: the actor
# stops, saying so, rather than retry for ever. (A raw socket here, sending
# the alert record rustls sends, then closing.)
import socket
import threading

tls_like = socket.create_server(("127.0.0.1", 0))


def answer_with_alerts():
    while True:
        try:
            connection, _ = tls_like.accept()
        except OSError:
            return
        with connection:
            try:
                connection.recv(64)
                connection.sendall(bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32]))
            except OSError:
                pass


def actor_at(listener, reconnect_attempts):
    """Runs an actor against a stand-in server listening on `listener`,
    which must stop it, then closes it: the Refused or GaveUp it stopped
    with."""
    try:
        fa.run(task, f"127.0.0.1:{listener.getsockname()[1]}", envs=4,
               reconnect_attempts=reconnect_attempts, reconnect_initial_s=0.01,
               reconnect_max_s=0.02, connect_timeout_s=2.0)
    except (fa.Refused, fa.GaveUp) as error:
        return error
    finally:
        listener.close()
    sys.exit("the actor trained against a stand-in server")


threading.Thread(target=answer_with_alerts, daemon=True).start()
error = actor_at(tls_like, reconnect_attempts=50)
assert isinstance(error, fa.Refused), repr(error)
assert "serves TLS" in str(error) and "plain text only" in str(error), str(error)
assert not fa.answers_as_tls(f"127.0.0.1:{socket.create_server(('127.0.0.1', 0)).getsockname()[1]}", 0.5)

# An HTTP proxy without its route to the learner yet answers HTTP/2 with
# status 404 and no gRPC status, which gRPC reads as UNIMPLEMENTED: retried
# (then given up on), not taken for a gRPC server without the service.
# (Raw HTTP/2 frames: a SETTINGS frame, then every request's HEADERS
# answered with `:status 404`, HPACK's static entry 13, ending the stream.)
proxy = socket.create_server(("127.0.0.1", 0))
requests_404 = []


def frame(kind, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def answer_404(connection):
    buffered = b""

    def take(n):
        nonlocal buffered
        while len(buffered) < n:
            data = connection.recv(65536)
            if not data:
                raise EOFError
            buffered += data
        taken, buffered = buffered[:n], buffered[n:]
        return taken

    with connection:
        try:
            take(24)  # the client's preface
            connection.sendall(frame(4, 0, 0))
            while True:
                header = take(9)
                kind, flags = header[3], header[4]
                stream = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
                take(int.from_bytes(header[:3], "big"))
                if kind == 4 and not flags & 1:
                    connection.sendall(frame(4, 1, 0))
                elif kind == 1:
                    requests_404.append(stream)
                    connection.sendall(frame(1, 0x5, stream, bytes([0x80 | 13])))
        except (EOFError, OSError):
            pass


def serve_404():
    while True:
        try:
            connection, _ = proxy.accept()
        except OSError:
            return
        threading.Thread(target=answer_404, args=(connection,), daemon=True).start()


threading.Thread(target=serve_404, daemon=True).start()
error = actor_at(proxy, reconnect_attempts=2)
assert isinstance(error, fa.GaveUp), repr(error)
assert "UNIMPLEMENTED" in str(error) and "proxy" in str(error), str(error)
assert len(requests_404) == 2, requests_404

# Addresses as --learner (and flgfn-actor) take them, run() too: an
# http:// URL is its host:port (run() gave it to gRPC as it was, which
# reported a reachable learner as unreachable); https:// is refused.
assert fa.learner_target("127.0.0.1:5") == ("127.0.0.1:5", None)
assert fa.learner_target("http://127.0.0.1:5/x") == \
    ("127.0.0.1:5", "the path /x is ignored (a learner serves at the root)")
for bad in ["https://127.0.0.1:5", "127.0.0.1", "http://127.0.0.1:0"]:
    try:
        fa.run(task, bad, envs=4)
    except ValueError:
        pass
    else:
        sys.exit(f"run() took {bad}")

# A token the Rust actor refuses is refused here too, not sent to fail
# inside gRPC (a non-breaking space from a copy-paste, say).
assert fa.token_mistake("secret\u00a0token-0123456789") == \
    "the token must be printable ASCII without spaces", fa.token_mistake("secret\u00a0token-0123456789")
assert fa.token_mistake("short").startswith("the token has 5 characters")
assert fa.token_mistake("0123456789abcdef0123") is None
# Loopback as the Rust actor reckons it (no token-in-clear warning).
for host in ["LOCALHOST:5", "localhost.:5", "[::ffff:127.0.0.1]:5", "127.0.0.2:5", "[::1]:5"]:
    assert not fa.beyond_loopback(host), host
assert fa.beyond_loopback("10.0.0.5:5") and fa.beyond_loopback("learner:5")
assert fa.out_of_range(0, 0.0, 0.0, 2**32)[0] == "envs"

# A logit of -inf on a legal action (finite weights that overflow) draws
# the state uniformly, as the Rust actor draws it (it was given only the
# exploration's share: none at epsilon 0).
one = fa.SetGeneration(universe=4, set_size=1, levels=[0.0, 1.0])
overflowing = {"hidden0.weight": np.zeros((2, 4), np.float32),
               "hidden0.bias": np.array([1, 0], np.float32),
               "heads.weight": np.zeros((9, 2), np.float32), "heads.bias": np.zeros(9, np.float32)}
overflowing["heads.weight"][1, 0] = -3e38
overflowing["heads.bias"][1] = -3e38
drawn, _ = fa.rollout(one, fa.Policy(overflowing, (2,)), 4000, 0.0, 0.0, np.random.default_rng(0))
share = sum(actions[0] == 1 for actions in drawn) / 4000
assert abs(share - 0.25) < 0.03, share
PYTHON
then
    echo "python_actor: ok: weights of another shape, task, network or version, or with a NaN, and settings out of range are refused by name; a server that is not a learner stops the actor at once (UNIMPLEMENTED), as do one that sends no handshake reply and one that answers with a TLS alert, while a proxy's HTTP 404 is retried; a learner that takes handshakes only as calls of their own gets the two calls, on every reconnect; one that cuts each session at its first chunk has the actor give up after its attempts; run() takes http:// addresses and refuses https:// and tokens the Rust actor refuses, by name; a legal action's -inf logit draws the state uniformly"
else
    failed "weight checks or the UNIMPLEMENTED refusal" "$work/unit.log"
fi
