#!/usr/bin/env python3
"""A flgfn actor in Python: same protocol as `flgfn-actor`, energies in Python.

It speaks the learner's gRPC protocol (proto/flgfn.proto, compiled at start
with grpcio-tools), loads the safetensors weights the learner sends, samples
trajectories with them in NumPy, scores each step with a Python energy
function, and streams the chunks back for the credits it was granted. The
learner cannot tell it from a Rust actor.

    pip install -r requirements.txt
    python flgfn_actor.py --learner 127.0.0.1:50051      # FLGFN_TOKEN if set

Your own task: write a class like `SetGeneration` below (its `name` and
`params()`, the task spec the learner's task reports; `state_dim`,
`forward_actions`, `backward_actions` and `max_len`; `initial(n)`, which
returns n initial states as the network's input rows, `forward_mask`,
`is_terminal`, `step_energy` and `step`, all on those rows) and pass it
to `run`. The learner must run the same task: it replays every action
through its own copy of the environment.
"""

import argparse
import collections
import ipaddress
import json
import math
import os
import queue
import random
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time

try:
    import grpc
    import grpc_tools  # noqa: F401 (compiles the proto at start)
    import numpy as np
except ModuleNotFoundError as missing:
    sys.exit(f"{os.path.basename(__file__)}: the Python module {missing.name!r} is not "
             f"installed: install the requirements first, e.g. python3 -m venv venv && "
             f"venv/bin/pip install -r "
             f"{os.path.join(os.path.dirname(os.path.abspath(__file__)), 'requirements.txt')}")

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, "..", "..", "proto")
PROTOCOL_VERSION = 3
# A handshake up to this size (encoded, before base64) rides in the
# Session's headers, a round trip less; a larger one is a call of its own.
MAX_HANDSHAKE_HEADER_BYTES = 4 << 10


