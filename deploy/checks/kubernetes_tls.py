"""Check: the TLS component's pods, as rendered, work (see kubernetes_tls.sh).

In every overlay rendered with the component: the learner's files and the
actors' CA come from the Secret flgfn-learner-tls, the actors get its CA
and not its key, they dial the Service over https://, and the learner's
probes verify the certificate for the host the actors dial.

Then the cpu overlay's learner runs here as its pod would: the rendered
environment and arguments, each mounted path put in place of the mount
(the Secret's files from SECRET_DIR, the ConfigMap's job file, the
claim's folder), listening on a free local port, and stopping after a few
steps (both the check's own). Its three probe commands must pass, and fail
for another host name; one actor from the rendered Deployment must train
with it over TLS until it ends. The actor dials 127.0.0.1 with tls.domain
set to the host of its rendered URL, which stands in for the cluster's DNS.

    python kubernetes_tls.py BINARY_DIR WORK_DIR SECRET_DIR
"""

import os
import re
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN, WORK, SECRET_DIR = sys.argv[1:4]
SECRET = "flgfn-learner-tls"
# The keys kubernetes_tls.sh writes, as `kubectl create secret` (or
# cert-manager) would put them in the Secret.
SECRET_KEYS = ("tls.crt", "tls.key", "ca.crt")
TOKEN = "kubernetes-tls-check-token-0123456789"
STEPS = 40


def fail(message, log=None, said=""):
    """Fails the check: the end of `log` (a file) and what a command
    `said`, then why, last."""
    tail = open(log, encoding="utf-8", errors="replace").read()[-3000:] + "\n" if log else ""
    if said:
        tail += f"{said.strip()}\n"
    sys.exit(f"{tail}kubernetes_tls: {message}")


def rendered(overlay):
    docs = [d for d in yaml.safe_load_all(open(os.path.join(WORK, f"{overlay}.yaml"))) if d]
    workloads = {d["metadata"]["name"]: d for d in docs if d["kind"] in ("StatefulSet", "Job", "Deployment")}
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    service = next(d for d in docs if d["kind"] == "Service")
    return workloads, config_maps, service


class Pod:
    """One workload's first container, with its mounts put in local places."""

    def __init__(self, overlay, workload, config_maps):
        self.where = f"overlay {overlay} {workload['kind']}/{workload['metadata']['name']}"
        spec = workload["spec"]["template"]["spec"]
        self.container = spec["containers"][0]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
        local = os.path.join(WORK, "live", workload["metadata"]["name"])
        # mount path -> local path, file by file for Secrets and ConfigMaps
        # (a file the pod does not get has no local path).
        self.files = {}
        self.secret_keys = set()
        for mount in self.container.get("volumeMounts", []):
            path, volume = mount["mountPath"], volumes.get(mount["name"], {})
            if "secret" in volume:
                if volume["secret"]["secretName"] != SECRET:
                    fail(f"{self.where} mounts the Secret {volume['secret']['secretName']}, not {SECRET}")
                items = volume["secret"].get("items") or [{"key": k, "path": k} for k in SECRET_KEYS]
                for item in items:
                    self.files[f"{path}/{item['path']}"] = os.path.join(SECRET_DIR, item["key"])
                    self.secret_keys.add(item["key"])
            elif "configMap" in volume:
                folder = os.path.join(local, mount["name"])
                os.makedirs(folder, exist_ok=True)
                for key, text in config_maps[volume["configMap"]["name"]].items():
                    with open(os.path.join(folder, key), "w", encoding="utf-8") as f:
                        f.write(text)
                    self.files[f"{path}/{key}"] = os.path.join(folder, key)
            elif "persistentVolumeClaim" in volume or mount["name"] in claims:
                folder = os.path.join(local, mount["name"])
                os.makedirs(folder, exist_ok=True)
                self.files[path] = folder
            else:
                fail(f"{self.where} mounts {mount['name']}, which the check cannot stand in for")

    def localize(self, text):
        """`text` with every mounted path in it put in its local place."""
        for path in sorted(self.files, key=len, reverse=True):
            text = re.sub(rf"{re.escape(path)}(?=/|$)", self.files[path], text)
        return text

    def source(self, path):
        """The Secret key a path in the pod reads, if any."""
        local = self.localize(path)
        if os.path.dirname(local) == SECRET_DIR:
            return os.path.basename(local)
        return None

    def env(self):
        return {
            e["name"]: self.localize(e["value"]) if "value" in e else TOKEN
            for e in self.container.get("env", [])
        }

    def raw_env(self):
        return {e["name"]: e.get("value") for e in self.container.get("env", [])}

    def args(self):
        return [self.localize(a) for a in self.container.get("args", [])]


