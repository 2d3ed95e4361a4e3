"""Benchmark: photos read from an S3-compatible server on 127.0.0.1 vs the same photos on local disk.

Measured in ONE process, on the same photos (``--limit`` PetImages, half cats and half dogs, copied
into a Kaggle layout and uploaded to a moto S3 server started here in a subprocess):

* **read + decode** (what the local engine's readers and decoders do, no network model):
  images/s of :func:`catsdogs.dataset.payload.prefetch` + decode/resize to 224 over all photos,
  from local disk and from the bucket with ``CATSDOGS_READERS`` = 1, 4, 16; also through a proxy
  adding ``--latency-ms`` per object GET (a far-away store), where the reader pool matters;
* **extraction** (the whole ``catsdogs.extract`` call, tiny ResNet50 with weights none at 64 px,
  so decoding is a fair share of the time): images/s local vs bucket;
* **listing**: seconds for one listing of ``--list-objects`` tiny objects (one paginated
  ``list_objects_v2``, 1,000 keys a page), projected linearly to 100,000;
* **layout rules**: seconds to apply the layout rules to a ``--layout-objects`` listing (no
  server) against :func:`~catsdogs.dataset.layout.open_dataset` of the same names as empty files;
* with ``--ray``: the same extraction on a 2-node loopback Ray cluster from the bucket, and the
  driver's photo bytes read per photo (:func:`catsdogs.dataset.storage.bytes_read`; goal 0).

moto answers from memory on this machine: the "bucket" has loopback latency unless
``--latency-ms`` adds some. Other processes on the machine disturb absolute numbers; the ratios
are measured back to back.

Usage::

    python bench/object_storage.py [--photos /work/data/PetImages] [--limit 400]
                                   [--latency-ms 30] [--list-objects 5000]
                                   [--layout-objects 100000] [--ray]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from catsdogs.util.tf_log import quiet_tensorflow_import  # noqa: E402

quiet_tensorflow_import()  # its absl start-up lines held to that level too (as the CLI does)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
               "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
os.environ.update(CREDENTIALS)

import catsdogs  # noqa: E402
from catsdogs.dataset import storage  # noqa: E402
from catsdogs.dataset.images import ImageDecodeError, decode_rgb, resize  # noqa: E402
from catsdogs.dataset.layout import open_dataset  # noqa: E402
from catsdogs.dataset.payload import payload_bytes, prefetch  # noqa: E402
from catsdogs.testing import ObjectStoreProxy, ProxyHandler, start_s3_server  # noqa: E402

BUCKET = "bench"


class LatencyProxy(ObjectStoreProxy):
    """Forwards to the server, sleeping ``latency`` seconds before each object GET."""

    def __init__(self, upstream: str, latency: float):
        self.latency = latency
        super().__init__(upstream)

    def object_get(self, handler: ProxyHandler, key: str) -> None:
        time.sleep(self.latency)
        handler.answer(*handler.forward())


def make_data(photos: Path, dst: Path, limit: int) -> Path:
    """``limit`` decodable PetImages photos (half cats, half dogs) as train/cat.N.jpg ..."""
    train = dst / "train"
    train.mkdir(parents=True)
    for label, folder in (("cat", "Cat"), ("dog", "Dog")):
        n = 0
        for path in sorted((photos / folder).glob("*.jpg"), key=lambda p: int(p.stem)):
            if n >= limit // 2:
                break
            try:
                decode_rgb(path.read_bytes())
            except ImageDecodeError:
                continue
            shutil.copyfile(path, train / f"{label}.{path.stem}.jpg")
            n += 1
    return dst


def upload(endpoint: str, root: Path, prefix: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: client.upload_file(str(p), BUCKET, f"{prefix}/{p.relative_to(root).as_posix()}"),
                      files))


def read_decode(records, workers: int = 2) -> float:
    """images/s of reading (readers ahead) and decoding + resizing to 224 every record."""
    t0 = time.perf_counter()
    items = prefetch([r.path if isinstance(r.path, storage.ObjectPath) else str(r.path) for r in records])
    with ThreadPoolExecutor(workers) as pool:
        out = list(pool.map(lambda i: resize(decode_rgb(payload_bytes(i)), 224), items))
    assert len(out) == len(records)
    return len(records) / (time.perf_counter() - t0)


def set_readers(n: int) -> None:
    import catsdogs.dataset.payload as payload

    os.environ["CATSDOGS_READERS"] = str(n)
    payload._readers = None  # a new pool of n readers


def layout_rules(n: int, work: Path) -> None:
    """Seconds to apply the layout rules to an n-object listing (no server: what our code adds
    to the listing's pages) against open_dataset of the same names as empty local files."""
    from catsdogs.dataset import layout

    names = [f"train/{c}.{i}.jpg" for i in range(n * 9 // 20) for c in ("cat", "dog")]
    names += [f"test/{i}.jpg" for i in range(n - len(names))]
    folder = work / "names"
    for sub in ("train", "test"):
        (folder / sub).mkdir(parents=True)
    for name in names:
        (folder / name).touch()
    t0 = time.perf_counter()
    a = open_dataset(folder)
    t_local = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = layout._scan(layout._Node(layout._tree(dict.fromkeys(names, 1)), ()), "s3://b/p")
    t_remote = time.perf_counter() - t0
    assert [r.relpath for r in a.records] == [r.relpath for r in b.records]
    print(f"\nlayout rules over {n} names: listing tree {t_remote:.2f} s, the same names in a local "
          f"folder {t_local:.2f} s (tree / folder = {t_remote / t_local:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=Path, default=Path("/work/data/PetImages"))
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--latency-ms", type=float, default=30.0)
    ap.add_argument("--list-objects", type=int, default=5000)
    ap.add_argument("--layout-objects", type=int, default=100_000)
    ap.add_argument("--ray", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="catsdogs-bench-s3-"))
    server, endpoint = start_s3_server()
    proxy = None
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        local_root = make_data(args.photos, work / "photos", args.limit)
        upload(endpoint, local_root, "photos")
        mb = sum(p.stat().st_size for p in local_root.rglob("*.jpg")) / 1e6
        print(f"{args.limit} photos, {mb:.1f} MB; S3 server: moto on {endpoint}")

        url = storage.data_location(f"s3://{BUCKET}/photos", {"endpoint_url": endpoint})
        local = open_dataset(local_root).records
        t0 = time.perf_counter()
        remote = open_dataset(url).records
        print(f"listing {len(remote)} objects: {time.perf_counter() - t0:.2f} s")

        rows = [("local disk", None, read_decode(local))]
        for n in (1, 4, 16):
            set_readers(n)
            rows.append(("bucket", n, read_decode(remote)))
        proxy = LatencyProxy(endpoint, args.latency_ms / 1000)
        slow = open_dataset(storage.data_location(f"s3://{BUCKET}/photos",
                                                  {"endpoint_url": proxy.url})).records
        for n in (1, 4, 16):
            set_readers(n)
            rows.append((f"bucket +{args.latency_ms:g} ms/GET", n, read_decode(slow)))
        print("\nread + decode + resize to 224 (2 decoding threads)")
        base = rows[0][2]
        for where, readers, rate in rows:
            print(f"  {where:<22} readers {readers if readers else '-':>2}: {rate:7.1f} images/s "
                  f"({rate / base:.2f}x local)")

        set_readers(16)
        tiny = {"weights": "none", "image_size": 64, "progress": False}
        (a,) = catsdogs.extract(local_root, "resnet50", cache_dir=work / "c-local", **tiny)
        before = storage.bytes_read()
        (b,) = catsdogs.extract(url, "resnet50", cache_dir=work / "c-bucket", **tiny)
        print(f"\nextract (resnet50, weights none, 64 px, local engine), images/s of the compute loop: "
              f"local {a.images_per_second:.1f}, bucket {b.images_per_second:.1f} "
              f"({b.images_per_second / a.images_per_second:.2f}x); driver read "
              f"{(storage.bytes_read() - before) / max(1, b.computed):.0f} bytes/photo from the bucket "
              "(hash + decode: each photo twice)")

        if args.list_objects:
            import boto3

            client = boto3.client("s3", endpoint_url=endpoint)
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda i: client.put_object(Bucket=BUCKET, Key=f"many/train/cat.{i}.jpg",
                                                          Body=b"x"), range(args.list_objects)))
            storage._filesystems.clear()
            t0 = time.perf_counter()
            found = storage.ObjectStore(storage.data_location(f"s3://{BUCKET}/many",
                                                              {"endpoint_url": endpoint})).listing()
            dt = time.perf_counter() - t0
            t0 = time.perf_counter()
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="many/")
            raw = sum(len(page.get("Contents", [])) for page in pages)
            dt_raw = time.perf_counter() - t0
            print(f"\nlisting {len(found)} objects: {dt:.2f} s; the same pages with boto3's own "
                  f"paginator: {raw} objects in {dt_raw:.2f} s (ours / boto3 = {dt / dt_raw:.2f}; "
                  "the time is the server's: moto scans its whole bucket for every page)")

        if args.layout_objects:
            layout_rules(args.layout_objects, work)

        if args.ray:
            import ray
            from ray.cluster_utils import Cluster

            from catsdogs.engine import open_engine

            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
            try:
                with open_engine("ray") as engine:
                    before = storage.bytes_read()
                    (r,) = catsdogs.extract(url, "resnet50", cache_dir=work / "c-ray", engine=engine, **tiny)
                    driver = storage.bytes_read() - before
                    (rl,) = catsdogs.extract(local_root, "resnet50", cache_dir=work / "c-ray-local",
                                             engine=engine, **tiny)
                print(f"\nRay (2-node loopback, 1 CPU each), images/s of the compute loop: bucket "
                      f"{r.images_per_second:.1f}, local disk (bytes shipped by the driver) "
                      f"{rl.images_per_second:.1f}; "
                      f"driver read {driver / max(1, r.computed):.0f} photo bytes per photo from the bucket")
            finally:
                ray.shutdown()
                cluster.shutdown()
    finally:
        if proxy is not None:
            proxy.shutdown()
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