def load_protocol(proto_dir=PROTO_DIR):
    """Compiles flgfn.proto into a temporary folder and imports it."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="flgfn-proto-")
    # Imported modules stay loaded: the folder goes as soon as they are,
    # so that an actor stopped by a signal (which skips atexit) leaves
    # nothing behind.
    try:
        include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
        status = protoc.main([
            "protoc", f"-I{proto_dir}", f"-I{include}",
            f"--python_out={out}", f"--grpc_python_out={out}",
            os.path.join(proto_dir, "flgfn.proto"),
        ])
        if status != 0:
            raise RuntimeError(f"protoc failed on {proto_dir}/flgfn.proto")
        sys.path.insert(0, out)
        try:
            import flgfn_pb2
            import flgfn_pb2_grpc
        finally:
            sys.path.remove(out)
    finally:
        shutil.rmtree(out, True)

    return flgfn_pb2, flgfn_pb2_grpc


# The small preset of the paper's set task: |U| = 30, |S| = 20, ten levels.
SMALL_LEVELS = [
    -0.4381397850674522, -0.40046449111789073, -0.2745059751263419,
    0.013149744911117978, 0.4110535720923896, 0.6261749162235306,
    0.6961474461702144, 0.7442282139370466, 0.8206350287761408,
    0.883494921538938,
]


def rust_float(x):
    """`x` as Rust's `{:?}` writes an f64, as task params are compared:
    Python's repr (the same shortest round-trip digits, the same switch to
    an exponent below 1e-4 and from 1e16) but for the exponent's form,
    `1e-5` and `1e16` where repr writes `1e-05` and `1e+16`."""
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + m.group(1).strip("+") + m.group(2),
                  repr(float(x)))


class SetGeneration:
    """Set generation: add one unused element per step until |S| are in.

    The energy of a set is the sum of its elements' energies, so the local
    term of a step is the energy of the element added: computed here, in
    Python, the way a scientist's scoring code would be.
    """

    name = "set_generation"

    def __init__(self, universe=30, set_size=20, levels=SMALL_LEVELS):
        self.universe, self.set_size, self.levels = universe, set_size, list(levels)
        self.state_dim = self.forward_actions = self.backward_actions = universe
        self.max_len = set_size

    def params(self):
        # Exactly the learner's description (compared as strings).
        return [
            f"universe={self.universe}",
            f"set_size={self.set_size}",
            "levels=" + ",".join(rust_float(l) for l in self.levels),
        ]

    def initial(self, n):
        return np.zeros((n, self.universe), dtype=np.float32)

    def forward_mask(self, states):
        open_ = states.sum(axis=1, keepdims=True) < self.set_size
        return (states == 0) & open_

    def is_terminal(self, states):
        return states.sum(axis=1) >= self.set_size

    def step_energy(self, states, actions):
        """E(s -> s') of adding element `actions[i]` to `states[i]`."""
        return np.array([self.levels[a % len(self.levels)] for a in actions], dtype=np.float32)

    def step(self, states, rows, actions):
        """Adds element `actions[i]` to the set in row `rows[i]`, in place."""
        states[rows, actions] = 1.0


def set_task(spec):
    """argparse type of --task: the learner's set task as it writes it
    (its startup log's `task=`, a refusal's `learner trains ...`), such as
    `set_generation(universe=30, set_size=20, levels=-1.0,0.5)`."""
    def refuse(why):
        return argparse.ArgumentTypeError(
            f"{spec!r}: {why}; give the learner's task as its log's task= writes it, "
            f"set_generation(universe=U, set_size=S, levels=L1,L2,...)")
    match = re.fullmatch(r"\s*set_generation\((.*)\)\s*", spec, re.S)
    if not match:
        raise refuse("this example implements the set_generation task only")
    params = {}
    for part in match.group(1).split(", "):
        key, equals, value = part.partition("=")
        if not equals or key in params:
            raise refuse(f"{part!r} is not one key=value of its own")
        params[key] = value
    if set(params) != {"universe", "set_size", "levels"}:
        raise refuse(f"it has {', '.join(sorted(params))}, not universe, set_size and levels")
    try:
        universe, set_size = int(params["universe"]), int(params["set_size"])
        levels = [float(level) for level in params["levels"].split(",")]
    except ValueError as error:
        raise refuse(f"{error}") from None
    if not 1 <= set_size <= universe or not all(math.isfinite(level) for level in levels):
        raise refuse("set_size must be 1 to universe, and every level finite")
    return SetGeneration(universe, set_size, levels)


def read_safetensors(buffer):
    """safetensors bytes -> ({name: float32 array}, metadata); F32 and BF16
    tensors."""
    (header_len,) = struct.unpack("<Q", buffer[:8])
    header = json.loads(buffer[8:8 + header_len])
    data = memoryview(buffer)[8 + header_len:]
    arrays = {}
    metadata = header.get("__metadata__") or {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[start:end]
        if info["dtype"] == "F32":
            array = np.frombuffer(raw, dtype="<f4")
        elif info["dtype"] == "BF16":
            array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(f"tensor {name}: dtype {info['dtype']} is not F32 or BF16")
        arrays[name] = array.reshape(info["shape"]).astype(np.float32)
    return arrays, metadata


def model_spec(task, hidden):
    """The network's description, as the learner writes it into the
    weights' metadata (`model`)."""
    return (f"mlp(input={task.state_dim}, hidden=[{', '.join(map(str, hidden))}], "
            f"pf={task.forward_actions}, pb={task.backward_actions})")


def check_metadata(metadata, task, hidden, version):
    """Raises ValueError unless the weights' metadata names this actor's
    task and network and the grant's version (a key left out passes), as
    the Rust actor does: the handshake compared task and network, but a
    balancer can send the session to another learner, and shapes alone let
    a same-sized network of another task through."""
    ours = {"task": f"{task.name}({', '.join(task.params())})",
            "model": model_spec(task, hidden), "version": str(version)}
    for key, value in ours.items():
        theirs = metadata.get(key)
        if theirs is not None and theirs != value:
            if key == "version":
                raise ValueError(f"their metadata says version {theirs}, "
                                 f"the grant that brought them {value}")
            raise ValueError(f"they are for {key} {theirs}, not this actor's {value}")


def weight_shapes(task, hidden):
    """{tensor name: shape} of the network of `task` and `hidden`, as the
    learner names its tensors."""
    widths = [task.state_dim, *hidden]
    outputs = task.forward_actions + task.backward_actions + 1
    shapes = {}
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        shapes[f"hidden{i}.weight"], shapes[f"hidden{i}.bias"] = (n_out, n_in), (n_out,)
    shapes["heads.weight"], shapes["heads.bias"] = (outputs, widths[-1]), (outputs,)
    return shapes


def check_weights(arrays, task, hidden):
    """Raises ValueError, naming the tensor, unless `arrays` are exactly the
    network of `task` and `hidden` with finite values (as the Rust actor
    refuses weights that would sample garbage)."""
    expected = weight_shapes(task, hidden)
    if set(arrays) != set(expected):
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        raise ValueError(f"weights do not fit --hidden {','.join(map(str, hidden))}: "
                         f"missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise ValueError(f"tensor {name} has shape {list(arrays[name].shape)}, "
                             f"the network's is {list(shape)}")
        if not np.isfinite(arrays[name]).all():
            raise ValueError(f"tensor {name} holds a non-finite value")


class Policy:
    """The learner's network: Linear + leaky ReLU per hidden layer, then one
    output layer holding the forward logits, backward logits and log-flow."""

    def __init__(self, arrays, hidden):
        self.layers = [(arrays[f"hidden{i}.weight"], arrays[f"hidden{i}.bias"]) for i in range(len(hidden))]
        self.heads = (arrays["heads.weight"], arrays["heads.bias"])

    def forward_logits(self, x, forward_actions):
        for w, b in self.layers:
            x = x @ w.T + b
            x = np.where(x > 0, x, 0.01 * x)
        w, b = self.heads
        return (x @ w.T + b)[:, :forward_actions]


def rollout(task, policy, envs, epsilon, truncate_fraction, rng, abandon=lambda: False):
    """One chunk: `envs` trajectories; a `truncate_fraction` of them cut at a
    uniform prefix length of 1 to |S| - 1 steps (incomplete trajectories
    train FL objectives). None if `abandon()` turns true before a step (its
    session is over: the chunk could not be sent)."""
    states = task.initial(envs)
    actions = [[] for _ in range(envs)]
    energies = [[] for _ in range(envs)]
    cut = np.full(envs, task.max_len + 1)
    if truncate_fraction > 0 and task.max_len >= 2:  # (nothing to cut from one step)
        cut = np.where(rng.random(envs) < truncate_fraction,
                       rng.integers(1, task.max_len, envs), cut)
    for t in range(task.max_len):
        if abandon():
            return None
        live = np.flatnonzero(~task.is_terminal(states) & (cut > t))
        if live.size == 0:
            break
        mask = task.forward_mask(states[live])
        # A state that is not terminal yet has no valid action is a bug
        # of the task's code: its trajectory ends there, as the Rust actor
        # ends it, rather than draw an action the mask does not allow.
        # (The learner takes it as a truncated trajectory, or refuses it
        # if it has no action at all.)
        stuck = ~mask.any(axis=1)
        live, mask = live[~stuck], mask[~stuck]
        if live.size == 0:
            break
        raw = policy.forward_logits(states[live], task.forward_actions).astype(np.float64)
        # Weights that give NaN or infinite logits on a legal action (a
        # diverged model) would make every cumulative sum NaN and pick
        # action 0, legal or not, or starve an action of -inf: such rows
        # are sampled uniformly over the legal actions instead, as the
        # Rust actor samples them.
        broken = ~np.where(mask, np.isfinite(raw), True).all(axis=1)
        logits = np.where(mask, raw, -np.inf)
        with np.errstate(invalid="ignore"):
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
        uniform = mask / mask.sum(axis=1, keepdims=True)
        broken |= ~np.isfinite(probs).all(axis=1)
        probs[broken] = uniform[broken]
        probs = (1 - epsilon) * probs + epsilon * uniform
        # Inverse CDF with u in (0, 1]: an action of probability 0 (masked)
        # is never the first whose cumulative sum reaches u.
        cdf = np.cumsum(probs, axis=1)
        u = (1.0 - rng.random(live.size))[:, None] * cdf[:, -1:]
        chosen = np.minimum((cdf < u).sum(axis=1), task.forward_actions - 1)
        step_energies = task.step_energy(states[live], chosen)
        task.step(states, live, chosen)
        for i, a, e in zip(live, chosen, step_energies):
            actions[i].append(int(a))
            energies[i].append(float(e))
    return actions, energies


# Refusals that no retry can change (as the Rust actor decides); anything
# else (the learner restarting, a broken connection, all places taken) is
# retried with backoff. The learner marks other final refusals with a
# trailer.
FINAL_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNIMPLEMENTED,
}
FINAL_REFUSAL_HEADER = "flgfn-final"


class Refused(RuntimeError):
    """The learner refused this actor for good (wrong task, bad token, ...)."""


class GaveUp(RuntimeError):
    """--reconnect-attempts failed connections in a row."""


class Unreachable(grpc.RpcError):
    """The learner's address takes no connection (refused: nothing
    listening there; no route; a name that does not resolve), found at
    once rather than after connect_timeout_s, as the Rust actor does:
    a failed attempt like any other."""

    def __init__(self, why):
        super().__init__(why)
        self.why = why

    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return self.why

    def trailing_metadata(self):
        return ()


class NoAnswer(grpc.RpcError):
    """No answer to a session's opening within connect_timeout_s: what a
    Handshake call's deadline says in that case."""

    def code(self):
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self):
        return "Deadline Exceeded"

    def trailing_metadata(self):
        return ()