def probe_command(pod, probe):
    command = pod.container.get(probe, {}).get("exec", {}).get("command")
    if not command:
        fail(f"{pod.where}: its {probe} runs no command (Kubernetes' gRPC probes have no TLS)")
    return command


def flag(command, name):
    for i, word in enumerate(command):
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
        if word == name and i + 1 < len(command):
            return command[i + 1]
    return None


def check_structure(overlay):
    """What the component must have rendered, read from the manifests."""
    workloads, config_maps, service = rendered(overlay)
    learner = Pod(overlay, workloads["flgfn-learner"], config_maps)
    actor = Pod(overlay, workloads["flgfn-actor"], config_maps)
    env = learner.raw_env()
    spec = workloads["flgfn-learner"]["spec"]["template"]["spec"]
    mode = next((v["secret"].get("defaultMode", 0o644) for v in spec.get("volumes", [])
                 if v.get("secret", {}).get("secretName") == SECRET), None)
    if mode is None or mode & 0o007 or "fsGroup" not in spec.get("securityContext", {}):
        fail(f"{learner.where}: the Secret holding the key is mounted with mode "
             f"{oct(mode or 0)} and fsGroup {spec.get('securityContext', {}).get('fsGroup')}: "
             f"others may read it, or the learner may not")
    if any("appProtocol" in p for p in service["spec"]["ports"]):
        fail(f"overlay {overlay}: the Service still says appProtocol {service['spec']['ports']}: "
             f"a mesh would take the TLS port for plain gRPC")
    for key, wanted in (("FLGFN_TLS__CERT_FILE", "tls.crt"), ("FLGFN_TLS__KEY_FILE", "tls.key")):
        if env.get(key) is None or learner.source(env[key]) != wanted:
            fail(f"{learner.where}: {key}={env.get(key)} is not the Secret's {wanted}")
    url = actor.raw_env().get("FLGFN_ACTOR__LEARNER", "")
    address = urlsplit(url)
    service_ports = {p["port"] for p in service["spec"]["ports"]}
    if address.scheme != "https" or address.hostname != service["metadata"]["name"] or address.port not in service_ports:
        fail(f"{actor.where}: the actors dial {url}, not https:// to the Service "
             f"{service['metadata']['name']} on {service_ports}")
    ca = actor.raw_env().get("FLGFN_TLS__CA_FILE")
    if ca is None or actor.source(ca) != "ca.crt":
        fail(f"{actor.where}: FLGFN_TLS__CA_FILE={ca} is not the Secret's ca.crt")
    if actor.secret_keys != {"ca.crt"}:
        fail(f"{actor.where}: the actors' pod gets the Secret's {sorted(actor.secret_keys)}, not ca.crt alone")
    listen_port = int(env["FLGFN_LEARNER__LISTEN"].rsplit(":", 1)[1])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = probe_command(learner, probe)
        probe_url = urlsplit(flag(command, "--address") or "")
        domain = flag(command, "--domain") or probe_url.hostname
        if probe_url.scheme != "https" or probe_url.port != listen_port:
            fail(f"{learner.where}: its {probe} asks {probe_url.geturl()}, not https:// on port {listen_port}")
        if domain != address.hostname:
            fail(f"{learner.where}: its {probe} checks the certificate for {domain}, "
                 f"the actors for {address.hostname}")
        if learner.source(flag(command, "--ca-file") or "") != "ca.crt":
            fail(f"{learner.where}: its {probe} does not verify with the Secret's ca.crt")
    return learner, actor


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_health_env():
    """The learner image's FLGFN_HEALTH_ variables (the probes inherit
    them): the probes' flags must win over them."""
    text = open(os.path.join(ROOT, "deploy/docker/Dockerfile"), encoding="utf-8").read()
    stage = text.split("AS learner", 1)[1].split("\nFROM ", 1)[0]
    return dict(re.findall(r"(FLGFN_HEALTH_[A-Z_]+)=(\S+)", stage))


