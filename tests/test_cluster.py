"""The cluster manifests a platform team applies: one image everywhere, and the MLflow server they ship working
as the registry of every Ray pod (started here with the manifest's own arguments, on loopback)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, free_port

KUBERAY = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))
LAUNCHER = REPO / "cluster" / "launcher" / "gpu-cluster.yaml"


def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def walk(node, key):
    """Every value under `key`, at any depth."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, key)


def containers(path):
    for doc in docs(path):
        for group in walk(doc, "containers"):
            yield from group


def mlflow_manifest():
    [pvc, deployment, service] = docs(REPO / "cluster" / "kuberay" / "mlflow.yaml")
    assert (pvc["kind"], deployment["kind"], service["kind"]) == ("PersistentVolumeClaim", "Deployment", "Service")
    [c] = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, service, c


def job_runners(tag: str) -> list[str]:
    """MLflow job-runner and Huey consumer processes started by a server whose environment carries
    MEMO_TEST_SERVER=tag (MLflow 3 starts 4-5 unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false; in their
    own session, so killing the server's group left them running here, ~50% of a core)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if ("huey" in cmd or "_job_runner" in cmd) and f"MEMO_TEST_SERVER={tag}".encode() in \
                    (proc / "environ").read_bytes():
                found.append(cmd)
        except OSError:
            continue
    return found


def test_every_manifest_runs_the_one_project_image_on_the_ray_version_installed():
    import ray

    images = {c["image"] for path in KUBERAY for c in containers(path)}
    images.add(yaml.safe_load(LAUNCHER.read_text())["docker"]["image"])
    assert images == {f"memo-platform:{ray.__version__}-py311-gpu"}, images
    versions = {v for path in KUBERAY for doc in docs(path) for v in walk(doc, "rayVersion")}
    assert versions == {ray.__version__}, versions
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile
    assert "-t memo-platform:" in (REPO / "cluster" / "README.md").read_text()


def test_every_ray_pod_uses_the_mlflow_server_the_manifests_ship():
    _, service, c = mlflow_manifest()
    url = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    ray_containers = [ct for path in KUBERAY if path.name != "mlflow.yaml" for ct in containers(path)]
    uris = [e["value"] for ct in ray_containers for e in ct.get("env", []) if e["name"] == "MLFLOW_TRACKING_URI"]
    assert uris and set(uris) == {url}, uris
    # every Ray container of every manifest has it (a pod without it would keep a registry of its own)
    assert len(uris) == len(ray_containers)
    # and one Hugging Face cache on the shared volume: a base model given as an HF id is found by every worker
    for ct in ray_containers:
        env = {e["name"]: e.get("value") for e in ct["env"]}
        assert env["HF_HOME"] == env["MEMO_HOME"] + "/hf", ct["name"]
    assert "--env HF_HOME=/mnt/memo/hf" in yaml.safe_load(LAUNCHER.read_text())["docker"]["run_options"]


@pytest.mark.slow
def test_the_manifests_mlflow_server_is_the_registry_of_memo_and_refuses_foreign_hosts(tmp_path):
    """The Deployment's own command and arguments, with its two volumes mapped into tmp_path and the port and
    host made local: in-cluster clients (Host: memo-mlflow:5000) are served, another Host header gets 403, and
    memo's registry registers and downloads a version through it with the weights written straight to the
    shared volume, never through the server."""
    import httpx

    _, service, c = mlflow_manifest()
    volumes = {m["mountPath"]: tmp_path / m["name"] for m in c["volumeMounts"]}
    for d in volumes.values():
        d.mkdir()
    port = free_port()
    args = []
    for a in c["args"]:
        for mount, local in volumes.items():
            a = a.replace(mount + "/", f"{local}/")
        a = {"--host=0.0.0.0": "--host=127.0.0.1", "--port=5000": f"--port={port}"}.get(a, a)
        args.append(a)
    assert args != c["args"] and f"--port={port}" in args
    exe = os.path.join(os.path.dirname(sys.executable), c["command"][0])
    env = {**os.environ, **{e["name"]: e["value"] for e in c.get("env", [])}, "MEMO_TEST_SERVER": str(port)}
    server = subprocess.Popen([exe, *c["command"][1:], *args], stdout=subprocess.DEVNULL, env=env,
                              stderr=open(tmp_path / "server.log", "w"), start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        assert not job_runners(str(port))  # the manifest's env turns MLflow's job execution off
        api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        in_cluster = f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
        assert httpx.get(api, headers={"Host": in_cluster}, timeout=60).status_code == 200
        assert httpx.get(api, headers={"Host": "attacker.example.com"}, timeout=60).status_code == 403

        shared = volumes["/mnt/memo"]
        script = textwrap.dedent("""
            import pathlib, sys
            from memo import registry
            folder = pathlib.Path(sys.argv[1]); folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"weights" * 1000)
            run = registry.start_run("clusterreg", "train", {"base_model": "tiny"})
            v = registry.register_memory("clusterreg", folder, run, {"base_model": "tiny"}, "candidate")
            registry.end_run(run)
            assert registry.resolve_version("clusterreg", "candidate") == v
            size = (registry.download_version("clusterreg", v) / "model.safetensors").stat().st_size
            print("REGISTERED", v, registry.client().get_model_version("memo-clusterreg", v).source, size)
        """)
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MEMO_HOME": str(shared)}
        res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "memory")], capture_output=True,
                             text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        [line] = [x for x in res.stdout.splitlines() if x.startswith("REGISTERED ")]
        _, version, source, size = line.split(" ")
        assert version == "1" and size == "7000"
        assert source.startswith((shared / "mlartifacts").as_uri()), source  # the shared volume, not the server
        assert list((shared / "mlartifacts").rglob("model.safetensors"))
        assert not (shared / "mlflow.db").exists()  # the registry lives in the server's database only
        assert (volumes["/mlflow"] / "mlflow.db").exists()
    finally:  # the server and its gunicorn workers: one process group
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


@pytest.mark.slow
def test_the_launchers_head_starts_the_mlflow_server_every_node_uses(tmp_path):
    """cluster/launcher/start_mlflow.sh as the head runs it, its shared-volume paths and address made local:
    it prints the tracking URI once the server answers, a second run (`ray up` again) finds it and starts
    nothing, its Host check refuses other names, and a port it cannot have is one clear error. The head's
    and the workers' `ray start` export that server's URI, so every Ray process inherits it."""
    import httpx

    cfg = yaml.safe_load(LAUNCHER.read_text())
    head, workers = cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]
    script = REPO / "cluster" / "launcher" / "start_mlflow.sh"
    assert head.index(f"bash /home/ray/memo/{script.relative_to(REPO)}") < next(
        i for i, c in enumerate(head) if "ray start --head" in c)
    starts = [c for c in head + workers if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("export MLFLOW_TRACKING_URI=http://") and ":5000; " in c
                                    for c in starts), starts
    assert "MLFLOW_HOST:-" in script.read_text() and "MLFLOW_PORT:-5000" in script.read_text()

    port, srv, shared = free_port(), tmp_path / "srv", tmp_path / "shared"
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "MLFLOW_HOST": "127.0.0.1",
           "MEMO_TEST_SERVER": str(port),
           "MLFLOW_PORT": str(port), "MLFLOW_DB": str(srv / "mlflow.db"), "MLFLOW_ARTIFACTS": str(shared / "mlartifacts")}

    def start(**extra):
        return subprocess.run(["bash", str(script)], env={**env, **extra}, capture_output=True, text=True, timeout=180)

    try:
        res = start()
        url = f"http://127.0.0.1:{port}"
        assert res.returncode == 0 and res.stdout.strip() == url, res.stderr[-2000:]
        pid = int((srv / "server.pid").read_text())
        again = start()
        assert again.returncode == 0 and again.stdout.strip() == url and int((srv / "server.pid").read_text()) == pid
        assert not job_runners(str(port))  # the script turns MLflow's job execution off
        api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert httpx.get(api, timeout=60).status_code == 200
        assert httpx.get(api, headers={"Host": "attacker.example.com"}, timeout=60).status_code == 403
        assert (srv / "mlflow.db").exists() and (shared / "mlartifacts").is_dir()
        # a port another process holds: one line naming it, before any server starts
        import socket

        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            other.listen()
            taken = other.getsockname()[1]
            busy = start(MLFLOW_PORT=str(taken), MLFLOW_DB=str(tmp_path / "busy" / "mlflow.db"))
        assert busy.returncode == 1 and busy.stderr.startswith(f"error: cannot serve MLflow on 127.0.0.1:{taken} "), \
            busy.stderr
        assert len(busy.stderr.strip().splitlines()) == 1 and not (tmp_path / "busy" / "server.pid").exists()
    finally:  # the server and uvicorn's worker: one session, one process group
        for pidfile in (srv / "server.pid", tmp_path / "busy" / "server.pid"):
            if pidfile.exists():
                try:
                    os.killpg(int(pidfile.read_text()), signal.SIGTERM)
                except ProcessLookupError:
                    pass


def test_the_rayservice_serves_memories_on_the_gpus_its_pods_request_and_fits_them_at_most_replicas():
    """The RayService's GPU worker pods are for the memories: engine vllm with a GPU share per replica, and
    the GPUs its deployments ask for at their largest (the shared memory deployment's one replica plus each
    dedicated domain's max_replicas) fit the worker group at maxReplicas, so no replica waits forever."""
    from memo.config import ServeConfig, build_config

    [svc] = docs(REPO / "cluster" / "kuberay" / "rayservice.yaml")
    [app] = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    cfg = build_config(ServeConfig, {**app["args"], "host": "0.0.0.0"})
    assert cfg.engine == "vllm" and cfg.replica_gpus > 0
    demand = cfg.replica_gpus * (1 + len(cfg.dedicated_domains) * cfg.dedicated_max_replicas)
    supply = sum(g["maxReplicas"] * sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
                                        for c in g["template"]["spec"]["containers"])
                 for g in svc["spec"]["rayClusterConfig"]["workerGroupSpecs"])
    assert 0 < demand <= supply, (demand, supply)


def test_the_launcher_yaml_follows_the_schema_of_the_installed_ray():
    """`ray up` validates its YAML against this schema (ray/autoscaler/ray-schema.json, shipped in the wheel):
    a misspelt or misplaced key fails here, not on the first `ray up` of a platform team."""
    import json
    from pathlib import Path

    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load(LAUNCHER.read_text())
    jsonschema.validate(config, schema)
    broken = {**config, "docker": {**config["docker"], "imagee": config["docker"]["image"]}}
    with pytest.raises(jsonschema.ValidationError):  # the schema does refuse unknown keys
        jsonschema.validate(broken, schema)