# What `Actor.session` returns when the actor was told to stop.
STOPPED = "stopped"


class StopFlag:
    """A stop request, set from a signal handler: a plain attribute, as a
    handler must not take a lock (threading.Event's `set` does, and the
    main thread holds it while it enters or leaves `wait`: a signal then
    would hang the actor)."""

    def __init__(self):
        self._set = False

    def set(self):
        self._set = True

    def is_set(self):
        return self._set

    def wait(self, timeout):
        """Sleeps `timeout` seconds, or less once set; whether set."""
        deadline = time.monotonic() + timeout
        while not self._set and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))
        return self._set

# Exit status of an actor that gave up reaching the learner (EX_TEMPFAIL),
# as the Rust actor's: a job system can retry it, where 1 is a fault no
# retry fixes.
EXIT_LEARNER_UNREACHABLE = 75

# How long a stopping actor waits for the learner to take its last chunks
# (as the Rust actor).
LEAVE_TIMEOUT_S = 10.0

# A learner address as gRPC takes it: host:port, an IPv6 host in brackets.
HOST_PORT = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]+):([0-9]+)")

# How long the TLS probe (answers_as_tls) waits to connect, and for the
# alert: a TLS server answers within a round trip, while a plain-text
# learner waits for the rest of a preface that never comes.
TLS_PROBE_TIMEOUT_S = 2.0


def socket_address(learner):
    """`learner` (host:port, an IPv6 host in brackets) as a socket takes
    it, (host, port); None where it is not of that form."""
    address = HOST_PORT.fullmatch(learner)
    return (address.group(1).strip("[]"), int(address.group(2))) if address else None


def beyond_loopback(learner):
    """Whether `learner` (host:port) may be another machine: anything but
    localhost or a loopback address."""
    address = socket_address(learner)
    if not address:
        return True
    # As the Rust actor reckons it: any case, a trailing dot, and an IPv4
    # loopback written as IPv6 ([::ffff:127.0.0.1]).
    host = address[0].removesuffix(".")
    if host.lower() == "localhost":
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return True
    ip = getattr(ip, "ipv4_mapped", None) or ip
    return not ip.is_loopback


def answers_as_tls(learner, timeout):
    """Whether the server at `learner` (host:port) answers a few bytes of
    plain text as a TLS server does: with an alert record (content type 21,
    version 3.x). Asked, as the Rust actor does, once an attempt got no
    answer, to name the fix rather than retry for ever. The bytes are one
    TLS record header, so the server reads all of them and its close
    cannot reset the connection under its alert."""
    address = socket_address(learner)
    if not address:
        return False
    try:
        with socket.create_connection(address, timeout=timeout) as probe:
            probe.sendall(b"PRI *")
            head = b""
            while len(head) < 2:
                more = probe.recv(2 - len(head))
                if not more:
                    return False
                head += more
            return head == b"\x15\x03"
    except (OSError, ValueError):
        return False


# What makes gRPC connect through a proxy.
PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy")


