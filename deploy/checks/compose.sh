#!/usr/bin/env bash
# The compose deployment, tested for real. First, with no container: a
# token in .env beside the compose file is found from another folder, as
# the README says, and its absence is refused. Then it builds the images,
# starts the learner and 3 actors on a private network, and
#   1. kills the learner's process (SIGKILL, not through Docker, as the
#      OOM killer does) mid-training: Docker starts it again (restart:
#      on-failure), it resumes from its volume, versions never go back, and
#      the actors, never restarted, carry on by themselves;
#   2. stops the learner for a restart (SIGUSR1) and brings it back with
#      a changed setting (`up -d learner`, as the README says: a new
#      container): it exits 0, the actors wait, and the new one goes on
#      from the step the old one stopped at, with the new setting;
#   3. cuts one actor off the network and reconnects it: it rejoins, and
#      training goes on meanwhile; kills another's process (SIGKILL, as
#      the OOM killer does): Docker starts it again (restart:
#      on-failure) and it rejoins;
#   4. trains the small task to quality and stops the learner (SIGTERM):
#      every actor exits 0.
# Removes every container, network, volume and image it made, and the
# build cache where there was none before. Skipped
# (exit 77, reason printed) where no Docker daemon is reachable.
#
#   deploy/checks/compose.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=deploy/tools.sh
source deploy/tools.sh
# (Run alone too: compose passes the caller's FLGFN_* to the containers.)
ignore_caller_settings
if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1; then
    echo "compose: skipped: no Docker daemon reachable"
    exit 77
fi
# Compose v1 (a binary, as Debian packages it) or v2 (a docker plugin).
if command -v docker-compose >/dev/null; then
    compose_command=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
    compose_command=(docker compose)
else
    echo "compose: skipped: neither docker-compose nor the docker compose plugin is installed"
    exit 77
fi

# The job is the check's own (compose-job.toml, relative to the compose
# file).
export FLGFN_CONFIG_FILE=../checks/compose-job.toml

# (The process id alone repeats between containers sharing one daemon.)
suffix="$$$RANDOM"
project="flgfntest$suffix"
tag="test$suffix"
export FLGFN_TAG="$tag"
FLGFN_TOKEN="compose-test-token-$$-$RANDOM$RANDOM"
export FLGFN_TOKEN
network="${project}_flgfn"
work="$(mktemp -d)"
# An empty env file in place of deploy/docker/.env, which may be the
# user's own (FLGFN_LOG_FORMAT=json there would change what this reads).
: >"$work/no.env"
compose=("${compose_command[@]}" --project-name "$project" --file deploy/docker/compose.yaml
    --env-file "$work/no.env")

# The base image stays if it was here before (a cache); made or pulled by
# this run, it goes with the rest.
base="${FLGFN_DOCKER_BASE:-debian:bookworm-slim}"
base_existed=false
if docker image inspect "$base" >/dev/null 2>&1; then
    base_existed=true
fi

# BuildKit (the default builder from Docker 23) keeps a build cache that
# image removal leaves behind. Its entries cannot be told apart by who made
# them: emptied after the test only if it was empty before (a build run on
# the same daemon during the test loses its cache too).
# (Never failing: it runs before the cleanup is set, which would leave
# $work behind.)
build_cache_count() { docker system df --format '{{.Type}}={{.TotalCount}}' 2>/dev/null | sed -n 's/^Build Cache=//p' || true; }
build_cache_before="$(build_cache_count)"

cleanup() {
    "${compose[@]}" down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true
    docker image rm "flgfn-learner:$tag" "flgfn-actor:$tag" >/dev/null 2>&1 || true
    docker image prune --force --filter label=flgfn.stage=bundle >/dev/null 2>&1 || true
    if [ "$base_existed" = false ]; then
        docker image rm "$base" >/dev/null 2>&1 || true
    fi
    if [ "$build_cache_before" = 0 ]; then
        docker builder prune --all --force >/dev/null 2>&1 || true
    elif [ "$(build_cache_count)" != "$build_cache_before" ]; then
        echo "compose: the build cache held $build_cache_before entries before this test and was left as it is (docker builder prune empties it)"
    fi
    rm -rf "$work"
}
trap cleanup EXIT

