"""Real clusters as users start them: separate `dask scheduler` / `dask worker` processes, TLS, loopback."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import spatialscale
from spatialscale import InputError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from conftest import make_adata

    return spatialscale.ingest(make_adata(n=150, n_genes=10, seed=2), tmp_path_factory.mktemp("cl") / "s.zarr")


@pytest.fixture(scope="module")
def reference(store):
    return spatialscale.sv_test(store, scheduler="threads", progress=False)


def _dask(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_" + args[0].replace("-", "_"), *args[1:]],
                            cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for(path: Path, timeout: float = 60) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists() and path.stat().st_size:
            try:
                return json.loads(path.read_text())
            except ValueError:
                pass
        time.sleep(0.2)
    raise TimeoutError(f"{path} never appeared")


class _Cluster:
    """A scheduler and one worker as separate processes (started like `dask scheduler` / `dask worker`)."""

    def __init__(self, root: Path, tls: list[str] | None = None) -> None:
        self.sched_dir, self.work_dir = root / "scheduler", root / "worker"
        self.sched_dir.mkdir()
        self.work_dir.mkdir()
        self.file = self.sched_dir / "scheduler.json"
        tls = tls or []
        proto = ["--protocol", "tls"] if tls else []
        self.procs = [_dask("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", *proto, *tls,
                            "--scheduler-file", str(self.file), cwd=self.sched_dir)]
        self.address = _wait_for(self.file)["address"]
        self.procs.append(_dask("worker", self.address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                                *tls, cwd=self.work_dir))

    def close(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def _wait_workers(address: str, n: int = 1, **security) -> None:
    from distributed import Client

    with Client(address, timeout=30, **security) as c:
        c.wait_for_workers(n, timeout=60)


def test_relative_paths_with_workers_started_elsewhere(store, reference, tmp_path, monkeypatch):
    cluster = _Cluster(tmp_path)
    try:
        _wait_workers(cluster.address)
        user = tmp_path / "user"
        user.mkdir()
        monkeypatch.chdir(user)
        rel_store = os.path.relpath(store.path, user)
        ds = spatialscale.sv_test(rel_store, out="sv.zarr", scheduler=cluster.address, progress=False)
        assert ds.attrs["execution"] == "distributed"
        np.testing.assert_array_equal(ds["sv_pvalue"].values, reference["sv_pvalue"].values)
        assert sorted(p.name for p in user.iterdir()) == ["sv.zarr"]
        assert not any(p.name.endswith(".zarr") for p in cluster.work_dir.rglob("*"))  # nothing on the workers' side
        # the CLI with the scheduler file, relative paths again
        r = subprocess.run([sys.executable, "-m", "spatialscale.cli", "sv", rel_store, "--out", "cli.zarr",
                            "--scheduler", str(cluster.file), "--no-progress", "--top", "0"],
                           capture_output=True, text=True, cwd=user, timeout=300)
        assert r.returncode == 0, r.stderr
        np.testing.assert_array_equal(spatialscale.open_results(user / "cli.zarr")["sv_pvalue"].values,
                                      reference["sv_pvalue"].values)
        # a path the workers cannot see is named before anything runs
        from distributed import Client

        from spatialscale.engine import check_worker_paths, execution

        with Client(cluster.address, timeout=30) as c, execution(c) as runner:
            with pytest.raises(InputError, match="cannot see the store /nonexistent/s.zarr"):
                check_worker_paths(runner, {"store": "/nonexistent/s.zarr"})
    finally:
        cluster.close()


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (what `openssl req -x509 ...` in deploy/README.md makes)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spatialscale")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def test_tls_cluster_runs_a_section_and_refuses_plain_tcp(store, reference, tmp_path):
    import dask
    from distributed import Client
    from distributed.security import Security

    cert, key = _self_signed(tmp_path)
    tls = ["--tls-ca-file", str(cert), "--tls-cert", str(cert), "--tls-key", str(key)]
    cluster = _Cluster(tmp_path, tls=tls)
    try:
        assert cluster.address.startswith("tls://")
        sec = Security(tls_ca_file=str(cert), tls_client_cert=str(cert), tls_client_key=str(key),
                       require_encryption=True)
        _wait_workers(cluster.address, security=sec)
        config = {"distributed.comm.tls.ca-file": str(cert), "distributed.comm.tls.client.cert": str(cert),
                  "distributed.comm.tls.client.key": str(key), "distributed.comm.require-encryption": True}
        with dask.config.set(config):
            ds = spatialscale.sv_test(store, scheduler=cluster.address, progress=False)
        np.testing.assert_array_equal(ds["sv_pvalue"].values, reference["sv_pvalue"].values)
        plain = cluster.address.replace("tls://", "tcp://")
        with pytest.raises((OSError, TimeoutError)):
            Client(plain, timeout=5)
        other = tmp_path / "other"
        other.mkdir()
        stranger_cert, stranger_key = _self_signed(other)
        stranger = Security(tls_ca_file=str(stranger_cert), tls_client_cert=str(stranger_cert),
                            tls_client_key=str(stranger_key), require_encryption=True)
        with pytest.raises((OSError, TimeoutError)):  # TLS with a certificate the cluster does not trust
            Client(cluster.address, timeout=5, security=stranger)
    finally:
        cluster.close()


def test_local_clusters_listen_on_loopback_only():
    from distributed import Client

    from spatialscale.engine import local_cluster

    cluster = local_cluster(1, "cpu")
    try:
        with Client(cluster) as c:
            c.wait_for_workers(1, timeout=60)
            addresses = [cluster.scheduler_address, *c.scheduler_info()["workers"]]
            assert all(a.startswith("tcp://127.0.0.1:") for a in addresses), addresses
            assert "127.0.0.1" in c.dashboard_link
    finally:
        cluster.close()