def connection_refused(learner, timeout):
    """Why a TCP connection to `learner` (host:port) fails at once, or
    None: it opened, or took longer than `timeout` (the gRPC call then
    waits for it as usual). Asked before each session, so that a learner
    that is not there is retried with backoff, not waited for. Not asked
    where gRPC would go through a proxy (the learner may be reachable
    only through it)."""
    address = socket_address(learner)
    if not address or any(os.environ.get(proxy) for proxy in PROXY_VARIABLES):
        return None
    host = address[0]
    try:
        with socket.create_connection(address, timeout=timeout):
            return None
    except (TimeoutError, socket.timeout):
        # (socket.timeout is not TimeoutError before Python 3.10.)
        return None
    except socket.gaierror as error:
        return f"cannot resolve {host}: {error.strerror}"
    except (OSError, ValueError, OverflowError) as error:
        return f"cannot connect to {learner}: {getattr(error, 'strerror', None) or error}"


def http_status_mapped(error):
    """Whether gRPC made `error`'s code from an HTTP status (a proxy or
    ingress answered, not a gRPC service: a 404 reads as UNIMPLEMENTED)."""
    return "http2 header with status" in (error.details() or "")


def is_final(error):
    trailers = error.trailing_metadata() or ()
    if any(key == FINAL_REFUSAL_HEADER for key, _ in trailers):
        return True
    # A proxy's bare HTTP 404, its route to the learner perhaps not there
    # yet: retried, as the Rust actor does. (A gRPC UNIMPLEMENTED of the
    # proxy's own, as Envoy answers, stays final.)
    if error.code() == grpc.StatusCode.UNIMPLEMENTED and http_status_mapped(error):
        return False
    if error.code() in FINAL_CODES:
        return True
    # A message over this side's size limit: gRPC says RESOURCE_EXHAUSTED,
    # as the learner does for "all places taken", but no retry shrinks it.
    return (error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and "larger than max" in (error.details() or ""))