fail() {
    echo "compose: FAILED: $*" >&2
    echo "--- learner log (tail)" >&2
    "${compose[@]}" logs --no-color --tail 40 learner >&2 || true
    echo "--- actor logs (tail)" >&2
    "${compose[@]}" logs --no-color --tail 10 actor >&2 || true
    exit 1
}

step() { echo "compose: $*"; }

# The README keeps FLGFN_TOKEN in deploy/docker/.env and says compose finds
# it from any shell: the project folder is the compose file's. Without it
# (and without the variable) compose refuses, saying where to write it.
# Checked on a copy of the compose file (deploy/docker/.env may be the
# user's own); rendering needs no daemon work.
step "a token in .env beside the compose file is found from another folder"
cp deploy/docker/compose.yaml "$work/compose.yaml"
refused="$(cd / && env -u FLGFN_TOKEN "${compose_command[@]}" -f "$work/compose.yaml" config 2>&1)" &&
    fail "compose rendered the file with no FLGFN_TOKEN anywhere"
grep -qF 'write FLGFN_TOKEN=... to deploy/docker/.env' <<<"$refused" ||
    fail "without a token, compose did not say where to write it: $refused"
echo "FLGFN_TOKEN=from-dotenv-$$" >"$work/.env"
rendered="$(cd / && env -u FLGFN_TOKEN "${compose_command[@]}" -f "$work/compose.yaml" config)" ||
    fail "compose could not render the file with a token in .env"
found="$(grep -cF "FLGFN_TOKEN: from-dotenv-$$" <<<"$rendered" || true)"
[ "$found" = 2 ] || fail "the .env token reached $found of the 2 services: $rendered"
rm "$work/compose.yaml" "$work/.env"

# The learner's metrics file, from its volume (readable whether the
# container runs or not: Compose v2's ps lists stopped ones only with -a).
# A copy made while a report is appended fails ("archive/tar: write too
# long"): tried again; a line still unfinished is left out.
metrics() {
    local learner_container
    learner_container="$("${compose[@]}" ps -a -q learner)"
    for _ in 1 2 3 4 5; do
        if docker cp "$learner_container:/var/lib/flgfn/metrics.jsonl" "$work/metrics.jsonl" 2>/dev/null; then
            python3 -c 'import sys; text = open(sys.argv[1]).read(); sys.stdout.write(text[:text.rfind("\n") + 1])' "$work/metrics.jsonl"
            return
        fi
        sleep 0.2
    done
    return 1
}

# One field of the last metrics line ("" before the first report).
last_metric() {
    metrics | python3 -c '
import json, sys
lines = [l for l in sys.stdin if l.strip()]
print(json.loads(lines[-1])[sys.argv[1]] if lines else "")' "$1"
}

# Waits up to $1 seconds for the command that follows to succeed.
wait_for() {
    local seconds="$1"
    shift
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 1
    done
}

version_at_least() { local v; v="$(last_metric version)"; [ -n "$v" ] && [ "$v" -ge "$1" ]; }
# kill_from_host CONTAINER: SIGKILLs the container's process as the
# daemon's host sees it, from a process of that host's (a container in its
# pid namespace: this shell may be another user's, or on another machine),
# not through Docker, which would count `docker kill` as a stop on purpose
# that no restart policy undoes. (From the actor image just built, as root:
# on FLGFN_DOCKER_BASE, debian:bookworm-slim may not be here. The shell's
# kill: a slim base has no kill binary.)
kill_from_host() {
    local pid
    pid="$(docker inspect --format '{{.State.Pid}}' "$1")"
    docker run --rm --pull never --pid host --network none --user 0 --entrypoint sh \
        "flgfn-actor:$tag" -c 'kill -KILL "$1"' sh "$pid" ||
        fail "could not kill the process ($pid) of container $1 from the daemon's host"
}
restarted() { [ "$(docker inspect --format '{{.RestartCount}}' "$1")" -ge 1 ]; }
learner_healthy() { [ "$(docker inspect --format '{{.State.Health.Status}}' "$("${compose[@]}" ps -q learner)")" = healthy ]; }
actor_containers() { "${compose[@]}" ps -q actor; }
connections_of() { docker logs "$1" 2>&1 | grep -c "connected to the learner" || true; }

step "building images (tag $tag)"
deploy/docker/build.sh "$tag"

