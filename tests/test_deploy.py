"""deploy/ recipes: the SLURM job script and the manifests are well formed, and secure by default.

Secure by default means: TLS with client certificates on every connection of a cluster that spans
machines, local clusters on 127.0.0.1, a private scheduler file and certificates, containers that do
not run as root, and spatialscale installed from the repository (it is not on a package index).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SBATCH = DEPLOY / "slurm_sv.sbatch"
TLS_MOUNT = "/etc/spatialscale/tls"
CLIENT_TLS_ENV = {
    "DASK_DISTRIBUTED__COMM__TLS__CA_FILE",
    "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT",
    "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY",
    "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION",
}
# `pip install spatialscale`, `pip install -U "spatialscale[cuda]"`: from an index (a path or wheel is fine)
PIP_FROM_INDEX = re.compile(r"pip3? install\s+(?:-[-\w=]+\s+)*[\"']?spatialscale\b")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, DEPLOY / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _flag(args: list[str], flag: str) -> str:
    """The value after ``flag`` in an argument list."""
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def _script_flag(script: str, flag: str) -> str:
    m = re.search(rf"{flag} (\S+)", script)
    assert m, f"{flag} missing from the job script"
    return m.group(1)


# --- SLURM, dask-jobqueue ------------------------------------------------------------------------


def test_slurm_job_script(tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue")
    pytest.importorskip("cryptography")
    monkeypatch.setenv("HOME", str(tmp_path))  # the default --tls-dir is ~/.spatialscale/tls
    mod = _load("slurm_sv")
    args = mod.parse_args(["s.zarr", "--out", "o.zarr", "--cores", "4", "--memory", "8GB", "--partition", "short"])
    cluster = mod.make_cluster(args)
    try:
        script = cluster.job_script()
        address = cluster.scheduler_address
        security = cluster.security
        dashboard = cluster.scheduler_spec["options"]["dashboard_address"]
        tls_files = [_script_flag(script, f) for f in ("--tls-ca-file", "--tls-cert", "--tls-key")]
        modes = {f: _mode(f) for f in tls_files}
    finally:
        mod._remove_temporary_certificates(cluster)
        cluster.close()
    assert "#SBATCH -p short" in script
    assert "OMP_NUM_THREADS=1" in script
    assert "--nworkers 4" in script and "--nthreads 1" in script
    # TLS by default: temporary certificates, workers' copy private, in a private directory
    assert address.startswith("tls://")
    assert "--protocol tls://" in script
    assert security.require_encryption
    tls_dir = tmp_path / ".spatialscale" / "tls"
    assert _mode(tls_dir) == 0o700
    for f, mode in modes.items():
        assert Path(f).parent == tls_dir and mode == 0o600, (f, oct(mode))
    assert not any(Path(f).exists() for f in tls_files), "temporary certificates left behind"
    assert dashboard.startswith("127.0.0.1:")
    assert _script_flag(script, "--dashboard-address").startswith("127.0.0.1:")  # the workers' dashboards too


def test_slurm_gpu_job_script(tmp_path):
    pytest.importorskip("dask_jobqueue")
    pytest.importorskip("cryptography")
    mod = _load("slurm_sv")
    args = mod.parse_args(["s.zarr", "--out", "o.zarr", "--gpu", "--tls-dir", str(tmp_path / "tls"),
                           "--dashboard-address", "127.0.0.1:0"])
    cluster = mod.make_cluster(args)
    try:
        script = cluster.job_script()
    finally:
        mod._remove_temporary_certificates(cluster)
        cluster.close()
    assert "dask_cuda.cli" in script and "--gres=gpu:1" in script
    assert "--protocol tls://" in script and "--tls-key" in script


def test_slurm_tls_is_enforced(tmp_path):
    """The scheduler of make_cluster accepts its own client and refuses one without the certificate."""
    pytest.importorskip("dask_jobqueue")
    pytest.importorskip("cryptography")
    from distributed import Client
    from distributed.security import Security

    mod = _load("slurm_sv")
    args = mod.parse_args(["s.zarr", "--out", "o.zarr", "--tls-dir", str(tmp_path / "tls"),
                           "--dashboard-address", "127.0.0.1:0"])
    cluster = mod.make_cluster(args)
    try:
        with Client(cluster, timeout="20s") as client:
            assert client.scheduler_info()["address"].startswith("tls://")
        with pytest.raises(OSError):  # "TLS certificate does not match" (a CommClosedError)
            Client(cluster.scheduler_address, security=Security.temporary(), timeout="3s")
    finally:
        mod._remove_temporary_certificates(cluster)
        cluster.close()


def test_slurm_own_certificates(tmp_path):
    pytest.importorskip("dask_jobqueue")
    pytest.importorskip("cryptography")
    from distributed.security import Security

    pem = Security.temporary()
    ca, cert, key = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.write_text(pem.tls_ca_file)
    cert.write_text(pem.tls_scheduler_cert)
    key.write_text(pem.tls_scheduler_key)
    key.chmod(0o600)
    mod = _load("slurm_sv")
    base = ["s.zarr", "--out", "o.zarr", "--dashboard-address", "127.0.0.1:0", "--tls-dir", str(tmp_path / "no")]
    own = ["--tls-ca-file", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]
    cluster = mod.make_cluster(mod.parse_args(base + own))
    try:
        script = cluster.job_script()
        address = cluster.scheduler_address
    finally:
        cluster.close()
    assert address.startswith("tls://")
    assert _script_flag(script, "--tls-ca-file") == str(ca)
    assert _script_flag(script, "--tls-cert") == str(cert)
    assert _script_flag(script, "--tls-key") == str(key)
    assert not (tmp_path / "no").exists()  # nothing temporary written
    with pytest.raises(SystemExit, match="--tls-key"):
        mod.make_security(mod.parse_args(base + own[:4]))
    key.chmod(0o644)
    with pytest.raises(SystemExit, match="chmod 600"):
        mod.make_security(mod.parse_args(base + own))


# --- SLURM, one allocation -----------------------------------------------------------------------


def test_sbatch_script_parses():
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0


def test_sbatch_script_is_private_and_tls():
    text = SBATCH.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert re.search(r"^umask 077\b", code, re.M)
    assert code.index("umask 077") < code.index("dask scheduler")  # before the scheduler file is made
    assert 'chmod 600 "$SCHED"' in code and 'chmod 600 "$KEY"' in code
    commands = code.replace("\\\n", " ")  # continuation lines joined
    scheduler = re.search(r"dask scheduler .*", commands).group(0)
    worker = re.search(r"dask worker .*", commands).group(0)
    assert "--protocol tls" in scheduler and "--protocol tls" in worker
    assert '"${TLS_ARGS[@]}"' in scheduler and '"${TLS_ARGS[@]}"' in worker
    assert "--dashboard-address 127.0.0.1:" in scheduler
    assert "--dashboard-address 127.0.0.1:" in worker  # dask worker binds all interfaces unless told
    assert "--tls-ca-file" in code and "--tls-cert" in code and "--tls-key" in code
    exported = set(re.findall(r"^export (DASK_DISTRIBUTED__\w+)=", code, re.M))
    assert exported == CLIENT_TLS_ENV
    assert code.index("DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION") < code.index("spatialscale sv")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_sbatch_certificate_and_client_env_work(tmp_path):
    """The sbatch's openssl line makes a certificate that distributed accepts for mutual TLS, and a
    `Client(address)` configured only by the sbatch's DASK_DISTRIBUTED__* variables gets through."""
    from distributed import LocalCluster
    from distributed.security import Security

    code = SBATCH.read_text()
    openssl = re.search(r"^\s*(openssl req [^\n]+)$", code, re.M).group(1)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    env = dict(os.environ, CERT=str(cert), KEY=str(key))
    subprocess.run(["bash", "-c", f"umask 077; {openssl}"], env=env, check=True, capture_output=True, timeout=120)
    assert _mode(key) == 0o600
    sec = Security(tls_ca_file=str(cert), tls_scheduler_cert=str(cert), tls_scheduler_key=str(key),
                   tls_worker_cert=str(cert), tls_worker_key=str(key), tls_client_cert=str(cert),
                   tls_client_key=str(key), require_encryption=True)
    values = {'"$CERT"': str(cert), '"$KEY"': str(key), "True": "True"}
    client_env = {k: values[v] for k, v in re.findall(r"^export (DASK_DISTRIBUTED__\w+)=(\S+)$", code, re.M)}
    assert set(client_env) == CLIENT_TLS_ENV
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, host="127.0.0.1", protocol="tls://",
                      security=sec, dashboard_address="127.0.0.1:0") as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")
        check = ("import sys; from distributed import Client; "
                 "c = Client(sys.argv[1], timeout='20s'); print(c.submit(sum, [1, 2]).result()); c.close()")
        run = subprocess.run([sys.executable, "-c", check, address], env=dict(os.environ, **client_env),
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and run.stdout.strip() == "3", run.stderr[-2000:]


# --- Kubernetes ----------------------------------------------------------------------------------


def _manifests() -> list[dict]:
    yaml = pytest.importorskip("yaml")
    return [doc for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")) for doc in yaml.safe_load_all(f.read_text())]


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    if doc["kind"] == "DaskCluster":
        return [("worker", doc["spec"]["worker"]["spec"]), ("scheduler", doc["spec"]["scheduler"]["spec"])]
    if doc["kind"] == "DaskWorkerGroup":
        return [("worker", doc["spec"]["worker"]["spec"])]
    if doc["kind"] == "Job":
        return [("job", doc["spec"]["template"]["spec"])]
    raise AssertionError(f"unexpected kind {doc['kind']}")


def test_manifests_parse():
    kinds = {doc["kind"] for doc in _manifests()}
    assert kinds == {"DaskCluster", "Job", "DaskWorkerGroup"}


def test_manifests_run_as_non_root():
    pods = [pod for doc in _manifests() for pod in _pod_specs(doc)]
    assert len(pods) == 4
    for role, pod in pods:
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0 and ctx["runAsGroup"] != 0, role
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, role
            assert "ALL" in c["securityContext"]["capabilities"]["drop"], role


def test_manifests_use_tls():
    for doc in _manifests():
        for role, pod in _pod_specs(doc):
            secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
            assert list(secrets.values()) == ["spatialscale-tls"], role
            (c,) = pod["containers"]
            mounts = [m for m in c["volumeMounts"] if m["name"] in secrets]
            assert [(m["mountPath"], m.get("readOnly")) for m in mounts] == [(TLS_MOUNT, True)], role
            if role == "job":
                command = c["command"]
                assert _flag(command, "--scheduler").startswith("tls://")
                env = {e["name"]: e["value"] for e in c["env"]}
                assert CLIENT_TLS_ENV <= set(env), role
                assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"
                assert all(env[k].startswith(TLS_MOUNT + "/") for k in CLIENT_TLS_ENV if "TLS" in k)
                continue
            args = c["args"]
            assert _flag(args, "--protocol") == "tls", role
            for flag, name in (("--tls-ca-file", "ca.crt"), ("--tls-cert", "tls.crt"), ("--tls-key", "tls.key")):
                assert _flag(args, flag) == f"{TLS_MOUNT}/{name}", role
            if role == "worker":  # the operator's DASK_SCHEDULER_ADDRESS is tcp://; workers must be told tls://
                assert any(a.startswith("tls://") and a.endswith(":8786") for a in args), args


def test_manifests_keep_dashboards_on_loopback():
    """Every scheduler and worker dashboard listens on 127.0.0.1; no Service or container port exposes one."""
    pods = 0
    for doc in _manifests():
        for role, pod in _pod_specs(doc):
            if role == "job":
                continue
            (c,) = pod["containers"]
            assert _flag(c["args"], "--dashboard-address").startswith("127.0.0.1:"), role
            assert all(p["name"] != "http-dashboard" for p in c.get("ports", [])), role
            for probe in ("readinessProbe", "livenessProbe"):
                assert "httpGet" not in c.get(probe, {}), (role, probe)
            pods += 1
        service = doc.get("spec", {}).get("scheduler", {}).get("service")
        if service is not None:
            assert [p["port"] for p in service["ports"]] == [8786]
    assert pods == 3


# --- Docker --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_non_root_from_source(name):
    text = (DEPLOY / "docker" / name).read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    users = [line.split(None, 1)[1] for line in lines if line.upper().startswith("USER ")]
    assert users, "no USER line"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]
    assert not PIP_FROM_INDEX.search("\n".join(lines))
    assert "COPY . /src" in lines
    assert any(re.search(r"pip install .*[\"']?/src(\[cuda\])?[\"']?", line) for line in lines)
    ignore = (DEPLOY / "docker" / f"{name}.dockerignore").read_text().split()
    assert ".git" in ignore and "**/*.pem" in ignore
    assert not {"spatialscale", "pyproject.toml", "README.md"} & set(ignore)


# --- all recipes ---------------------------------------------------------------------------------


def test_no_install_from_package_index():
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            hits = PIP_FROM_INDEX.findall(path.read_text())
            assert not hits, f"{path.relative_to(DEPLOY)} installs spatialscale from an index: {hits}"
    assert PIP_FROM_INDEX.search('pip install "spatialscale[cuda]"')
    assert not PIP_FROM_INDEX.search('pip install ".[cuda]" && pip install dist/spatialscale-0.1-py3-none-any.whl')


def test_local_cuda_binds_loopback():
    tree = ast.parse((DEPLOY / "local_cuda.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "LocalCUDACluster"]
    assert len(calls) == 1
    kw = {k.arg: ast.literal_eval(k.value) for k in calls[0].keywords}
    assert kw["host"] == "127.0.0.1"
    assert kw["dashboard_address"].startswith("127.0.0.1:")


def test_readme_documents_security():
    text = (DEPLOY / "README.md").read_text()
    assert "## Security" in text
    assert "openssl req -x509" in text
    assert "kubectl create secret generic spatialscale-tls" in text
    assert "security=sec" in text and 'Client("tls://' in text
    assert CLIENT_TLS_ENV <= set(re.findall(r"DASK_DISTRIBUTED__\w+", text))
