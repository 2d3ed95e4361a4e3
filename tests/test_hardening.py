"""Issue 9: inputs an attacker or a careless user would try, one section per item of the issue.

Every test drives the real parts (real JPEG/PNG bytes, real HDF5 files, the real CLI in a
subprocess) and failed on the code before the fix. Tests that must not run as root (root ignores
file permissions) run the CLI as ``nobody`` with ``setpriv`` (see :func:`as_nobody`), or as root
without CAP_DAC_OVERRIDE where ``nobody`` cannot reach the interpreter. Other helpers
append their items as further sections, in item order.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY, assert_same_features, make_kaggle, run_cli, write_jpeg
from PIL import Image

from catsdogs.dataset.images import ImageDecodeError, decode_rgb, load_image
from catsdogs.dataset.layout import digest_all, open_dataset
from catsdogs.errors import DataError

NOBODY = 65534


def _jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _noise(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _extract(root: Path, cache: Path, **kw):
    import catsdogs

    opts = {**TINY, "cache_dir": cache, "progress": False, **kw}
    return catsdogs.extract(root, opts.pop("backbones"), **opts)


def _one_error_line(proc) -> str:
    """The CLI failed with exactly one ``Error:`` line and no traceback; returns that line."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


# --- running the CLI without root's power over file permissions ---------------------------------
#: setpriv arguments that make a process obey file permissions: as user ``nobody`` (uid 65534, no
#: groups), or -- where ``nobody`` cannot reach our interpreter or site-packages (tox makes
#: ``.tox/`` mode 0700) -- as root without the two capabilities that bypass file permissions.
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
AS_ROOT_WITHOUT_DAC = ("setpriv", "--bounding-set=-dac_override,-dac_read_search",
                       "--inh-caps=-dac_override,-dac_read_search")


def _site() -> str:
    return sysconfig.get_paths()["purelib"]