step "starting the learner and 3 actors"
"${compose[@]}" up -d --scale actor=3 >/dev/null
wait_for 120 learner_healthy || fail "the learner never became healthy"
wait_for 120 version_at_least 200 || fail "no training progress (version $(last_metric version))"
mapfile -t actors < <(actor_containers)
[ "${#actors[@]}" -eq 3 ] || fail "expected 3 actor containers, got ${#actors[@]}"

learner="$("${compose[@]}" ps -q learner)"
wait_for 30 sh -c "docker exec $learner sh -c 'ls /var/lib/flgfn/checkpoints/ckpt-*' >/dev/null 2>&1" ||
    fail "no checkpoint written"
# (Read before the kill: the resumed learner drops the reports past its
# checkpoint from the file, and it may be back within the second.)
before_kill="$(metrics | python3 -c 'import json, sys; print(max(json.loads(l)["version"] for l in sys.stdin if l.strip()))')"
kill_from_host "$learner"
step "1. killed the learner's process (SIGKILL, not through Docker) at version $before_kill"
wait_for 60 restarted "$learner" ||
    fail "Docker did not start the killed learner again (restart: on-failure)"
# (Its health may still read from before the kill: its log says first.)
wait_for 120 sh -c "docker logs $learner 2>&1 | grep -q 'resuming from a checkpoint'" || fail "the learner did not resume"
wait_for 120 learner_healthy || fail "the restarted learner never became healthy"
wait_for 120 version_at_least $((before_kill + 100)) ||
    fail "no progress after the restart (version $(last_metric version), $before_kill before)"
# Versions in the metrics file never go back (the resumed learner drops its
# reports past the checkpoint's step, and goes on above them).
metrics | python3 -c '
import json, sys
versions = [json.loads(l)["version"] for l in sys.stdin if l.strip()]
back = [(a, b) for a, b in zip(versions, versions[1:]) if b < a]
sys.exit(f"versions went back: {back}" if back else 0)' || fail "versions went backwards"
# Nor were versions issued twice: the resumed learner's checkpoint is older
# than the kill, yet its versions start above every one published before
# (the version floor), as its first report past the checkpoint's step shows.
resumed_at="$(docker logs "$learner" 2>&1 | sed -n 's/.*resuming from a checkpoint.* step=\([0-9]*\) .*/\1/p' | tail -n 1)"
[ -n "$resumed_at" ] || fail "no checkpoint step in the resumed learner's log"
metrics | python3 -c '
import json, sys
resumed_at, before_kill = int(sys.argv[1]), int(sys.argv[2])
reports = [json.loads(l) for l in sys.stdin if l.strip()]
after = [r["version"] for r in reports if r["step"] > resumed_at]
if not after or after[0] <= before_kill:
    sys.exit(f"resumed at step {resumed_at}: first version {after[:1]}, up to {before_kill} published before the kill")
' "$resumed_at" "$before_kill" || fail "versions were issued again after the restart"
for actor in "${actors[@]}"; do
    [ "$(docker inspect --format '{{.State.Running}} {{.RestartCount}}' "$actor")" = "true 0" ] ||
        fail "actor $actor was not running through the restart"
    [ "$(connections_of "$actor")" -ge 2 ] || fail "actor $actor did not reconnect"
done
step "   resumed: versions $before_kill -> $(last_metric version), every actor reconnected by itself"

step "2. stopping the learner for a restart (SIGUSR1) at version $(last_metric version), back with 2 threads"
"${compose[@]}" kill -s SIGUSR1 learner >/dev/null
# (As compose.yaml tells users to wait for it.)
timeout 60 docker wait "$("${compose[@]}" ps -a -q learner)" >/dev/null ||
    fail "the learner did not exit after SIGUSR1"
[ "$(docker inspect --format '{{.State.ExitCode}}' "$learner")" = 0 ] || fail "the learner stopped for a restart did not exit 0"
grep -q "ended_by=restart" <<<"$(docker logs "$learner" 2>&1)" || fail "the learner's summary does not say ended_by=restart"
stopped_at="$(docker logs "$learner" 2>&1 | sed -n 's/.*training finished steps=\([0-9]*\) .*/\1/p' | tail -n 1)"
before_restart="$(last_metric version)"
sleep 2
for actor in "${actors[@]}"; do
    [ "$(docker inspect --format '{{.State.Running}}' "$actor")" = true ] ||
        fail "actor $actor did not wait for the learner's restart"
    grep -q "the learner stops for a restart; reconnecting" <<<"$(docker logs "$actor" 2>&1)" ||
        fail "actor $actor was not told to reconnect"
