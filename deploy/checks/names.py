"""Check: the names the deployment files use are ones the binaries accept.

Every container of the Kubernetes manifests and the compose file is run
as `flgfn-<learner|actor> <its args> --print-config` with its FLGFN_
environment (the job file it mounts put in place of the mount): an unknown
flag, section or key fails, and each FLGFN_<SECTION>__<KEY> must show up
with its value in the printed configuration. Other FLGFN_ names must be
ones the binary reads (found among its strings). Ports must agree between
the learner's listen address, container ports, probes, services, health
checks and the actors' learner URLs. The sbatch script's flags must be in
each binary's --help.

    python names.py BINARY_DIR
"""

import glob
import os
import re
import subprocess
import sys
import tomllib
from urllib.parse import urlparse

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = sys.argv[1]
TOKEN = "names-check-token-0123456789"
MOUNTED_JOB = "/etc/flgfn/config.toml"
failures = []
checked = []


def fail(where, message):
    failures.append(f"{where}: {message}")


def binary_for(image):
    for name in ("learner", "actor"):
        if image.split("/")[-1].startswith(f"flgfn-{name}"):
            return name
    raise SystemExit(f"names: no flgfn binary for image {image}")


def strings_of(name):
    with open(os.path.join(BIN, f"flgfn-{name}"), "rb") as f:
        return f.read()


def project_variables():
    """Every FLGFN_ name the project's Rust sources spell out."""
    names = set()
    for path in glob.glob(os.path.join(ROOT, "*", "src", "**", "*.rs"), recursive=True):
        with open(path, encoding="utf-8") as f:
            names.update(re.findall(r"FLGFN_[A-Z0-9_]*[A-Z0-9]", f.read()))
    return names


PROJECT_VARIABLES = project_variables()


def reads(binary, key):
    """Whether the binary holds `key` as a name of its own: some occurrence
    that is not the start of a longer name of the project's (FLGFN_LOG is
    only part of FLGFN_LOG_FORMAT, and FLGFN_HEALTH of FLGFN_HEALTH_ADDRESS),
    or of the first 16 bytes of one, which is what a comparison compiles to
    (FLGFN_RESUME_CHA, whatever byte follows it). Anything else may follow
    a name directly: the binary packs its strings without separators, one
    that starts with `_` included."""
    longer = [name.encode() for name in PROJECT_VARIABLES if name.startswith(key + "_")]
    key = key.encode()
    # (At least the key and its `_`: a key of 16 bytes or more is the
    # start of every longer name's first 16.)
    starts = [name[:max(len(key) + 1, min(len(name), 16))] for name in longer]
    at = binary.find(key)
    while at >= 0:
        if not any(binary.startswith(start, at) for start in starts):
            return True
        at = binary.find(key, at + 1)
    return False


def compose_value(value):
    """${VAR:-default} -> default, ${VAR:?message} -> a stand-in token."""
    value = str(value)
    value = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", TOKEN, value)


def lookup(config, section, key):
    table = config.get(section.lower(), {})
    return table.get(key.lower(), None) if isinstance(table, dict) else None


def same(printed, given):
    if isinstance(printed, bool):
        return str(printed).lower() == given.lower()
    if isinstance(printed, (int, float)):
        try:
            return float(printed) == float(given)
        except ValueError:
            return False
    return str(printed) == given


def check_container(where, name, env, args, job):
    args = [job if a == MOUNTED_JOB else a for a in args]
    flgfn_env = {k: v for k, v in env.items() if k.startswith("FLGFN_")}
    run_env = {"PATH": "/usr/bin:/bin", **flgfn_env}
    result = subprocess.run(
        [os.path.join(BIN, f"flgfn-{name}"), *args, "--print-config"],
        env=run_env, capture_output=True, text=True,
    )
    if result.returncode != 0:
        fail(where, f"flgfn-{name} refuses it: {result.stderr.strip()}")
        return None
    config = tomllib.loads(result.stdout)
    binary = strings_of(name)
    for key, value in flgfn_env.items():
        if "__" in key:
            section, field = key[len("FLGFN_"):].split("__", 1)
            printed = lookup(config, section, field)
            if printed is None or not same(printed, value):
                fail(where, f"{key}={value} shows as {printed!r} in the printed configuration")
        elif not reads(binary, key):
            fail(where, f"flgfn-{name} never reads {key}")
    checked.append(where)
    return config