def _unprivileged_launcher() -> tuple[tuple[str, ...], str] | None:
    """``(setpriv prefix, python)`` with which the CLI imports and a file of mode 000 is unreadable."""
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    probe_file = Path(tempfile.mkdtemp(prefix="catsdogs-probe-"))
    probe_file.chmod(0o755)
    secret = probe_file / "secret"
    secret.write_text("x")
    secret.chmod(0o000)
    code = ("import site, sys; site.addsitedir(sys.argv[1]); sys.path.insert(0, sys.argv[2]); "
            "import pluggy, catsdogs\ntry:\n open(sys.argv[3])\nexcept PermissionError:\n "
            "sys.exit(0)\nsys.exit(3)")
    try:
        candidates = [(AS_NOBODY, os.path.realpath(c)) for c in
                      (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}")]
        candidates.append((AS_ROOT_WITHOUT_DAC, sys.executable))
        for prefix, python in candidates:
            probe = subprocess.run([*prefix, python, "-c", code, _site(), str(REPO), str(secret)],
                                   capture_output=True, cwd="/")
            if probe.returncode == 0:
                return prefix, python
        return None
    finally:
        shutil.rmtree(probe_file)


@pytest.fixture(scope="module")
def nobody_python() -> tuple[tuple[str, ...], str]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the CLI without root's file access")
    launcher = _unprivileged_launcher()
    if launcher is None:
        pytest.skip("neither nobody nor root without CAP_DAC_OVERRIDE can run our interpreter")
    return launcher


@pytest.fixture
def shared_tmp():
    """A temporary folder outside pytest's root-only tmp, readable by ``nobody``."""
    path = Path(tempfile.mkdtemp(prefix="catsdogs-hardening-"))
    path.chmod(0o755)
    home = path / "home"
    home.mkdir()
    home.chmod(0o777)
    yield path
    for p in [path, *path.rglob("*")]:  # give write permission back so that it can be removed
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(path)


def as_nobody(launcher: tuple[tuple[str, ...], str], home: Path, *args: str, timeout: float = 600):
    """Run ``catsdogs ARGS`` without root's file access (see :data:`AS_NOBODY`) with our
    site-packages."""
    prefix, python = launcher
    code = ("import site, sys; site.addsitedir(sys.argv.pop(1)); "
            f"sys.path.insert(0, {str(REPO)!r}); from catsdogs.cli import main; main(sys.argv[1:])")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "KERAS_HOME": str(home / ".keras"), "MPLCONFIGDIR": str(home / ".mpl"),
           "TF_CPP_MIN_LOG_LEVEL": "2", "CATSDOGS_CACHE_DIR": str(home / "cache")}
    return subprocess.run([*prefix, python, "-c", code, _site(), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


# === item 1: test ids are never invented ===========================================================
def test_item1_non_numeric_test_names_are_skipped_not_renumbered(tmp_path):
    make_kaggle(tmp_path, n_per_class=1, n_test=3)
    write_jpeg(tmp_path / "test" / "10.jpg", 10)
    odd = ["abc.jpg", "\u00b2.jpg", "\u0663.jpg", "1\u00b3.jpg", "99999999999999999999999.jpg"]
    for i, name in enumerate(odd):
        write_jpeg(tmp_path / "test" / name, 20 + i)
    ds = open_dataset(tmp_path)
    assert [(r.id, r.relpath) for r in ds.test] == [
        (1, "test/1.jpg"), (2, "test/2.jpg"), (3, "test/3.jpg"), (10, "test/10.jpg")]
    ignored = dict(ds.ignored)
    for name in odd:
        assert "not a numeric id" in ignored[f"test/{name}"]


def test_item1_unicode_digits_never_crash(tmp_path):
    write_jpeg(tmp_path / "train" / "cat.\u00b2.jpg", 1)
    write_jpeg(tmp_path / "train" / "dog.\u0663.jpg", 2, label=1)
    write_jpeg(tmp_path / "cat" / "x" / "\u00b3.jpg", 3)
    ds = open_dataset(tmp_path)  # int('²') used to raise ValueError
    assert len(ds.train) == 2
    from catsdogs.runs.submission import write_submission

    with pytest.raises(DataError, match="not an integer"):
        write_submission(tmp_path / "s.csv", ["\u00b2"], [0.5])


def test_item1_cli_reports_the_skipped_test_file(tmp_path):
    make_kaggle(tmp_path / "d", n_per_class=1, n_test=2)
    write_jpeg(tmp_path / "d" / "test" / "abc.jpg", 9)
    proc = run_cli("extract", str(tmp_path / "d"), "-b", "resnet50", "--weights", "none",
                   "--image-size", "32", "--cache-dir", str(tmp_path / "c"), "--no-progress",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    assert "test/abc.jpg: test file name is not a numeric id" in proc.stderr
    assert json.loads(proc.stdout)[0]["n_test"] == 2


# === item 2: a corrupt cache is never used =========================================================
def _dataset_offset(path: Path, name: str) -> tuple[int, int]:
    import h5py

    with h5py.File(path, "r") as h5:
        ds = h5[name]
        return ds.id.get_offset(), ds.id.get_storage_size()


def test_item2_overwritten_feature_rows_are_detected_and_recomputed(kaggle_dir, tmp_path, caplog):
    import catsdogs

    (res,) = _extract(kaggle_dir, tmp_path / "c")
    good = catsdogs.load_features(res.path)
    offset, size = _dataset_offset(res.path, "train/features")
    with open(res.path, "r+b") as fh:  # zeros into train/features, as in the issue
        fh.seek(offset + size // 3)
        fh.write(bytes(size // 3))
    with pytest.raises(DataError, match="corrupt feature file.*train/features rows 0-11"):
        catsdogs.load_features(res.path)
    with caplog.at_level(logging.WARNING, logger="catsdogs"):
        (again,) = _extract(kaggle_dir, tmp_path / "c")
    assert "corrupt cache file" in caplog.text and "recomputing those rows" in caplog.text
    assert (again.computed, again.reused) == (12, 4)  # the damaged block only; test rows reused
    fixed = catsdogs.load_features(again.path)
    assert_same_features(fixed.train.X, good.train.X)
    np.testing.assert_array_equal(fixed.test.X, good.test.X)


def test_item2_a_data_set_without_test_photos_loads_and_verifies(tmp_path):
    """Empty splits carry checksums too: a train-only data set's cache loads and a reused one is
    verified without being called corrupt."""
    import catsdogs

    make_kaggle(tmp_path / "d", n_per_class=3, n_test=0)
    (res,) = _extract(tmp_path / "d", tmp_path / "c")
    fs = catsdogs.load_features(res.path)
    assert (len(fs.train.y), len(fs.test.y)) == (6, 0)
    (again,) = _extract(tmp_path / "d", tmp_path / "c")
    assert (again.computed, again.reused) == (0, 6)
    assert catsdogs.load_features(again.path).train.X.shape == fs.train.X.shape


@pytest.mark.parametrize("where", ["superblock", "group heaps", "ids column"])
def test_item2_hdf5_metadata_corruption_is_one_clear_error(kaggle_dir, tmp_path, caplog, where):
    import catsdogs

    (res,) = _extract(kaggle_dir, tmp_path / "c")
    data = bytearray(res.path.read_bytes())
    if where == "superblock":
        data[8:64] = bytes(range(56))
    elif where == "group heaps":  # h5py raises KeyError / RuntimeError for these, not OSError
        start = 0
        while (start := data.find(b"HEAP", start) + 1) > 0:
            data[start + 3] = 0xFF  # the local heap's version byte
    else:
        offset, size = _dataset_offset(res.path, "test/ids")
        data[offset:offset + 8] = (12345).to_bytes(8, "little")
    res.path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=str(res.path)):
        catsdogs.load_features(res.path)
    proc = run_cli("extract", str(kaggle_dir), "-b", "resnet50", "--weights", "none",
                   "--image-size", "32", "--cache-dir", str(tmp_path / "c"), "--no-progress",
                   "--json")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "recomputing" in proc.stderr
    assert json.loads(proc.stdout)[0]["computed"] == 16
    catsdogs.load_features(res.path)  # whole again


def test_item2_corrupt_chunk_file_is_not_reused(tmp_path, caplog):
    from catsdogs.features.extraction import FeatureConfig, _Store

    config = FeatureConfig("b", "none", "none", 32, "squash", "float32", "p", 4)
    final = tmp_path / "f.h5"
    _Store(final, config).write_chunk(0, ["a" * 32, "b" * 32], ["orig"],
                                      {"orig": np.arange(8, dtype=np.float32).reshape(2, 4)}, {})
    assert set(_Store(final, config).load().sources) == {"a" * 32, "b" * 32}
    npy = final.with_name("f.h5.partial") / "chunk-000000.orig.npy"
    raw = bytearray(npy.read_bytes())
    raw[-4:] = bytes(4)  # the last value, header intact
    npy.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="catsdogs"):
        store = _Store(final, config).load()
    assert store.sources == {} and "checksum mismatch" in caplog.text


# === item 3: a truncated JPEG with an end-of-image marker appended ==================================
@pytest.mark.parametrize("cut", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("subsampling", [0, 2])
def test_item3_truncated_jpeg_with_eoi_is_unreadable(tmp_path, cut, subsampling):
    full = _jpeg_bytes(_noise(), quality=90, subsampling=subsampling)
    broken = full[:int(len(full) * cut)] + b"\xff\xd9"
    Image.open(io.BytesIO(broken)).load()  # Pillow alone decodes it, grey-filled, silently
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_rgb(broken)
    assert decode_rgb(full).shape == (96, 128, 3)


def test_item3_real_grey_areas_are_not_mistaken_for_truncation():
    arr = _noise()
    arr[40:] = 128  # the lower part really is flat 50 % grey
    for sub in (0, 2):
        out = decode_rgb(_jpeg_bytes(arr, quality=95, subsampling=sub))
        assert (out[-8:, -8:] == 128).all()
    gray = _jpeg_bytes(arr[..., 0])
    assert decode_rgb(gray).shape == (96, 128, 3)


def test_item3_faults_still_behave_as_their_readme_says(faults):
    readable, unreadable = {}, {}
    for path in sorted(faults.iterdir()):
        try:
            readable[path.name] = load_image(path).shape
        except ImageDecodeError as exc:
            unreadable[path.name] = exc.reason
    assert set(readable) == {"cat.90005.jpg", "cat.90007.jpg", "dog.90003.jpg", "dog.90006.jpg",
                             "dog.90008.png"}
    assert all(len(shape) == 3 and shape[2] == 3 for shape in readable.values())
    assert "truncated" in unreadable["cat.90002.jpg"]
    assert set(unreadable) == {"Thumbs.db", "cat.90001.jpg", "cat.90002.jpg", "dog.90004.jpg"}


# === item 6: only regular files are read, with a size cap ===========================================
def _in_subprocess(code: str, timeout: float = 120):
    """Run ``code`` in a fresh interpreter; a hang fails the test instead of hanging it."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_item6_fifo_and_device_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.jpg"
    zero.symlink_to("/dev/zero")
    code = ("from catsdogs.dataset.images import load_image, ImageDecodeError\n"
            f"for p in ({str(fifo)!r}, {str(zero)!r}):\n"
            "    try:\n        load_image(p)\n    except ImageDecodeError as e:\n"
            "        print(e.reason)\n")
    out = _in_subprocess(code, timeout=60)  # used to block on the pipe / read /dev/zero forever
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "a named pipe, not a regular file: only regular files are read",
        "a character device, not a regular file: only regular files are read"]


def test_item6_listing_and_hashing_skip_special_files(tmp_path):
    root = make_kaggle(tmp_path / "d", n_per_class=1, n_test=1)
    os.mkfifo(root / "train" / "cat.7.jpg")
    (root / "train" / "dog.8.jpg").symlink_to("/dev/zero")
    code = ("from catsdogs.dataset.layout import open_dataset, digest_all\n"
            f"ds = open_dataset({str(root)!r})\n"
            "print(len(digest_all(ds.records)), sorted(ds.ignored))\n")
    out = _in_subprocess(code, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("3 [")
    assert "('train/cat.7.jpg', 'a named pipe, not a regular file" in out.stdout
    assert "('train/dog.8.jpg', 'a character device, not a regular file" in out.stdout


def test_item6_file_size_cap(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    path.write_bytes(_jpeg_bytes(_noise()))
    assert load_image(path).shape == (96, 128, 3)
    monkeypatch.setenv("CATSDOGS_MAX_FILE_BYTES", "1000")
    with pytest.raises(ImageDecodeError, match="file too large .*CATSDOGS_MAX_FILE_BYTES"):
        load_image(path)


# === item 8: one pixel limit, a clear reason, no bomb decoded ======================================
def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` (the header is all a limit check may read)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def test_item8_images_over_the_pixel_limit_are_refused_before_decoding(recwarn):
    data = _png_header_only(10_000, 10_000)  # 100 MP: between Pillow's warning and error limits
    with pytest.raises(ImageDecodeError, match=r"10000 x 10000 = 100.0 megapixels exceeds the "
                                               r"pixel limit of 64 MP \(set CATSDOGS_MAX_PIXELS"):
        decode_rgb(data)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_item8_the_limit_is_one_setting(monkeypatch):
    data = _jpeg_bytes(_noise(100, 100))
    assert decode_rgb(data).shape == (100, 100, 3)
    monkeypatch.setenv("CATSDOGS_MAX_PIXELS", "9999")
    with pytest.raises(ImageDecodeError, match="pixel limit of 0.009999 MP"):
        decode_rgb(data)
    monkeypatch.setenv("CATSDOGS_MAX_PIXELS", "lots")
    from catsdogs.errors import ConfigError

    with pytest.raises(ConfigError, match="CATSDOGS_MAX_PIXELS must be a positive whole number"):
        decode_rgb(data)


# === item 10: unreadable files, dangling links, unreadable folders =================================
def test_item10_unreadable_entries_are_listed_with_reasons(tmp_path):
    root = tmp_path / "d"
    for cls in ("cat", "dog"):
        for i in (1, 2):
            write_jpeg(root / cls / f"{i}.jpg", i, label=int(cls == "dog"))
    (root / "dog" / "gone.jpg").symlink_to(root / "nowhere.jpg")
    ds = open_dataset(root)
    assert ("dog/gone.jpg", "dangling symbolic link") in ds.ignored
    assert len(digest_all(ds.records)) == 4


@pytest.mark.slow
def test_item10_cli_as_non_root_skips_unreadable_files_and_folders(shared_tmp, nobody_python):
    root = shared_tmp / "d"
    for cls in ("cat", "dog"):
        for i in (1, 2):
            write_jpeg(root / cls / f"{i}.jpg", i, label=int(cls == "dog"))
    write_jpeg(root / "test" / "1.jpg", 5)
    write_jpeg(root / "cat" / "locked.jpg", 6).chmod(0o000)
    (root / "dog" / "gone.jpg").symlink_to(root / "nowhere.jpg")
    write_jpeg(root / "cat" / "private" / "3.jpg", 7)
    (root / "cat" / "private").chmod(0o000)
    for p in [root, *root.rglob("*")]:
        if p.is_dir() and p.name != "private":
            p.chmod(0o755)
    proc = as_nobody(nobody_python, shared_tmp / "home", "extract", str(root), "-b", "resnet50",
                     "--weights", "none", "--image-size", "32", "--no-progress")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING")]
    assert sum("cat/locked.jpg: no read permission" in w for w in warnings) == 1
    assert sum("dog/gone.jpg: dangling symbolic link" in w for w in warnings) == 1
    assert sum("cat/private/: cannot list folder (Permission denied)" in w for w in warnings) == 1
    assert "4 train + 1 test rows" in proc.stdout


# === item 11: read-only caches and output folders ===================================================
@pytest.mark.slow
def test_item11_warm_read_only_cache_works_and_cold_one_is_one_error(shared_tmp, nobody_python):
    root = make_kaggle(shared_tmp / "d", n_per_class=2, n_test=1)
    cache = shared_tmp / "cache"
    _extract(root, cache)
    for p in [shared_tmp / "d", *root.rglob("*"), cache, *cache.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    args = ("extract", str(root), "-b", "resnet50", "--weights", "none", "--image-size", "32",
            "--cache-dir", str(cache), "--no-progress", "--json")
    proc = as_nobody(nobody_python, shared_tmp / "home", *args)
    assert proc.returncode == 0, proc.stderr  # the .lock used to be opened for writing
    assert json.loads(proc.stdout)[0]["computed"] == 0
    (root / "train").chmod(0o755)
    write_jpeg(root / "train" / "cat.9.jpg", 9)
    (root / "train").chmod(0o555)
    line = _one_error_line(as_nobody(nobody_python, shared_tmp / "home", *args))
    assert "cannot write to the feature cache" in line and "--cache-dir" in line


def test_item11_cache_dir_or_out_that_is_a_file(tmp_path):
    root = make_kaggle(tmp_path / "d", n_per_class=2, n_test=1)
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    line = _one_error_line(run_cli("extract", str(root), "-b", "resnet50", "--weights", "none",
                                   "--cache-dir", str(afile), "--no-progress"))
    assert str(afile) in line
    exp = tmp_path / "e.yaml"
    exp.write_text(f"data: {root}\nbackbones: [{{name: resnet50, image_size: 32}}]\n"
                   f"heads: [dropout_sigmoid]\noptimizers: [adam]\nweights: none\nepochs: 1\n"
                   f"cache_dir: {tmp_path}/c\n")
    line = _one_error_line(run_cli("run", str(exp), "--out", str(afile), "--no-progress"))
    assert str(afile) in line


# === item 12 (part): ids above int64 in `score`, a crafted model in `predict` =======================
@pytest.mark.parametrize("big", ["9223372036854775808", "99999999999999999999"])
def test_item12_score_ids_above_int64(tmp_path, big):
    sub = tmp_path / "s.csv"
    sub.write_text(f"id,label\n1,0.5\n{big},0.5\n")
    labels = tmp_path / "l.csv"
    labels.write_text("id,label\n1,1\n2,0\n")
    line = _one_error_line(run_cli("score", str(sub), "--labels", str(labels)))
    assert f"id {big} (data row 2) is out of range" in line
    line = _one_error_line(run_cli("score", str(labels), "--labels", str(sub)))
    assert "out of range" in line


def _export_dir(path: Path, lambda_layer: bool) -> Path:
    import keras

    inp = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Lambda(lambda t: t * 2.0)(inp) if lambda_layer else inp
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(1, activation="sigmoid", name="prediction")(x)
    path.mkdir(parents=True)
    keras.Model(inp, out).save(path / "model.keras")
    (path / "export.json").write_text(json.dumps({
        "run_id": "crafted", "input": {"size": 32, "resize": "squash"},
        "models": {"classifier": {"keras": {"file": "model.keras"}}}}))
    return path


@pytest.mark.slow
def test_item12_crafted_keras_model_is_one_error_line(tmp_path):
    model = _export_dir(tmp_path / "export", lambda_layer=True)
    photo = tmp_path / "p.jpg"
    write_jpeg(photo, 1)
    line = _one_error_line(run_cli("predict", str(photo), "--model", str(model)))
    assert str(model / "model.keras") in line and "safe mode" in line


@pytest.mark.slow
def test_item6_predict_dev_zero_is_quick_and_clear(tmp_path):
    model = _export_dir(tmp_path / "export", lambda_layer=False)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    proc = run_cli("predict", "/dev/zero", str(fifo), "--model", str(model), timeout=120)
    line = _one_error_line(proc)
    assert "2 of 2 images could not be read" in line
    assert "skipped /dev/zero: a character device, not a regular file" in proc.stderr
    assert f"skipped {fifo}: a named pipe, not a regular file" in proc.stderr


# === item 13: export of a run without head.keras ==================================================
@pytest.fixture(scope="module")
def export_runs(tmp_path_factory):
    from export_fixtures import session_runs

    return session_runs(tmp_path_factory)


@pytest.mark.slow
def test_item13_export_without_head_keras_says_what_is_missing(export_runs, tmp_path):
    run = export_runs["cam"]
    out = tmp_path / "out"
    shutil.copytree(run.parent.parent, out, ignore=shutil.ignore_patterns("export"))
    copy = out / "runs" / run.name
    (copy / "head.keras").unlink()
    line = _one_error_line(run_cli("export", str(copy), "--format", "keras"))
    assert f"{copy / 'head.keras'} is missing" in line and "softmax_cam" in line
    assert "not a Keras graph" not in line and "catsdogs run" in line
    stack = _one_error_line(run_cli("export", str(export_runs["stack"]), "--format", "keras"))
    assert "is not a Keras graph" in stack and "is missing" not in stack


@pytest.mark.slow
@pytest.mark.parametrize("content", [b"not a zip file", b"PK\x03\x04" + bytes(64)])
def test_item12_crafted_head_keras_in_a_run_dir_is_one_error_line(export_runs, tmp_path, content):
    """``predict --model RUN_DIR`` and ``export`` load the run's head.keras: a crafted or damaged
    one is one ``Error:`` line naming it, not a traceback."""
    run = export_runs["cam"]
    out = tmp_path / "out"
    shutil.copytree(run.parent.parent, out, ignore=shutil.ignore_patterns("export"))
    copy = out / "runs" / run.name
    (copy / "head.keras").write_bytes(content)
    photo = write_jpeg(tmp_path / "p.jpg", 1)
    for args in (("predict", str(photo), "--model", str(copy), "--backend", "keras"),
                 ("export", str(copy), "--format", "keras")):
        line = _one_error_line(run_cli(*args))
        assert f"{copy / 'head.keras'}: not a usable Keras head model" in line, args
        assert "retrain the run" in line