class Actor:
    """What lives across sessions: the connection, the task, the counts.

    Chunks are numbered across reconnects (`sequence`), so the learner can
    count chunks lost when a connection broke.
    """

    def __init__(self, task, learner, hidden, envs, epsilon, truncate_fraction, name,
                 token, seed, connect_timeout_s, keepalive_s, reconnect_initial_s,
                 reconnect_max_s, stop):
        self.pb, pb_grpc = load_protocol()
        # Set on a stop request: no rollout starts after it.
        self.stop = stop
        self.task, self.hidden, self.envs, self.name = task, hidden, envs, name
        self.epsilon, self.truncate_fraction = epsilon, truncate_fraction
        self.connect_timeout_s = connect_timeout_s
        self.learner = learner
        self.rng = np.random.default_rng(seed)
        # No limits of this side's own (-1): the learner's apply, as for
        # the Rust actor. It sends no weights over its max_message_bytes,
        # and refuses (OUT_OF_RANGE) a chunk over what it decodes.
        options = [("grpc.max_receive_message_length", -1),
                   ("grpc.max_send_message_length", -1),
                   # Pings find a learner that vanished without closing the
                   # connection (a dead host, a cut network), also while
                   # no data moves (gRPC stops after 2 such pings unless
                   # told otherwise).
                   ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
                   ("grpc.keepalive_timeout_ms", int(2 * keepalive_s * 1000)),
                   ("grpc.keepalive_permit_without_calls", 1),
                   ("grpc.http2.max_pings_without_data", 0),
                   # The channel reconnects by itself; at our pace, not
                   # gRPC's (1 s growing to 120 s), so that a learner back
                   # after an outage is found within reconnect_max_s.
                   ("grpc.initial_reconnect_backoff_ms", int(reconnect_initial_s * 1000)),
                   ("grpc.max_reconnect_backoff_ms", int(reconnect_max_s * 1000)),
                   # Despite its name, gRPC core gives each connection
                   # attempt at least this long: the connect timeout, not
                   # the backoff (set to the backoff, a learner 150 ms
                   # away, or slow to accept, would see attempts cut short).
                   ("grpc.min_reconnect_backoff_ms", int(connect_timeout_s * 1000))]
        self.channel = grpc.insecure_channel(learner, options=options)
        self.stub = pb_grpc.LearnerStub(self.channel)
        self.auth = [("authorization", f"Bearer {token}")] if token else []
        self.counts = {"chunks": 0, "transitions": 0, "versions": 0, "sessions": 0}
        # Whether the current session served: the learner granted after
        # one of its chunks was handed over (a new outage, then; a chunk
        # handed over and then cut off with the session, every session,
        # is not); whether it handed over a chunk; and whether it got a
        # grant at all.
        self.served = self.chunk_sent = self.granted = False
        # Whether the current session ended as the learner stopped to be
        # started again (SIGUSR1): a reconnect, not an outage.
        self.restarting = False
        # Whether the learner's dropping of truncated trajectories was said
        # (once per process, as flgfn-actor says it, not every reconnect).
        self.said_drops_truncated = False
        # Whether sessions open in one call, the handshake in the Session's
        # headers; cleared for good by a learner that predates that.
        self.one_call = True

    def open_in_one_call(self, handshake, chunks):
        """Opens the Session with `handshake` in its headers: (reply,
        grants); None where the learner predates that (it asks for an
        earlier handshake's id: the two calls follow, now and on every
        reconnect); STOPPED once told to stop."""
        grants = self.stub.Session(chunks, metadata=self.auth + [
            ("flgfn-handshake-bin", handshake.SerializeToString())],
            # (A learner still starting: wait for it, a while.)
            wait_for_ready=True)
        # The response headers, waited for in short steps: a stop request
        # ends the wait.
        headers = queue.Queue()
        threading.Thread(target=lambda: headers.put(grants.initial_metadata() or ()),
                         daemon=True).start()
        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            try:
                metadata = headers.get(timeout=0.1)
                break
            except queue.Empty:
                if self.stop.is_set():
                    grants.cancel()
                    return STOPPED
                if time.monotonic() > deadline:
                    grants.cancel()
                    raise NoAnswer()
        reply = next((value for key, value in metadata
                      if key == "flgfn-handshake-reply-bin"), None)
        if reply is None:
            # A refusal comes without it, its status ending the call; a
            # call that goes on without it is not a flgfn learner's.
            while not grants.done() and not self.stop.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
            if grants.done():
                try:
                    next(grants)
                except grpc.RpcError as error:
                    if (error.code() == grpc.StatusCode.INVALID_ARGUMENT
                            and (error.details() or "").startswith("`flgfn-actor-id` is missing")):
                        self.one_call = False
                        return None
                    raise
                except StopIteration:
                    pass
            grants.cancel()
            if self.stop.is_set():
                return STOPPED
            raise Refused("the learner opened the session without its handshake reply "
                          "(flgfn-handshake-reply-bin): is --learner a flgfn learner?")
        return self.pb.HandshakeReply.FromString(reply), grants

    def shake_hands(self, handshake):
        """A Handshake call: its reply, or STOPPED once told to stop."""
        call = self.stub.Handshake.future(
            handshake, metadata=self.auth,
            # (A learner still starting, or loading a checkpoint: wait for
            # it, a while; then this attempt counts as failed.)
            wait_for_ready=True, timeout=self.connect_timeout_s)
        # Waited for in short steps: a stop request ends the wait.
        while True:
            try:
                return call.result(timeout=0.1)
            except grpc.FutureTimeoutError:
                if self.stop.is_set():
                    call.cancel()
                    return STOPPED

    def session(self):
        """One session: handshake (in the Session's headers, or a call of
        its own first), then grants in and chunks out. Returns
        True when the learner says training is over, False when it closed
        the stream without saying so or to reconnect (`self.restarting`
        then), STOPPED once told to stop (the chunks rolled out handed
        over); a broken connection raises grpc.RpcError. Sets `self.served`
        once a grant comes after a chunk was handed over."""
        pb, task = self.pb, self.task
        self.served = self.chunk_sent = self.granted = self.restarting = False
        model = pb.ModelSpec(input_dim=task.state_dim, hidden=list(self.hidden),
                             forward_actions=task.forward_actions,
                             backward_actions=task.backward_actions)
        handshake = pb.HandshakeRequest(
            protocol_version=PROTOCOL_VERSION, actor_name=self.name,
            task=pb.TaskSpec(name=task.name, params=task.params()), model=model,
            trajectories_per_chunk=self.envs)

        def upload():
            """Chunks to send, and what a call sends them from (a None put
            in ends it, and the thread gRPC runs it on)."""
            outbox = queue.Queue()

            def chunks():
                while (chunk := outbox.get()) is not None:
                    yield chunk

            return outbox, chunks()

        if why := connection_refused(self.learner,
                                     min(self.connect_timeout_s, TLS_PROBE_TIMEOUT_S)):
            raise Unreachable(why)
        outbox, chunks = upload()
        opened = None
        if self.one_call and handshake.ByteSize() <= MAX_HANDSHAKE_HEADER_BYTES:
            try:
                opened = self.open_in_one_call(handshake, chunks)
            except BaseException:
                outbox.put(None)
                raise
        if opened is None or opened is STOPPED:
            # That call, if made, is over: its sender must not take a chunk.
            outbox.put(None)
            if opened is STOPPED:
                return STOPPED
            outbox, chunks = upload()
            reply, grants = self.shake_hands(handshake), None
            if reply is STOPPED:
                return STOPPED
        else:
            reply, grants = opened
        # A learner whose objective (TB) drops truncated trajectories.
        if reply.drops_truncated and self.truncate_fraction > 0 and not self.said_drops_truncated:
            self.said_drops_truncated = True
            print(f"{self.name}: the learner trains on complete trajectories only "
                  f"(objective tb, or objective.drop_truncated): the truncated share of rollouts is dropped unused "
                  f"(--truncate-fraction 0 for this learner)", flush=True)
        actor_id = reply.actor_id
        self.counts["sessions"] += 1
        print(f"{self.name}: actor {actor_id} at learner version {reply.version}", flush=True)
        if grants is None:
            grants = self.stub.Session(chunks, metadata=self.auth + [
                ("flgfn-actor-id", str(actor_id)),
                ("flgfn-session-key", reply.session_key),
                ("flgfn-trajectories-per-chunk", str(self.envs))])
        # Grants are read on a thread of their own while rollouts run: a
        # grant left unread holds up the learner's next ones, and it ends a
        # session whose grants wait unread for learner.stall_timeout_s
        # (slow rollouts times a grant of many credits).
        received = queue.Queue()
        # Set once the session is over (after its last item is queued): a
        # rollout in progress is abandoned then, as its chunk could not be
        # sent.
        over = threading.Event()

        def read_grants():
            try:
                for grant in grants:
                    received.put(grant)
                    if grant.training_done or grant.learner_restarting:
                        over.set()
                received.put(None)
            except Exception as error:  # grpc.RpcError, or a cancel
                received.put(error)
            over.set()

        threading.Thread(target=read_grants, daemon=True).start()
        # Credits not yet rolled out, oldest grant first: [credits, policy,
        # version] (each credit is sampled with its grant's weights, or the
        # latest before them).
        work = collections.deque()
        policy, version = None, None

        def take_grants(wait):
            """Takes in the grants that arrived (waiting for one if `wait`).
            True or False when the session is over (see above), else None."""
            nonlocal policy, version
            while True:
                try:
                    # (Waiting in short steps: a stop request ends the wait.)
                    grant = received.get(timeout=0.2) if wait else received.get_nowait()
                except queue.Empty:
                    if wait and not self.stop.is_set():
                        continue
                    return None
                wait = False
                if grant is None:
                    return False
                if isinstance(grant, Exception):
                    raise grant
                self.granted = True
                self.served |= self.chunk_sent
                if grant.training_done:
                    return True
                if grant.learner_restarting:
                    self.restarting = True
                    return False
                if grant.HasField("weights"):
                    version = grant.weights.version
                    try:
                        arrays, metadata = read_safetensors(grant.weights.safetensors)
                        check_metadata(metadata, task, self.hidden, version)
                        check_weights(arrays, task, self.hidden)
                    except (ValueError, KeyError, TypeError, struct.error) as error:
                        raise Refused(f"the learner's weights of version {version} are not "
                                      f"usable here: {error}") from error
                    policy = Policy(arrays, self.hidden)
                    self.counts["versions"] += 1
                if grant.credits:
                    if policy is None:
                        raise Refused("the learner granted a credit before sending weights")
                    work.append([grant.credits, policy, version])

        def leave(stopping=True):
            """Closes this side of the stream and waits (a while) for the
            learner to end the session: then it has every chunk sent.
            Stopping, a refusal of those chunks is one still (raised), and
            a session that ended otherwise before the learner confirmed
            them is said, as the Rust actor does."""
            outbox.put(None)
            deadline = time.monotonic() + LEAVE_TIMEOUT_S
            unconfirmed = f"the learner did not end the session within {LEAVE_TIMEOUT_S:g} s"
            while (left := deadline - time.monotonic()) > 0:
                try:
                    grant = received.get(timeout=left)
                except queue.Empty:
                    break
                if grant is None:
                    unconfirmed = None
                    break
                if isinstance(grant, Exception):
                    if stopping and isinstance(grant, grpc.RpcError) and is_final(grant):
                        raise grant
                    unconfirmed = f"the session ended: {grant}"
                    break
            if stopping and unconfirmed and self.chunk_sent:
                print(f"{self.name}: stopping, the session ended before the learner confirmed "
                      f"the last chunks ({unconfirmed}): those on their way may not have "
                      f"arrived", flush=True)
            return STOPPED

        def over_with(ended):
            """The session's end: told that training is done (or that the
            learner restarts), the chunks still queued go out first, and the
            learner counts them (late) before it ends the session."""
            if ended or self.restarting:
                leave(stopping=False)
            return ended

        try:
            while True:
                if self.stop.is_set():
                    return leave()
                # Wait for a grant only with nothing to do.
                ended = take_grants(wait=not work)
                if ended is not None:
                    return over_with(ended)
                if not work:
                    continue
                oldest = work[0]
                oldest[0] -= 1
                _, sampler, sampled_by = oldest
                if oldest[0] == 0:
                    work.popleft()
                rolled = rollout(task, sampler, self.envs, self.epsilon,
                                 self.truncate_fraction, self.rng, abandon=over.is_set)
                if rolled is None:
                    continue  # (the session's end is queued: taken next)
                actions, energies = rolled
                # Credits that came during the rollout count as held: 0
                # tells the learner this actor has nothing to do.
                ended = take_grants(wait=False)
                if ended is not None:
                    return over_with(ended)
                outbox.put(pb.TrajectoryChunk(
                    actor_id=actor_id, policy_version=sampled_by, sequence=self.counts["chunks"],
                    trajectories=[pb.Trajectory(actions=a, energies=e)
                                  for a, e in zip(actions, energies)],
                    credits_left=sum(credits for credits, _, _ in work)))
                # A grant after it shows the session worked (see
                # `self.served`): not a grant alone (an actor whose
                # rollouts outlast the learner's stall timeout gets
                # grants, then loses each session), nor a chunk alone.
                self.chunk_sent = True
                self.counts["chunks"] += 1
                self.counts["transitions"] += sum(len(a) for a in actions)
        finally:
            outbox.put(None)
            grants.cancel()