def port_of(address):
    return int(address.rsplit(":", 1)[1])


def url_port(url):
    return urlparse(url).port


def kubernetes():
    job = os.path.join(ROOT, "deploy/k8s/base/config.toml")
    documents = []
    for path in sorted(glob.glob(os.path.join(ROOT, "deploy/k8s/base/*.yaml"))):
        if not path.endswith("kustomization.yaml"):
            documents += [d for d in yaml.safe_load_all(open(path)) if d]
    services = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Service"}
    listen_port = None
    # (None when the learner was refused above or has no Service: each
    # actor then fails naming that, after the reasons already found.)
    learner_service = None
    actor_urls = []
    for d in documents:
        if d["kind"] not in ("StatefulSet", "Deployment"):
            continue
        for c in d["spec"]["template"]["spec"]["containers"]:
            where = f"deploy/k8s/base {d['kind']}/{d['metadata']['name']}"
            env = {}
            for e in c.get("env", []):
                env[e["name"]] = e.get("value", TOKEN if "valueFrom" in e else "")
            name = binary_for(c["image"])
            config = check_container(where, name, env, c.get("args", []), job)
            if config is None:
                continue
            if name == "learner":
                listen_port = port_of(config["learner"]["listen"])
                ports = [p["containerPort"] for p in c.get("ports", [])]
                if ports != [listen_port]:
                    fail(where, f"container ports {ports}, learner listens on {listen_port}")
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    port = c.get(probe, {}).get("grpc", {}).get("port")
                    if port != listen_port:
                        fail(where, f"{probe} asks port {port}, learner listens on {listen_port}")
                service = services.get(d["spec"]["serviceName"])
                if service is None:
                    fail(where, f"no Service {d['spec']['serviceName']}")
                else:
                    for p in service["spec"]["ports"]:
                        target = p["targetPort"]
                        named = {q.get("name"): q["containerPort"] for q in c.get("ports", [])}
                        target = named.get(target, target)
                        if target != listen_port:
                            fail(where, f"Service targets {p['targetPort']}, learner listens on {listen_port}")
                        learner_service = (service["metadata"]["name"], p["port"])
            else:
                actor_urls.append((where, config["actor"]["learner"]))
    for where, url in actor_urls:
        host, port = urlparse(url).hostname, url_port(url)
        if (host, port) != learner_service:
            fail(where, f"actors reach {host}:{port}, the learner's Service is {learner_service}")


def kubernetes_overlays():
    job = os.path.join(ROOT, "deploy/k8s/base/config.toml")
    for path in glob.glob(os.path.join(ROOT, "deploy/k8s/overlays/*/*.yaml")):
        if path.endswith("kustomization.yaml"):
            continue
        # An overlay with a job file of its own (the job overlay) runs
        # its containers with it.
        own_job = os.path.join(os.path.dirname(path), "config.toml")
        for d in yaml.safe_load_all(open(path)):
            for c in (d or {}).get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                env = {e["name"]: e.get("value", TOKEN) for e in c.get("env", [])}
                name = "learner" if "learner" in d["metadata"]["name"] else "actor"
                check_container(os.path.relpath(path, ROOT), name, env, c.get("args", []),
                                own_job if os.path.exists(own_job) else job)


def compose(job_file):
    """The compose file with `job_file` mounted (its own, or the check's)."""
    path = os.path.join(ROOT, "deploy/docker/compose.yaml")
    job = os.path.join(ROOT, job_file)
    spec = yaml.safe_load(open(path))
    configs = {}
    for service, s in spec["services"].items():
        env = {k: compose_value(v) for k, v in (s.get("environment") or {}).items()}
        args = [compose_value(a) for a in s.get("command", [])]
        name = binary_for(compose_value(s["image"]))
        where = f"compose service {service} ({job_file})"
        configs[service] = (name, check_container(where, name, env, args, job))
    learner = [(svc, c) for svc, (n, c) in configs.items() if n == "learner" and c]
    for service, (name, config) in configs.items():
        if name == "actor" and config and learner:
            url = config["actor"]["learner"]
            want = (learner[0][0], port_of(learner[0][1]["learner"]["listen"]))
            if (urlparse(url).hostname, url_port(url)) != want:
                fail(f"compose service {service}", f"reaches {url}, the learner is {want}")