def run_live(learner, actor):
    log_dir = os.path.join(WORK, "live")
    os.makedirs(log_dir, exist_ok=True)
    port = free_port()
    rendered_port = learner.raw_env()["FLGFN_LEARNER__LISTEN"].rsplit(":", 1)[1]
    learner_env = {
        "PATH": "/usr/bin:/bin",
        **learner.env(),
        "FLGFN_LEARNER__LISTEN": f"127.0.0.1:{port}",
        "FLGFN_LEARNER__MAX_STEPS": str(STEPS),
    }
    learner_log = open(os.path.join(log_dir, "learner.log"), "w")
    server = subprocess.Popen([os.path.join(BIN, "flgfn-learner"), *learner.args()],
                              env=learner_env, stdout=learner_log, stderr=subprocess.STDOUT)
    client = None
    try:
        probe_env = {**learner_env, **image_health_env()}

        def probe(command, domain=None):
            command = [learner.localize(w).replace(f"127.0.0.1:{rendered_port}", f"127.0.0.1:{port}")
                       for w in command]
            if domain is not None:
                command = [f"--domain={domain}" if w.startswith("--domain=") else w for w in command]
            command[0] = os.path.join(BIN, command[0])
            return subprocess.run(command, env=probe_env, capture_output=True, text=True, timeout=30)

        startup = probe_command(learner, "startupProbe")
        deadline = time.monotonic() + 90
        while (answer := probe(startup)).returncode != 0:
            if server.poll() is not None or time.monotonic() > deadline:
                fail("the learner never passed its startup probe (it said what is above)",
                     learner_log.name, answer.stderr)
            time.sleep(0.5)
        for name in ("readinessProbe", "livenessProbe"):
            answer = probe(probe_command(learner, name))
            if answer.returncode != 0:
                fail(f"the learner's {name} failed (it said what is above)", said=answer.stderr)
        if probe(startup, domain="not-the-learner").returncode == 0:
            fail("a probe for another host name passed: the probes do not verify the certificate's name")
        url = urlsplit(actor.raw_env()["FLGFN_ACTOR__LEARNER"])
        actor_env = {
            "PATH": "/usr/bin:/bin",
            **actor.env(),
            "FLGFN_ACTOR__LEARNER": f"https://127.0.0.1:{port}",
            "FLGFN_TLS__DOMAIN": url.hostname,
        }
        actor_log = open(os.path.join(log_dir, "actor.log"), "w")
        client = subprocess.Popen([os.path.join(BIN, "flgfn-actor"), *actor.args()],
                                  env=actor_env, stdout=actor_log, stderr=subprocess.STDOUT)
        try:
            status = server.wait(timeout=180)
        except subprocess.TimeoutExpired:
            fail(f"the learner did not reach {STEPS} steps in 180 s", learner_log.name)
        if status != 0:
            fail(f"the learner exited {status}", learner_log.name)
        try:
            actor_status = client.wait(timeout=60)
        except subprocess.TimeoutExpired:
            fail("the actor did not leave after the learner ended", actor_log.name)
        if actor_status != 0:
            fail(f"the actor exited {actor_status}", actor_log.name)
    finally:
        for process in (server, client):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


overlays = sorted(f[: -len(".yaml")] for f in os.listdir(WORK) if f.endswith(".yaml"))
pods = {overlay: check_structure(overlay) for overlay in overlays}
run_live(*pods["cpu"])
print(f"kubernetes_tls: ok: {', '.join(overlays)} render with the TLS component, take the learner's files "
      f"and the actors' CA from {SECRET}, and the cpu overlay's learner passed its three probes over TLS "
      f"(and failed them for another name) and trained {STEPS} steps with one rendered actor")
