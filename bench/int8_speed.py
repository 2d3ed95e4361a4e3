"""Benchmark: int8 extraction (OpenVINO + NNCF) against float32 and bfloat16, speed and accuracy.

In ONE process, on the same images (ratios are what count: the machine may be shared):

* speed, per backbone (``resnet50`` at 224 with weights none, ``efficientnet_lite0/1/2`` with
  their real ImageNet weights):

  - direct:  images/s of each precision's model called on one in-memory uint8 batch (float32 and
             bfloat16: the compiled Keras model; int8: the OpenVINO model ``extract`` quantised),
             measured in interleaved rounds;
  - extract: images/s of ``catsdogs.extract`` (decode + model + chunk writes, counted over the
             compute loop; int8 calibration happens once, before, and is reported separately);
  - int8 / float32 end to end, the bar being >= 2.0x;
  - the int8 model's profile: share of its time in int8 kernels, and its slowest float ops;

* end to end (``--end-to-end N --photos DIR``): ``catsdogs.extract`` of N photos of a
  class-folder data set (e.g. Microsoft PetImages' ``Cat/`` and ``Dog/``), float32 and int8 each in
  a fresh cache, int8 *calibration included* (model build, conversion, NNCF statistics, saving):
  wall seconds and this process's CPU seconds (the machine may be shared: CPU time is what the
  other processes disturb least), and int8 / float32 of both (the bar: >= 2.0x); then the same
  int8 call again with 1 % more photos, which must not calibrate again;

* accuracy, on the mini data set (``--data``, with ``test_labels.csv``) with ImageNet weights: the
  cosine similarity of int8 to float32 features per Lite backbone, and the log loss of the same
  head (``dropout_sigmoid``, same seed, same optimizer) trained on the fused Lite0+1+2 float32
  features vs on the int8 ones, on the mini test set and on a held-out 20 % of the mini train set
  (the bar: int8 within +0.003).

Usage::

    python bench/int8_speed.py [--data ../shared/data/dogs-vs-cats-mini] [--limit 320]
        [--backbones resnet50,efficientnet_lite0,efficientnet_lite1,efficientnet_lite2]
        [--direct-seconds 4] [--skip-accuracy] [--cache-dir DIR]
    python bench/int8_speed.py --end-to-end 2000 --photos ../data/PetImages --backbones resnet50 \
        --skip-speed --skip-accuracy
    python bench/int8_speed.py --float32-runtimes 1000 --photos ../data/PetImages \
        --backbones efficientnet_lite0,efficientnet_lite1,efficientnet_lite2 --image-sizes 336,360,390 \
        --skip-speed --skip-accuracy

``--float32-runtimes N``: ``catsdogs.extract`` of N photos at float32 by TensorFlow and by OpenVINO
(``runtime: openvino``), each in a fresh cache: wall and CPU seconds of each call and how far
apart the two runtimes' features are.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from catsdogs.util.tf_log import quiet_tensorflow_import  # noqa: E402

quiet_tensorflow_import()  # its absl start-up lines held to that level too (as the CLI does)

import numpy as np  # noqa: E402

import catsdogs  # noqa: E402
from catsdogs.dataset.layout import open_dataset  # noqa: E402
from catsdogs.features import int8  # noqa: E402
from catsdogs.features.extraction import FeatureModel  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "dogs-vs-cats-mini"
PRECISIONS = ("float32", "bfloat16", "int8")
LITE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def weights_for(name: str) -> str:
    return "imagenet" if name.startswith("efficientnet_lite") else "none"


def subset(src: Path, limit: int, work: Path, n_test: int = 16) -> Path:
    """A copy (symlinks) of the first ``limit`` training and ``n_test`` test images."""
    ds = open_dataset(src)
    for split, records in (("train", ds.train[:limit]), ("test", ds.test[:n_test])):
        (work / split).mkdir(parents=True)
        for rec in records:
            (work / split / rec.path.name).symlink_to(rec.path)
    return work


def direct_rounds(models: dict, batch: np.ndarray, seconds: float, rounds: int = 3) -> dict:
    """images/s of each model on ``batch``, interleaved so load changes hit all alike."""
    for model in models.values():
        model(batch)  # warm up (trace / first inference)
    counts = {k: 0 for k in models}
    spent = {k: 0.0 for k in models}
    for _ in range(rounds):
        for key, model in models.items():
            start = time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                model(batch)
                counts[key] += len(batch)
            spent[key] += time.perf_counter() - start
    return {k: counts[k] / spent[k] for k in models}


def profile(ir: Path, batch: np.ndarray, top: int = 4) -> str:
    """Where the int8 model's time goes (OpenVINO per-node performance counters)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(ir / "model.xml")), "CPU",
                                  {"PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    request.infer([batch])
    request.infer([batch])
    rows = [(p.real_time.total_seconds(), p.node_type, p.exec_type, p.node_name)
            for p in request.get_profiling_info() if p.real_time.total_seconds() > 0]
    total = sum(r[0] for r in rows) or 1.0
    is_int8 = lambda exec_type: any(t in exec_type.lower() for t in ("i8", "u8"))  # noqa: E731
    int8_share = sum(r[0] for r in rows if is_int8(r[2])) / total
    float_rows = sorted((r for r in rows if not is_int8(r[2])), reverse=True)
    slow = ", ".join(f"{t} [{e}] {100 * s / total:.1f}%" for s, t, e, _ in float_rows[:top])
    return f"int8 kernels {100 * int8_share:.1f}% of the time; slowest non-int8: {slow}"


def speed(args, name: str, work: Path) -> dict:
    backbone = catsdogs.get_registry().backbone(name)
    size = backbone.input_size
    weights = weights_for(name)
    data = subset(args.data, args.limit, work / f"data-{name}")
    row: dict = {"name": name, "weights": weights, "size": size}
    results = {}
    for precision in PRECISIONS:  # end to end, each in a fresh cache
        (res,) = catsdogs.extract(data, [name], weights=weights, batch_size=args.batch_size,
                                  cache_dir=work / f"cache-{name}-{precision}", precision=precision,
                                  calibration_size=args.calibration_size, progress=False)
        results[precision] = res
        row[f"extract_{precision}"] = res.images_per_second
        row[f"call_s_{precision}"] = res.seconds
    row["calibrate_s"] = results["int8"].seconds - results["int8"].compute_seconds

    models = {p: FeatureModel(backbone, weights, size, p, args.batch_size)
              for p in ("float32", "bfloat16")}
    models["int8"] = int8.Int8FeatureModel(backbone, size, args.batch_size,
                                           int8.ir_dir(results["int8"].path))
    batch = np.random.default_rng(0).integers(0, 256, (args.batch_size, size, size, 3), np.uint8)
    for precision, ips in direct_rounds(models, batch, args.direct_seconds).items():
        row[f"direct_{precision}"] = ips
    row["profile"] = profile(int8.ir_dir(results["int8"].path), batch)
    feats = {p: catsdogs.load_features(results[p].path).train.X for p in PRECISIONS}
    row["cosine_int8"] = cosine(feats["float32"], feats["int8"])
    row["cosine_bfloat16"] = cosine(feats["float32"], feats["bfloat16"])
    return row


def cosine(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    c = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(c.mean()), float(c.min())


def print_speed(rows: list[dict]) -> None:
    print("\nimages/s (one process, same images; the machine is shared, so compare within a row)")
    print(f"{'backbone':<20}{'size':>5} | {'direct f32':>10}{'bf16':>8}{'int8':>8} | "
          f"{'extract f32':>11}{'bf16':>8}{'int8':>8} | {'int8/f32':>8}{'bf16/f32':>9} | "
          f"{'calib s':>7}")
    for r in rows:
        print(f"{r['name']:<20}{r['size']:>5} | {r['direct_float32']:>10.1f}{r['direct_bfloat16']:>8.1f}"
              f"{r['direct_int8']:>8.1f} | {r['extract_float32']:>11.1f}{r['extract_bfloat16']:>8.1f}"
              f"{r['extract_int8']:>8.1f} | {r['extract_int8'] / r['extract_float32']:>7.2f}x"
              f"{r['extract_bfloat16'] / r['extract_float32']:>8.2f}x | {r['calibrate_s']:>7.1f}")
    for r in rows:
        print(f"  {r['name']}: cosine to float32 (mean/min) int8 {r['cosine_int8'][0]:.5f}/"
              f"{r['cosine_int8'][1]:.5f}, bf16 {r['cosine_bfloat16'][0]:.5f}/"
              f"{r['cosine_bfloat16'][1]:.5f}; {r['profile']}")
    resnet = [r for r in rows if r["name"] == "resnet50"]
    lite = [r for r in rows if r["name"] in LITE]
    ok = lambda r: r["extract_int8"] / r["extract_float32"] >= 2.0  # noqa: E731
    print(f"bar (int8 extract >= 2.0x float32): resnet50 {'met' if resnet and ok(resnet[0]) else 'NOT met'}; "
          f"Lite {sum(map(ok, lite))} of {len(lite)} (need 2 of 3)")


# ------------------------------------------------------------------------------------ end to end
def photo_subset(photos: Path, n: int, work: Path, offset: int = 0) -> Path:
    """A Kaggle-layout copy (symlinks) of ``n`` photos of a class-folder data set, alternating
    cats and dogs (``offset``: skip that many per class first)."""
    ds = open_dataset(photos)
    by_label = {0: [r for r in ds.train if r.label == 0], 1: [r for r in ds.train if r.label == 1]}
    (work / "train").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = i % 2
        rec = by_label[label][offset + i // 2]
        (work / "train" / f"{('cat', 'dog')[label]}.{offset + i // 2}.jpg").symlink_to(rec.path)
    return work


class Stages:
    """Wall and CPU seconds (this process) spent in named callables while active: the calibration's
    stages (decoding, Keras build, OpenVINO conversion, NNCF, saving), found by wrapping the
    module attributes :mod:`catsdogs.features.int8` calls them through."""

    def __init__(self, targets: dict[str, tuple[object, str]]):
        self.targets = targets
        self.spent: dict[str, list[float]] = {k: [0.0, 0.0] for k in targets}
        self.saved: dict[str, object] = {}

    def __enter__(self) -> Stages:
        for label, (owner, attr) in self.targets.items():
            original = self.saved[label] = getattr(owner, attr)

            def timed(*a, _f=original, _label=label, **k):
                wall, cpu = time.perf_counter(), time.process_time()
                try:
                    return _f(*a, **k)
                finally:
                    self.spent[_label][0] += time.perf_counter() - wall
                    self.spent[_label][1] += time.process_time() - cpu

            setattr(owner, attr, timed)
        return self

    def __exit__(self, *exc) -> None:
        for label, (owner, attr) in self.targets.items():
            setattr(owner, attr, self.saved[label])


def end_to_end(args, name: str, work: Path) -> dict:
    """float32 vs int8 extract of ``args.end_to_end`` photos, calibration included."""
    import nncf
    import openvino as ov

    backbone = catsdogs.get_registry().backbone(name)
    weights = weights_for(name)
    data = photo_subset(args.photos, args.end_to_end, work / f"e2e-{name}")
    row: dict = {"name": name, "n": args.end_to_end, "calibration_size": args.calibration_size,
                 "load_before": os.getloadavg()[1]}
    stages = Stages({"calibration": (int8, "quantised_model"),
                     "decode": (int8, "decode_calibration"),
                     "Keras build": (type(backbone), "build"),
                     "conversion": (ov, "convert_model"),
                     "NNCF": (nncf, "quantize"),
                     "saving": (int8, "save_model")})
    for precision in ("float32", "int8"):
        wall, cpu = time.perf_counter(), time.process_time()
        with stages if precision == "int8" else contextlib.nullcontext():
            (res,) = catsdogs.extract(data, [name], weights=weights, batch_size=args.batch_size,
                                      cache_dir=work / f"e2e-cache-{name}", precision=precision,
                                      calibration_size=args.calibration_size, progress=False)
        row[f"wall_{precision}"] = time.perf_counter() - wall
        row[f"cpu_{precision}"] = time.process_time() - cpu
        row[f"computed_{precision}"] = res.computed
        row[f"compute_s_{precision}"] = res.compute_seconds
        print(f"  {name} {precision}: {row[f'wall_{precision}']:.1f} s wall, "
              f"{row[f'cpu_{precision}']:.1f} s CPU, {res.computed} computed", flush=True)
    row["calib_wall"], row["calib_cpu"] = stages.spent["calibration"]
    row["stages"] = {k: v for k, v in stages.spent.items() if k != "calibration"}
    row["load_after"] = os.getloadavg()[1]
    added = max(1, args.end_to_end // 100)
    photo_subset(args.photos, added, data, offset=args.end_to_end // 2 + 1)
    wall = time.perf_counter()
    (res,) = catsdogs.extract(data, [name], weights=weights, batch_size=args.batch_size,
                              cache_dir=work / f"e2e-cache-{name}", precision="int8",
                              calibration_size=args.calibration_size, progress=False)
    row.update(added=added, added_computed=res.computed, added_wall=time.perf_counter() - wall)
    return row


def print_end_to_end(rows: list[dict]) -> None:
    print("\nend to end, calibration included (seconds of the extract call; CPU: this process)")
    for r in rows:
        wall = r["wall_float32"] / r["wall_int8"]
        cpu = r["cpu_float32"] / r["cpu_int8"]
        print(f"  {r['name']}: {r['n']} photos (5-min load {r['load_before']:.1f} before, "
              f"{r['load_after']:.1f} after): float32 {r['wall_float32']:.1f} s wall / "
              f"{r['cpu_float32']:.1f} s CPU; int8 {r['wall_int8']:.1f} s wall / {r['cpu_int8']:.1f} s "
              f"CPU, of which calibration on {r['calibration_size']} images "
              f"{r['calib_wall']:.1f} s wall / {r['calib_cpu']:.1f} s CPU -> int8/float32 "
              f"{wall:.2f}x wall, {cpu:.2f}x CPU (bar >= 2.0x: "
              f"{'met' if min(wall, cpu) >= 2.0 else 'NOT met'}); without calibration "
              f"{r['cpu_float32'] / (r['cpu_int8'] - r['calib_cpu']):.2f}x CPU")
        print("    calibration CPU s: " + ", ".join(f"{k} {v[1]:.1f}" for k, v in r["stages"].items())
              + f", other {r['calib_cpu'] - sum(v[1] for v in r['stages'].values()):.1f}")
        print(f"  {r['name']}: {r['added']} photos added, int8 again: {r['added_computed']} computed, "
              f"{r['added_wall']:.1f} s (no calibration)")


# ------------------------------------------------------------------------- float32 runtimes
def float32_runtimes(args, name: str, size: int | None, work: Path) -> dict:
    """``runtime: tensorflow`` against ``runtime: openvino``: ``catsdogs.extract`` of
    ``args.float32_runtimes`` photos at float32 by each, in fresh caches, one after the other;
    wall and CPU seconds (this process) of each call, and how far apart their features are."""
    from catsdogs.features.extraction import load_features

    data = photo_subset(args.photos, args.float32_runtimes, work / f"rt-{name}")
    row: dict = {"name": name, "n": args.float32_runtimes, "load_before": os.getloadavg()[1]}
    features = {}
    for runtime in ("tensorflow", "openvino"):
        wall, cpu = time.perf_counter(), time.process_time()
        (res,) = catsdogs.extract(data, [name], weights=weights_for(name), image_size=size,
                                  batch_size=args.batch_size, cache_dir=work / f"rt-cache-{runtime}",
                                  runtime=runtime, progress=False)
        row[f"wall_{runtime}"] = time.perf_counter() - wall
        row[f"cpu_{runtime}"] = time.process_time() - cpu
        row["size"] = res.config.image_size
        features[runtime] = load_features(res.path).train.X
        print(f"  {name} at {res.config.image_size} px, {runtime}: {row[f'wall_{runtime}']:.1f} s "
              f"wall, {row[f'cpu_{runtime}']:.1f} s CPU, {res.computed} computed", flush=True)
    a, b = features["tensorflow"], features["openvino"]
    row["max_abs"] = float(np.abs(a - b).max())
    row["max_value"] = float(np.abs(a).max())
    row["min_cosine"] = cosine(a, b)[1]
    row["load_after"] = os.getloadavg()[1]
    return row


def print_float32_runtimes(rows: list[dict]) -> None:
    print("\nfloat32 features, TensorFlow against OpenVINO (the extract call, model build and "
          "conversion included; CPU: this process)")
    for r in rows:
        print(f"  {r['name']} at {r['size']} px, {r['n']} photos (5-min load {r['load_before']:.1f} "
              f"before, {r['load_after']:.1f} after): tensorflow {r['wall_tensorflow']:.1f} s wall / "
              f"{r['cpu_tensorflow']:.1f} s CPU, openvino {r['wall_openvino']:.1f} s wall / "
              f"{r['cpu_openvino']:.1f} s CPU -> openvino/tensorflow "
              f"{r['wall_openvino'] / r['wall_tensorflow']:.2f}x wall, "
              f"{r['cpu_openvino'] / r['cpu_tensorflow']:.2f}x CPU; features: max |diff| "
              f"{r['max_abs']:.2g} (values up to {r['max_value']:.3g}), min cosine "
              f"{r['min_cosine']:.9f}")


# ------------------------------------------------------------------------------------ engines
def compare_engines(args, name: str, work: Path) -> None:
    """The engine choice: TF float32, OpenVINO float32 / NNCF int8, ONNX Runtime float32 / QDQ
    int8 (tf2onnx + ``quantize_static``, per-channel), same model, same calibration images."""
    import onnxruntime as ort
    import openvino as ov
    import tf2onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from catsdogs.dataset.images import load_image

    backbone = catsdogs.get_registry().backbone(name)
    size, weights = backbone.input_size, weights_for(name)
    train = open_dataset(args.data).train
    calib = np.stack([load_image(r.path, size) for r in train[:args.engine_calibration]])
    batch = np.stack([load_image(r.path, size) for r in train[-args.batch_size:]])
    function = int8._uint8_function(backbone.build(weights, size), size)
    reference = function(batch).numpy()
    runners = {"tf float32": lambda x: function(x).numpy()}
    core = ov.Core()
    float_ov = ov.convert_model(function)
    runners["openvino float32"] = core.compile_model(float_ov, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
    runners["openvino int8"] = core.compile_model(int8.quantize(backbone.build(weights, size), size, calib),
                                                  "CPU", {"PERFORMANCE_HINT": "LATENCY"})
    onnx_path, pre, quant = work / f"{name}.onnx", work / f"{name}-pre.onnx", work / f"{name}-qdq.onnx"
    tf2onnx.convert.from_function(function, input_signature=function.input_signature, opset=17,
                                  output_path=str(onnx_path))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{input_name: calib[i:i + 8]} for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self.batches, None)

    quant_pre_process(str(onnx_path), str(pre))
    quantize_static(str(pre), str(quant), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    for label, path in (("onnxruntime float32", onnx_path), ("onnxruntime int8 (QDQ)", quant)):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        runners[label] = lambda x, s=sess: s.run(None, {input_name: x})[0]
    wrapped = {k: (lambda x, r=r: np.asarray(r(x)[0] if isinstance(r, ov.CompiledModel) else r(x)))
               for k, r in runners.items()}
    speeds = direct_rounds(wrapped, batch, args.direct_seconds * len(wrapped) / 3)
    print(f"\nengines, {name} ({weights}) at {size}, batch {args.batch_size}, "
          f"{len(calib)} calibration images (images/s, cosine to TF float32 mean/min):")
    for label, fn in wrapped.items():
        mean, low = cosine(reference, fn(batch))
        print(f"  {label:<24}{speeds[label]:8.1f}   {mean:.5f}/{low:.5f}")


# ------------------------------------------------------------------------------------ accuracy
def fused(sets: list, split: str) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """Column-concatenated features of ``sets`` on the files all of them have, in one order."""
    parts = [getattr(fs, split) for fs in sets]
    common = sorted(set.intersection(*(set(p.files) for p in parts)))
    X = np.concatenate([p.X[[p.files.index(f) for f in common]] for p in parts], axis=1)
    first = parts[0]
    rows = [first.files.index(f) for f in common]
    return X, first.y[rows], common, first.ids[rows]


def accuracy(args) -> None:
    import pandas as pd
    from sklearn.model_selection import train_test_split

    from catsdogs.runs.metrics import log_loss

    labels_csv = args.data / "test_labels.csv"
    if not labels_csv.is_file():
        print(f"\n(no {labels_csv}: accuracy part skipped)")
        return
    registry = catsdogs.get_registry()
    sets = {}
    for precision in ("float32", "int8"):
        results = catsdogs.extract(args.data, list(LITE), weights="imagenet", precision=precision,
                                   calibration_size=args.calibration_size, cache_dir=args.cache_dir,
                                   batch_size=args.batch_size, progress=False)
        sets[precision] = [catsdogs.load_features(r.path) for r in results]
    print(f"\naccuracy on {args.data.name} (ImageNet weights, calibration {args.calibration_size} "
          "training images)")
    for name, a, b in zip(LITE, sets["float32"], sets["int8"]):
        mean, low = cosine(a.train.X, b.train.X)
        print(f"  {name}: int8 vs float32 features cosine mean {mean:.5f}, min {low:.5f}")

    truth = pd.read_csv(labels_csv).set_index("id")["label"]
    data = {p: (fused(sets[p], "train"), fused(sets[p], "test")) for p in sets}
    (_, y, files, _), _ = data["float32"]
    assert all(data[p][0][2] == files for p in data), "float32 and int8 files differ"
    fit_rows, held_rows = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y,
                                           random_state=2019)
    head_cls = registry.head("dropout_sigmoid")
    optimizer = registry.optimizer("adadelta")(learning_rate=1.0)
    losses = {}
    for precision, ((X, y, _, _), (X_test, _, _, test_ids)) in data.items():
        head = head_cls().fit(X[fit_rows], y[fit_rows], optimizer=optimizer.clone(), epochs=8,
                              batch_size=128, seed=2019)
        losses[precision] = (log_loss(y[held_rows], head.predict_proba(X[held_rows])),
                             log_loss(truth.loc[test_ids].to_numpy(), head.predict_proba(X_test)))
    print(f"  fused Lite0+1+2, dropout_sigmoid, adadelta(1.0), 8 epochs, batch 128, seed 2019; "
          f"{len(fit_rows)} training rows, {len(held_rows)} held out, {len(X_test)} test")
    for precision, (held, test) in losses.items():
        print(f"  {precision:8s} log loss: held-out {held:.5f}   test {test:.5f}")
    d_held = losses["int8"][0] - losses["float32"][0]
    d_test = losses["int8"][1] - losses["float32"][1]
    verdict = "met" if max(d_held, d_test) <= 0.003 else "NOT met"
    print(f"  int8 - float32: held-out {d_held:+.5f}, test {d_test:+.5f} (bar <= +0.003: {verdict})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--backbones", default="resnet50," + ",".join(LITE))
    ap.add_argument("--limit", type=int, default=320,
                    help="training images for the speed part (plus 16 test images)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--calibration-size", type=int, default=int8.DEFAULT_CALIBRATION_SIZE)
    ap.add_argument("--direct-seconds", type=float, default=6.0, help="per model and backbone")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="feature cache of the accuracy part [default: the user's cache]")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--engines", default="",
                    help="also compare OpenVINO and ONNX Runtime on these backbones (comma-separated)")
    ap.add_argument("--engine-calibration", type=int, default=96)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--end-to-end", type=int, default=0, metavar="N",
                    help="also extract N photos of --photos end to end, float32 vs int8")
    ap.add_argument("--photos", type=Path, default=HERE.parent.parent / "data" / "PetImages",
                    help="class-folder data set for --end-to-end and --float32-runtimes")
    ap.add_argument("--float32-runtimes", type=int, default=0, metavar="N",
                    help="also extract N photos of --photos at float32 by TensorFlow and by "
                         "OpenVINO (runtime: openvino)")
    ap.add_argument("--image-sizes", default="",
                    help="with --float32-runtimes: each backbone's input size (comma-separated, "
                         "in --backbones' order; default: each one's own)")
    args = ap.parse_args()
    int8.require_engine()
    print(f"{os.cpu_count()} CPUs, batch {args.batch_size}, {args.limit} images from {args.data}, "
          f"engine {int8.engine_versions()}")
    if not args.skip_speed:
        work = Path(tempfile.mkdtemp(prefix="catsdogs-int8-bench-"))
        try:
            rows = []
            for name in [n.strip() for n in args.backbones.split(",") if n.strip()]:
                rows.append(speed(args, name, work))
                print(f"done {name}: extract int8/float32 "
                      f"{rows[-1]['extract_int8'] / rows[-1]['extract_float32']:.2f}x", flush=True)
            print_speed(rows)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if args.end_to_end:
        work = Path(tempfile.mkdtemp(prefix="catsdogs-int8-e2e-"))
        try:
            print_end_to_end([end_to_end(args, n.strip(), work)
                              for n in args.backbones.split(",") if n.strip()])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if args.float32_runtimes:
        names = [n.strip() for n in args.backbones.split(",") if n.strip()]
        sizes = [int(v) for v in args.image_sizes.split(",") if v.strip()] or [None] * len(names)
        work = Path(tempfile.mkdtemp(prefix="catsdogs-float32-runtimes-"))
        try:
            print_float32_runtimes([float32_runtimes(args, n, size, work)
                                    for n, size in zip(names, sizes, strict=True)])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    for name in [n.strip() for n in args.engines.split(",") if n.strip()]:
        work = Path(tempfile.mkdtemp(prefix="catsdogs-int8-engines-"))
        try:
            compare_engines(args, name, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if not args.skip_accuracy:
        accuracy(args)


if __name__ == "__main__":
    main()