def dockerfile():
    text = open(os.path.join(ROOT, "deploy/docker/Dockerfile")).read()
    listen = re.search(r"FLGFN_LEARNER__LISTEN=(\S+)", text).group(1)
    port = port_of(listen)
    expose = [int(p) for p in re.findall(r"^EXPOSE (\d+)", text, re.M)]
    health = re.search(r"^\s+FLGFN_HEALTH_ADDRESS=(\S+)", text, re.M).group(1)
    if expose != [port] or url_port(health) != port:
        fail("deploy/docker/Dockerfile", f"listens on {port}, EXPOSE {expose}, HEALTHCHECK asks {health}")
    # (Comments may show commands with variables of the scripts.)
    instructions = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
    env = {k: v for k, v in re.findall(r"(FLGFN_[A-Z_]+)=(\S+)", instructions)}
    # The health probe's own variables are read by flgfn-health, not the learner.
    probe = {k for k in env if k.startswith("FLGFN_HEALTH_")}
    learner = {k: v for k, v in env.items() if k not in probe}
    # The image listens beyond loopback and takes its token when it runs
    # (compose's FLGFN_TOKEN, a Kubernetes Secret): a stand-in here, as
    # they give it, since a start without one is refused.
    learner.setdefault("FLGFN_TOKEN", TOKEN)
    check_container("deploy/docker/Dockerfile learner", "learner", learner, [], None)
    for key in sorted(probe):
        if not reads(strings_of("health"), key):
            fail("deploy/docker/Dockerfile", f"flgfn-health never reads {key}")
    for flag in re.findall(r'"(--[a-z-]+)"', text.split("HEALTHCHECK", 1)[1].split("\n\n")[0]):
        if flag not in help_of("health"):
            fail("deploy/docker/Dockerfile", f"flgfn-health has no {flag}")


def help_of(name):
    return subprocess.run([os.path.join(BIN, f"flgfn-{name}"), "--help"],
                          capture_output=True, text=True, check=True).stdout


def sbatch():
    path = "deploy/slurm/flgfn.sbatch"
    text = open(os.path.join(ROOT, path)).read().replace("\\\n", " ")
    for line in text.splitlines():
        for name in re.findall(r"bin/flgfn-(learner|actor|health)\"", line):
            tail = line.split(f"bin/flgfn-{name}", 1)[1]
            # A `bash -c '... "$@" --flag'` wrapper adds its flags to the
            # binary's too.
            tail += " " + " ".join(re.findall(r"bash -c\s+'([^']*)'", line))
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", tail):
                if not re.search(rf"^\s+(-\w, )?{flag}\b", help_of(name), re.M):
                    fail(path, f"flgfn-{name} has no {flag}")
            checked.append(f"{path} flgfn-{name}")
    for key in re.findall(r"export (FLGFN_[A-Z_]+)", text):
        if not any(reads(strings_of(n), key) for n in ("learner", "actor")):
            fail(path, f"no binary reads {key}")


# Each source checks something: one whose files moved, or whose layout
# the patterns above no longer match, would otherwise pass unread.
for source, check in (
    ("deploy/k8s/base", kubernetes),
    ("deploy/k8s/overlays", kubernetes_overlays),
    ("deploy/docker/compose.yaml", lambda: compose("deploy/docker/config.toml")),
    ("deploy/docker/compose.yaml (the check's job)",
     lambda: compose("deploy/checks/compose-job.toml")),
    ("deploy/docker/Dockerfile", dockerfile),
    ("deploy/slurm", sbatch),
):
    before = len(checked)
    check()
    if len(checked) == before:
        fail(source, "found nothing to check (moved, or laid out otherwise?)")
if failures:
    print("names: FAILED", *failures, sep="\n  ", file=sys.stderr)
    sys.exit(1)
print(f"names: ok: {len(checked)} containers and commands use only names the binaries accept")