def out_of_range(reconnect_attempts, epsilon, truncate_fraction, envs):
    """The first of these settings outside its range, as (its name, its
    value and range), or None: `run` refuses it, the command line names
    its flag. (Outside [0, 1] the exploration mixture has negative
    entries, and the sampler could pick an action the state does not
    allow.)"""
    for setting, value, within, must in (
        ("reconnect_attempts", reconnect_attempts, reconnect_attempts >= 0,
         "0 (never give up) or more"),
        ("epsilon", epsilon, 0 <= epsilon <= 1, "between 0 and 1"),
        # (1 would cut every trajectory short: none would reach a terminal
        # state, where the reward ties the flows to the target.)
        ("truncate_fraction", truncate_fraction, 0 <= truncate_fraction < 1,
         "at least 0 and below 1 (1 would leave no trajectory complete)"),
        # (A chunk's count travels as 32 bits.)
        ("envs", envs, 1 <= envs <= 2**32 - 1, "1 to 4294967295"),
    ):
        if not within:
            return setting, f"{value}: {must}"
    return None


def run(task, learner, hidden=(256, 256), envs=256, epsilon=0.05,
        truncate_fraction=0.0, name=None, token=None, seed=None,
        connect_timeout_s=10.0, keepalive_s=10.0, reconnect_initial_s=0.2,
        reconnect_max_s=5.0, reconnect_attempts=0, stop=None):
    """Trains the learner until it says training is over, or until `stop`
    (a StopFlag, or a threading.Event) is set; returns counts.

    Reconnects with exponential backoff (with jitter, so a fleet that lost
    its learner at once does not come back in lockstep) when the learner
    goes away; gives up after `reconnect_attempts` failures in a row
    (0: never), each attempt waiting at most `connect_timeout_s` for the
    learner, raising `GaveUp`. A final refusal raises `Refused`. Once
    `stop` is set no rollout starts: the one in progress is finished and
    its chunk sent, and the actor leaves the session.
    """
    if bad := out_of_range(reconnect_attempts, epsilon, truncate_fraction, envs):
        setting, what = bad
        raise ValueError(f"{setting} is {what}")
    # An address as --learner takes it (http://host:port included).
    target, note = learner_target(learner)
    token = (token or "").strip() or None  # as the Rust actor reads it
    if token is not None and (why := token_mistake(token)):
        raise ValueError(f"token: {why}")
    stop = stop or StopFlag()
    # Distinct per process: the learner counts lost chunks per name.
    name = name or f"{socket.gethostname()}/python-actor-{os.getpid()}"
    if note:
        print(f"{name}: {learner}: {note}", flush=True)
    learner = target
    actor = Actor(task, learner, hidden, envs, epsilon, truncate_fraction, name, token, seed,
                  connect_timeout_s, keepalive_s, reconnect_initial_s, reconnect_max_s, stop)
    print(f"{name}: connecting to {learner}", flush=True)
    if token and beyond_loopback(learner):
        print(f"{name}: warning: the token travels in clear to a learner beyond loopback "
              f"(this example speaks plain text only): fine on a private network; elsewhere "
              f"use the Rust actor with https:// and tls.ca_file", flush=True)
    jitter = random.Random()
    backoff, failures = reconnect_initial_s, 0
    try:
        while not stop.is_set():
            try:
                if actor.session():
                    break
                message = ("the learner stops for a restart" if actor.restarting
                           else "the learner closed the session")
            except grpc.RpcError as error:
                if is_final(error):
                    hint = (" (is --learner the address of a flgfn learner?)"
                            if error.code() == grpc.StatusCode.UNIMPLEMENTED else "")
                    if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                        hint = (" (this actor sent a token: is it the learner's?)" if token
                                else " (this actor sent none: set FLGFN_TOKEN)")
                    # The learner names the Rust actor's settings.
                    for setting, flag in (("actor.envs", "--envs"),
                                          ("actor.truncate_fraction", "--truncate-fraction"),
                                          ("model.hidden", "--hidden")):
                        if setting in (error.details() or ""):
                            hint += f" ({setting} is {flag} here)"
                    if "task mismatch" in (error.details() or ""):
                        hint += (" (the task is --task here: give it the learner's, "
                                 "set_generation(...) as written above)")
                    raise Refused(f"the learner refused this actor: "
                                  f"{error.code().name}: {error.details()}{hint}") from error
                message = f"{error.code().name}: {error.details()}"
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    message += (" (an HTTP proxy or ingress without its route to the learner "
                                "yet? is --learner the address of a flgfn learner?)")
                # Granted, yet ended before a chunk: the stall timeout (not
                # an unreachable learner, whose handshake times out).
                if (error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                        and actor.granted and not actor.served):
                    message += (" (a chunk of --envs trajectories may take longer than the "
                                "learner's stall_timeout_s: lower --envs)")
                elif error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not actor.granted:
                    # (The handshake waits for the connection: whatever
                    # went wrong with it, gRPC says only "Deadline
                    # Exceeded". A TLS learner too, which it keeps
                    # reconnecting to: the probe waits briefly, and a stop
                    # meanwhile is a stop.)
                    if (not stop.is_set()
                            and answers_as_tls(learner, min(connect_timeout_s, TLS_PROBE_TIMEOUT_S))
                            and not stop.is_set()):
                        raise Refused(f"the learner at {learner} serves TLS, and this example "
                                      f"speaks plain text only: use the Rust actor with an "
                                      f"https:// address (or grpc.secure_channel with the "
                                      f"learner's CA)") from error
                    message = (f"no answer from {learner} within {connect_timeout_s:g} s "
                               f"(nothing listening there, not a gRPC server, a TLS one, "
                               f"or a learner too busy to answer)")
            if stop.is_set():
                # Told to stop meanwhile: not a failed attempt.
                break
            if actor.served or actor.restarting:
                # The connection worked: this is a new outage (or a planned
                # restart, which is no outage at all).
                backoff, failures = reconnect_initial_s, 0
            else:
                failures += 1
            if reconnect_attempts and failures >= reconnect_attempts:
                raise GaveUp(f"gave up after {failures} attempt{'s' if failures != 1 else ''}: "
                             f"{message}")
            pause = backoff * jitter.uniform(0.5, 1.0)
            print(f"{name}: learner unavailable ({message}); reconnecting in {pause:.2f} s",
                  flush=True)
            stop.wait(pause)
            backoff = min(2 * backoff, reconnect_max_s)
    finally:
        actor.channel.close()
    counts = actor.counts
    # ('training done': the learner ended the run, at its last step or
    # stopped by its operator.)
    print(f"{name}: {'stopped' if stop.is_set() else 'training done'}: sent {counts['chunks']} chunks, "
          f"{counts['transitions']} transitions, {counts['versions']} weight versions, "
          f"{counts['sessions']} sessions", flush=True)
    return counts