done
# (A changed variable: compose makes a new container, as it would for a
# new image; an edited job file alone is read by the same one.)
FLGFN_LEARNER__THREADS=2 "${compose[@]}" up -d learner >/dev/null
stopped="$learner"
learner="$("${compose[@]}" ps -q learner)"
[ "$learner" != "$stopped" ] || fail "up -d with a changed setting did not make a new learner container"
wait_for 120 learner_healthy || fail "the learner started again never became healthy"
grep -q "resuming with settings other than the checkpoint's.*learner.threads" <<<"$(docker logs "$learner" 2>&1)" ||
    fail "the new learner does not run the changed setting (no learner.threads in its resume warning)"
resumed_at="$(docker logs "$learner" 2>&1 | sed -n 's/.*resuming from a checkpoint.* step=\([0-9]*\) .*/\1/p' | tail -n 1)"
[ -n "$stopped_at" ] && [ "$resumed_at" = "$stopped_at" ] ||
    fail "stopped at step '$stopped_at', resumed at '$resumed_at': the stop's checkpoint was not the one resumed"
wait_for 120 version_at_least $((before_restart + 100)) ||
    fail "no progress after the restart (version $(last_metric version), $before_restart before)"
for actor in "${actors[@]}"; do
    [ "$(connections_of "$actor")" -ge 3 ] || fail "actor $actor did not reconnect after the restart"
done
step "   resumed at step $resumed_at, where it stopped; versions $before_restart -> $(last_metric version); every actor reconnected"

cut="${actors[0]}"
joins_before="$(connections_of "$cut")"
trained_before="$(last_metric trained_transitions)"
step "3. disconnecting actor ${cut:0:12} from the network"
docker network disconnect "$network" "$cut"
# Long enough for its pings (actor.keepalive_s = 2 in compose-job.toml) to go
# unanswered: it drops the dead connection and keeps trying to reconnect.
sleep 12
grep -Eq "connection to the learner lost|learner unavailable" <<<"$(docker logs --since 12s "$cut" 2>&1)" ||
    fail "the cut actor did not notice the cut"
trained_during="$(last_metric trained_transitions)"
[ "$trained_during" -gt "$trained_before" ] || fail "training stopped while one actor was cut off"
docker network connect --alias actor "$network" "$cut"
wait_for 60 sh -c "[ \$(docker logs $cut 2>&1 | grep -c 'connected to the learner') -gt $joins_before ]" ||
    fail "the cut actor did not rejoin"
step "   rejoined; trained transitions $trained_before -> $trained_during while it was away; chunks lost so far: $(last_metric lost_chunks)"
crashed="${actors[1]}"
joins_before="$(connections_of "$crashed")"
kill_from_host "$crashed"
step "   killed actor ${crashed:0:12}'s process (SIGKILL, not through Docker)"
wait_for 60 restarted "$crashed" || fail "Docker did not start the killed actor again (restart: on-failure)"
# (Its log is the container's, across its runs.)
wait_for 60 sh -c "[ \$(docker logs $crashed 2>&1 | grep -c 'connected to the learner') -gt $joins_before ]" ||
    fail "the restarted actor did not rejoin"
step "   Docker started it again, and it rejoined"

step "4. training to quality"
wait_for 300 sh -c "[ \"\$(docker cp $("${compose[@]}" ps -a -q learner):/var/lib/flgfn/metrics.jsonl - 2>/dev/null | tar -xO | tail -1 | python3 -c 'import json,sys; print(json.loads(sys.stdin.read())[\"at_quality\"])')\" = True ]" ||
    fail "the small task did not reach quality"
"${compose[@]}" stop --timeout 30 learner >/dev/null
for actor in "${actors[@]}"; do
    wait_for 60 sh -c "[ \"\$(docker inspect --format '{{.State.Running}}' $actor)\" = false ]" ||
        fail "actor $actor did not stop after training"
    code="$(docker inspect --format '{{.State.ExitCode}}' "$actor")"
    [ "$code" = 0 ] || fail "actor $actor exited $code"
done
grep -q "final weights saved" <<<"$(docker logs "$learner" 2>&1)" || fail "no final weights"
step "ok: quality at version $(last_metric version); the learner saved its final weights; 3 actors exited 0"
