"""Data sets in object storage (s3://) against a real S3-compatible server on 127.0.0.1.

The server is moto in server mode (what s3fs's own test suite uses), started by a fixture; the
photos are uploaded by the fixture from a local folder that the tests also read directly, so
"same as local" is checked against the very same bytes. A small HTTP proxy in front of the server
(:class:`FaultProxy`) injects throttling (503 SlowDown), connections cut in the middle of a body,
and a gate that holds every read after the first N (for a deterministic ``kill -9``).

Credentials are fake but secret-looking (:data:`SECRET`); every file written and every line
printed is searched for them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

pytestmark = [pytest.mark.s3]
pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

import catsdogs  # noqa: E402
from catsdogs.dataset.layout import digest_all, open_dataset  # noqa: E402
from catsdogs.dataset.storage import bytes_read, data_location  # noqa: E402
from catsdogs.testing import (  # noqa: E402
    ObjectStoreProxy,
    ProxyHandler,
    make_kaggle_dataset,
    start_s3_server,
    write_jpeg,
)

KEY_ID = "AKIACATSDOGSTESTKEY1"
SECRET = "s3cr3t-Catsdogs-Never-Written-0123456789"
BUCKET = "photos"
TINY = {"weights": "none", "image_size": 32, "batch_size": 4, "chunk_size": 4, "progress": False}
CREDENTIALS = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
               "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (a free port) with the test credentials in the environment;
    yields its endpoint URL."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _upload(endpoint: str, root: Path, prefix: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(root).as_posix()}")


@pytest.fixture(scope="module")
def photos(s3, tmp_path_factory) -> tuple[Path, str]:
    """A Kaggle-layout data set with odd files, as a local folder and uploaded to
    ``s3://photos/odd``: an empty photo, a truncated one, an HTML page named .jpg, a text file,
    a hidden file, and a zero-byte "folder marker" object (buckets only)."""
    root = make_kaggle_dataset(tmp_path_factory.mktemp("local") / "odd", n_per_class=6, n_test=4)
    (root / "train" / "cat.90.jpg").write_bytes(b"")
    full = write_jpeg(root / "train" / "dog.90.jpg", seed=90, size=(64, 48)).read_bytes()
    (root / "train" / "dog.90.jpg").write_bytes(full[: len(full) // 2])
    (root / "train" / "cat.91.jpg").write_text("<!DOCTYPE html><html>Access denied</html>")
    (root / "train" / "notes.txt").write_text("not a photo")
    (root / "train" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    _upload(s3, root, "odd")
    import boto3

    boto3.client("s3", endpoint_url=s3).put_object(Bucket=BUCKET, Key="odd/train/", Body=b"")
    return root, f"s3://{BUCKET}/odd"


def _url(url: str, endpoint: str):
    return data_location(url, {"endpoint_url": endpoint})


def _texts_under(*folders: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for f in folders for p in f.rglob("*") if p.is_file()]


def _assert_no_secret(*texts: str, folders: tuple[Path, ...] = ()) -> None:
    for text in texts:
        assert SECRET not in text and KEY_ID not in text
    for path, data in _texts_under(*folders):
        assert SECRET.encode() not in data and KEY_ID.encode() not in data, path


# ------------------------------------------------------------------------------------ proxy
class FaultProxy(ObjectStoreProxy):
    """An HTTP proxy on 127.0.0.1 in front of the S3 server. For object GETs (not listings):

    * ``faults``: for every object, its reads cycle through a 503 SlowDown answer, a body cut
      in the middle (the connection closed after half of it), then a good answer;
    * ``hold_after``: the first N object GETs are served, later ones wait until ``release``
      is set (a deterministic gate for ``kill -9``).

    ``good`` counts the full bodies served per key; ``injected`` the faults."""

    def __init__(self, upstream: str, faults: bool = False, hold_after: int | None = None):
        self.faults, self.hold_after = faults, hold_after
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.gets = 0
        self.seen: dict[str, int] = {}
        self.good: dict[str, int] = {}
        self.injected = 0
        super().__init__(upstream)

    def object_get(self, handler: ProxyHandler, key: str) -> None:
        with self.lock:
            self.gets += 1
            nth = self.seen[key] = self.seen.get(key, 0) + 1
            held = self.hold_after is not None and self.gets > self.hold_after
        if held:
            self.release.wait()
        fault = (nth - 1) % 3 if self.faults else 2
        if fault == 0:
            with self.lock:
                self.injected += 1
            body = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                    b"<Message>Please reduce your request rate.</Message></Error>")
            handler.answer(503, [("Content-Type", "application/xml")], body)
            return
        status, headers, data = handler.forward()
        if fault == 1 and status == 200 and len(data) > 1:
            with self.lock:
                self.injected += 1
            handler.answer(status, headers, data, cut=True)
            return
        if status == 200:
            with self.lock:
                self.good[key] = self.good.get(key, 0) + 1
        handler.answer(status, headers, data)


# ------------------------------------------------------------------------------------ tests
def test_listing_and_odd_files_are_those_of_the_local_folder(s3, photos):
    local_root, url = photos
    local, remote = open_dataset(local_root), open_dataset(_url(url, s3))
    assert str(remote.root) == url and remote.layout == local.layout == "kaggle"
    for split in ("train", "test"):
        a, b = getattr(local, split), getattr(remote, split)
        assert [(r.relpath, r.label, r.id) for r in a] == [(r.relpath, r.label, r.id) for r in b]
    assert sorted(local.ignored) == sorted(remote.ignored)  # notes.txt; hidden files skipped
    assert [rel for rel, _ in remote.ignored] == ["train/notes.txt"]
    assert digest_all(remote.records) == digest_all(local.records)


def test_features_equal_local_and_reuse_the_local_cache_file(s3, photos, tmp_path, caplog):
    local_root, url = photos
    cache = tmp_path / "cache"
    (local,) = catsdogs.extract(local_root, "resnet50", cache_dir=cache, flip=True, **TINY)
    assert local.computed == 12 + 4 and {f for f, _ in local.skipped} == {
        "train/cat.90.jpg", "train/dog.90.jpg", "train/cat.91.jpg"}
    (again,) = catsdogs.extract(_url(url, s3), "resnet50", cache_dir=cache, flip=True, **TINY)
    assert again.computed == 0 and again.path == local.path  # the same cache file, reused
    (fresh,) = catsdogs.extract(_url(url, s3), "resnet50", cache_dir=tmp_path / "fresh", flip=True,
                                **TINY)
    assert fresh.computed == 16 and fresh.path.name == local.path.name
    assert sorted(fresh.skipped) == sorted(local.skipped)  # same odd-file reasons
    a, b = catsdogs.load_features(local.path), catsdogs.load_features(fresh.path)
    for split in ("train", "test"):
        sa, sb = getattr(a, split), getattr(b, split)
        assert sa.files == sb.files and sa.digests == sb.digests
        assert np.array_equal(sa.X, sb.X) and np.array_equal(sa.X_flip, sb.X_flip)
    assert b.meta["dataset_root"] == url


def test_throttling_and_cut_connections_lose_and_duplicate_nothing(s3, photos, tmp_path):
    local_root, url = photos
    proxy = FaultProxy(s3, faults=True)
    try:
        ds = open_dataset(_url(url, proxy.url))
        (res,) = catsdogs.extract(_url(url, proxy.url), "resnet50", cache_dir=tmp_path / "c",
                                  dataset=ds, **TINY)
    finally:
        proxy.shutdown()
    keys = {f"odd/{r.relpath}" for r in ds.records}
    assert proxy.injected >= 2 * len(keys)  # every object throttled and cut at least once
    assert set(proxy.good) == keys  # every object finally read
    (clean,) = catsdogs.extract(local_root, "resnet50", cache_dir=tmp_path / "local", **TINY)
    a, b = catsdogs.load_features(clean.path), catsdogs.load_features(res.path)
    assert sorted(res.skipped) == sorted(clean.skipped)  # only the odd files, for their own reasons
    for split in ("train", "test"):
        sa, sb = getattr(a, split), getattr(b, split)
        assert sa.files == sb.files and len(set(sb.files)) == len(sb.files)  # none lost, none twice
        assert sa.digests == sb.digests and np.array_equal(sa.X, sb.X)


def test_cli_reads_the_bucket_and_writes_no_credentials(s3, photos, tmp_path):
    _, url = photos
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": s3}
    cache = tmp_path / "cache"
    proc = run_cli("extract", url, "-b", "resnet50", "--weights", "none", "--image-size", "32",
                   "--cache-dir", str(cache), "--no-progress", env=env, check=True)
    assert "12 train + 4 test rows (16 computed" in proc.stdout
    assert proc.stderr.count("skipped train/") == 3 and "ignored train/notes.txt" in proc.stderr
    # an experiment file naming the bucket, its endpoint and (badly) its keys in storage_options
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"data: {url}\nstorage_options: {{endpoint_url: '{s3}', key: {KEY_ID}, "
                   f"secret: {SECRET}}}\nbackbones: [{{name: resnet50, image_size: 32}}]\n"
                   "heads: [dropout_sigmoid]\noptimizers: [adam]\nweights: none\nepochs: 1\n")
    out = tmp_path / "runs"
    env_no_keys = {"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                   "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    ran = run_cli("run", str(exp), "--weights", "none", "--cache-dir", str(cache), "--out", str(out),
                  "--no-progress", env=env_no_keys)
    assert ran.returncode == 0, ran.stderr
    assert (out / "leaderboard.csv").is_file()
    _assert_no_secret(proc.stdout, proc.stderr, ran.stdout, ran.stderr, folders=(cache, out))


def test_wrong_bucket_and_no_client_are_one_error_line_before_any_work(s3, tmp_path):
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": s3}
    cache = tmp_path / "cache"
    proc = run_cli("extract", "s3://no-such-bucket/set", "-b", "resnet50", "--weights", "none",
                   "--cache-dir", str(cache), env=env)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and lines == [
        "Error: data directory 's3://no-such-bucket/set': the bucket does not exist (The "
        "specified bucket does not exist); check its name"]
    assert not cache.exists()
    proc = run_cli("extract", f"s3://{BUCKET}/nothing-here", "-b", "resnet50", "--cache-dir",
                   str(cache), env=env)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        f"Error: data directory 's3://{BUCKET}/nothing-here' does not exist or holds no objects; "
        "check the URL"]
    proc = run_cli("extract", "ftp://host/set", "-b", "resnet50", env=env)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        "Error: data directory 'ftp://host/set': unsupported URL scheme 'ftp'; use a local path, "
        "file://, s3://, gs:// or az://"]


def _chunk_markers(cache: Path) -> list[Path]:
    return sorted(cache.rglob("chunk-*.json"))


@pytest.mark.slow
def test_kill_9_then_resume_from_the_bucket(s3, tmp_path):
    root = make_kaggle_dataset(tmp_path / "big", n_per_class=30, n_test=20)  # 80 photos
    _upload(s3, root, "big")
    url = f"s3://{BUCKET}/big"
    # every photo is read once to hash it, then 3 chunks of 8 are read: then reads are held
    proxy = FaultProxy(s3, hold_after=80 + 3 * 8)
    cache = tmp_path / "killed"
    cmd = [sys.executable, "-m", "catsdogs", "extract", url, "-b", "resnet50", "--weights", "none",
           "--image-size", "32", "--batch-size", "8", "--chunk-size", "8", "--cache-dir", str(cache),
           "--no-progress"]
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": proxy.url, "CATSDOGS_READERS": "4"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 300
        while len(_chunk_markers(cache)) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None and len(_chunk_markers(cache)) >= 3
        os.kill(proc.pid, signal.SIGKILL)  # it waits on a held read: it cannot have finished
        proc.wait()
    finally:
        proxy.release.set()
        proxy.shutdown()
    done = len(_chunk_markers(cache))
    assert 3 <= done < 10 and not list(cache.rglob("*.h5"))
    (resumed,) = catsdogs.extract(_url(url, s3), ["resnet50"], weights="none", image_size=32,
                                  batch_size=8, chunk_size=8, cache_dir=cache, progress=False)
    assert resumed.computed == 80 - 8 * done and resumed.reused == 8 * done
    (clean,) = catsdogs.extract(root, ["resnet50"], weights="none", image_size=32, batch_size=8,
                                cache_dir=tmp_path / "clean", progress=False)
    a, b = catsdogs.load_features(resumed.path), catsdogs.load_features(clean.path)
    assert a.train.files == b.train.files and a.test.files == b.test.files
    np.testing.assert_allclose(a.train.X, b.train.X, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.test.X, b.test.X, rtol=1e-5, atol=1e-6)


def test_local_engine_reads_with_its_reader_pool(s3, photos, monkeypatch):
    """Reads go through the reader threads (named catsdogs-read), CATSDOGS_READERS at a time."""
    _, url = photos
    from catsdogs.dataset import payload

    ds = open_dataset(_url(url, s3))
    seen: set[str] = set()
    real = payload.payload_bytes

    def spy(item):
        seen.add(threading.current_thread().name.split("_")[0])
        return real(item)

    monkeypatch.setattr(payload, "payload_bytes", spy)
    before = bytes_read()
    items = payload.prefetch([str(r.path) for r in ds.train])
    got = [real(i) for i in items]
    assert all(isinstance(g, bytes) for g in got[:6]) and bytes_read() > before
    assert seen == {"catsdogs-read"}


def test_file_url_is_a_local_folder(photos, tmp_path):
    local_root, _ = photos
    copy = tmp_path / "copy"
    shutil.copytree(local_root, copy)
    ds = open_dataset(f"file://{copy}")
    assert ds.root == copy.resolve() and len(ds.train) == 15


@pytest.fixture
def strict_s3():
    """A second S3 server that checks credentials (moto_server with IAM auth enforced from the
    first request), in a subprocess on a free 127.0.0.1 port; yields its endpoint."""
    server, endpoint = start_s3_server(env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        yield endpoint
    finally:
        server.terminate()
        server.wait()


def test_no_or_wrong_credentials_are_one_error_line_before_any_work(strict_s3, tmp_path):
    cache = tmp_path / "cache"
    base = {"AWS_ENDPOINT_URL": strict_s3, "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_DEFAULT_REGION": "us-east-1"}
    hint = ("give them the way s3fs reads them (environment variables, a profile, or "
            "storage_options: in the experiment file)")
    for creds, why in (({}, "Unable to locate credentials"),
                       ({"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET},
                        "The AWS Access Key Id you provided does not exist in our records.")):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_ACCESS", "AWS_SECRET"))}
        proc = subprocess.run([sys.executable, "-m", "catsdogs", "extract", f"s3://{BUCKET}/set",
                               "-b", "resnet50", "--cache-dir", str(cache)],
                              env={**env, **base, **creds}, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
            f"Error: data directory 's3://{BUCKET}/set': no usable credentials ({why}); {hint}"]
        _assert_no_secret(proc.stdout, proc.stderr)
        assert not cache.exists()


# ------------------------------------------------------------------------------------ Ray
@pytest.fixture(scope="module")
def ray_cluster(s3):
    """A 2-node Ray cluster on loopback (a head and a second node of one CPU each), started after
    the credentials are in the environment (workers find them where a cluster's nodes would)."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.ray
@pytest.mark.slow
def test_ray_workers_read_the_bucket_themselves(s3, photos, ray_cluster, tmp_path):
    """The driver lists the bucket and sends keys: it reads no photo byte (digests and features
    both computed by the workers, which fetch every object from the server), and the cache file
    equals the local engine's on the same photos."""
    import ray

    from catsdogs.engine import open_engine

    local_root, url = photos
    proxy = FaultProxy(s3)  # counts the objects served
    try:
        before = bytes_read()
        with open_engine("ray") as engine:
            (res,) = catsdogs.extract(_url(url, proxy.url), "resnet50", cache_dir=tmp_path / "ray",
                                      flip=True, engine=engine, **TINY)
        driver_bytes = bytes_read() - before
    finally:
        proxy.shutdown()
    assert driver_bytes == 0
    ds = open_dataset(local_root)
    keys = {f"odd/{r.relpath}" for r in ds.records if r.path.stat().st_size}
    assert keys <= set(proxy.good)  # every photo was fetched from the server (by the workers)
    (local,) = catsdogs.extract(local_root, "resnet50", cache_dir=tmp_path / "local", flip=True,
                                **TINY)
    assert sorted(res.skipped) == sorted(local.skipped) and res.computed == local.computed == 16
    a, b = catsdogs.load_features(local.path), catsdogs.load_features(res.path)
    for split in ("train", "test"):
        sa, sb = getattr(a, split), getattr(b, split)
        assert sa.files == sb.files and sa.digests == sb.digests
        assert np.abs(sa.X - sb.X).max() <= 1e-4 and np.abs(sa.X_flip - sb.X_flip).max() <= 1e-4
    nodes = b.meta["engine"]["nodes"]  # the nodes that computed chunks
    assert len(nodes) == 2 and set(nodes) == {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def test_audit_with_label_issues_reads_the_bucket_like_the_folder(s3, tmp_path):
    """`audit DATA_DIR --label-issues` on a bucket: every check (tiny, colour, unreadable,
    ignored, label issues from the cached features) and the contact sheet of flagged photos
    (which reads them again, by URL) equal the same audit of the local folder."""
    import dataclasses

    from test_audit import FAST, install_tiny_classifier, make_audit_data, tiny_classifier_registry

    from catsdogs.audit.checks import audit

    registry = tiny_classifier_registry(install_tiny_classifier(tmp_path / "site"))
    root = make_audit_data(tmp_path / "audit-data")
    _upload(s3, root, "audit")
    kw = {**FAST, "registry": registry, "label_issues": True}
    local = audit(root, tmp_path / "out-local", cache_dir=tmp_path / "c1", **kw)
    remote = audit(_url(f"s3://{BUCKET}/audit", s3), tmp_path / "out-s3",
                   cache_dir=tmp_path / "c2", **kw)

    def rows(result):
        return sorted((dataclasses.replace(a, label_issue_score=None) for a in result.images),
                      key=lambda a: a.file)

    assert [a.file for a in rows(local)] == [a.file for a in rows(remote)]
    for a, b in zip(rows(local), rows(remote)):
        assert a == b or (a.flags == b.flags and a.reason == b.reason), (a, b)
    assert {a.file for a in remote.images if a.flagged} >= {"train/cat.9.jpg", "train/cat.10.jpg"}
    assert sorted(p.name for p in (tmp_path / "out-s3").iterdir()) == sorted(
        p.name for p in (tmp_path / "out-local").iterdir())