def widths(text):
    """`--hidden`: layer widths, positive integers joined by commas."""
    try:
        hidden = tuple(int(width) for width in text.split(",") if width.strip())
    except ValueError:
        hidden = ()
    if not hidden or min(hidden) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give positive layer widths joined by commas, e.g. 256,256")
    return hidden


def learner_target(learner):
    """The gRPC target of a learner address as the Rust actor takes one
    (host:port, or http://host:port), or a gRPC target of its own form
    (dns:///host:port, unix:path, ...); and what was dropped from it, if
    anything, to say. ValueError saying what is wrong otherwise."""
    if learner.startswith("https://"):
        raise ValueError("this example speaks plain text only (no TLS)")
    if re.match(r"(dns|unix|unix-abstract|ipv4|ipv6|vsock):", learner):
        return learner, None
    # gRPC takes host:port: a path is dropped (as the Rust actor does, with
    # a warning), and a missing port is refused (gRPC would take 443); an
    # IPv6 host goes in brackets ([::1]:50051).
    address, _, path = learner.removeprefix("http://").partition("/")
    parsed = socket_address(address)
    if not parsed or not 1 <= parsed[1] <= 65535:
        raise ValueError(f"{learner}: give host:port, a port from 1 to 65535 "
                         f"(an IPv6 address in brackets: [::1]:50051)")
    note = f"the path /{path} is ignored (a learner serves at the root)" \
        if path.strip("/") else None
    return address, note


def token_mistake(token):
    """Why FLGFN_TOKEN cannot be the learner's token as written, as the
    Rust actor says it (too short, characters an HTTP/2 header cannot
    carry, a .env line, or shell quotes that became part of it); None when
    it may be."""
    if len(token) < 16:
        return f"the token has {len(token)} characters; use at least 16"
    if not all("!" <= c <= "~" for c in token):
        return "the token must be printable ASCII without spaces"
    if token.startswith("FLGFN_TOKEN="):
        return "the token starts with `FLGFN_TOKEN=`: give the token alone"
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "\"'":
        return "the token is in quotes, which would be part of it: remove them"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--learner", default="127.0.0.1:50051",
                        help="host:port of the learner, or http://host:port as the Rust actor takes it")
    parser.add_argument("--hidden", default="256,256", type=widths,
                        help="hidden layer widths, as the learner's model.hidden")
    parser.add_argument("--task", type=set_task, default=None,
                        help="the learner's task, as its log's task= writes it (default: the "
                             "small set task, set_generation(universe=30, set_size=20, ...))")
    parser.add_argument("--envs", type=int, default=256, help="trajectories per chunk")
    parser.add_argument("--epsilon", type=float, default=0.05, help="uniform exploration mixed into the policy")
    parser.add_argument("--truncate-fraction", type=float, default=0.0, help="fraction of trajectories cut short")
    # Host and process: the learner counts lost chunks per name.
    parser.add_argument("--name", default=f"{socket.gethostname()}/python-actor-{os.getpid()}",
                        help="this actor's name in the learner's logs and counts: distinct per actor")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the action draws; None draws fresh entropy")
    parser.add_argument("--reconnect-attempts", type=int, default=0,
                        help="failed connections in a row before giving up, with exit "
                             f"status {EXIT_LEARNER_UNREACHABLE} (0: never)")
    parser.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                        help="seconds each attempt waits for the learner to answer (a refused connection fails at once)")
    args = parser.parse_args()
    if bad := out_of_range(args.reconnect_attempts, args.epsilon, args.truncate_fraction,
                           args.envs):
        setting, what = bad
        parser.error(f"--{setting.replace('_', '-')}: {what}")
    if not 0 < args.connect_timeout <= 86400:
        parser.error(f"--connect-timeout: {args.connect_timeout}: more than 0, at most a day (86400)")
    # As flgfn-actor's: the learner counts lost chunks by name, so a blank
    # one (an unset variable) would be every such actor's, and one with
    # control characters, which the learner shows as ?, another's.
    if not args.name.strip():
        parser.error("--name: a name must not be blank (leave it out for host/pid)")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in args.name) \
            or len(args.name.encode()) > 1024:
        parser.error("--name: a name must hold no control characters, and at most 1024 bytes")
    learner = args.learner
    try:
        address, note = learner_target(learner)
    except ValueError as error:
        parser.error(f"--learner: {error}")
    if note:
        print(f"flgfn_actor: --learner {learner}: {note}", file=sys.stderr, flush=True)
    hidden = args.hidden
    # Trimmed, and unset when blank, as the Rust actor reads it: a token
    # from a file or a Kubernetes Secret often ends in a newline.
    token = (os.environ.get("FLGFN_TOKEN") or "").strip() or None
    if token is not None and (why := token_mistake(token)):
        parser.error(f"FLGFN_TOKEN: {why}")
    # A stop request (SIGTERM from compose, Kubernetes or Slurm; Ctrl-C)
    # finishes the rollout in progress and hands its chunk over; a second
    # one, 0.2 s or more later (some job systems send one request twice at
    # once), ends the actor at once, with status 130.
    stop, stop_at = StopFlag(), []

    def on_stop(signum, _frame):
        if not stop_at:
            stop_at.append(time.monotonic())
            print(f"flgfn_actor: {signal.Signals(signum).name}: stopping after the rollout in "
                  f"progress (again to stop at once)", file=sys.stderr, flush=True)
            stop.set()
        elif time.monotonic() - stop_at[0] >= 0.2:
            os._exit(130)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    try:
        run(args.task or SetGeneration(), address, hidden=hidden, envs=args.envs, epsilon=args.epsilon,
            truncate_fraction=args.truncate_fraction, name=args.name,
            token=token, seed=args.seed,
            connect_timeout_s=args.connect_timeout,
            reconnect_attempts=args.reconnect_attempts, stop=stop)
    except Refused as error:
        # Said in full: a traceback would only bury it.
        sys.exit(f"flgfn_actor: {error}")
    except GaveUp as error:
        print(f"flgfn_actor: {error}", file=sys.stderr, flush=True)
        sys.exit(EXIT_LEARNER_UNREACHABLE)


if __name__ == "__main__":
    main()
