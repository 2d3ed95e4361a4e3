"""A real tiny CAM-capable run and a real ``catsdogs serve`` subprocess (test_serve*, once per session).

The run: ResNet50 (seeded random weights) at 64 px + ``softmax_cam`` on generated JPEGs, exported
in process (TFLite only) to ``<run>/export``, where ``catsdogs serve RUN`` finds it. (Exporting in
the test process, which has TensorFlow loaded already, is much cheaper than the server's on-the-fly
export, which starts a new TensorFlow process.)
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from conftest import make_kaggle
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
#: real photos bundled with the repository (Kaggle's Asirra photos, downscaled)
SAMPLE_TEST = REPO / "experiments" / "sample-data" / "test"


def build_run(root: Path) -> Path:
    """Train and export the run (in process) once; reused when ``root`` already has it."""
    from catsdogs.app.export import export_run
    from catsdogs.experiment.spec import load_experiment
    from catsdogs.runs.runner import run_experiment

    done = root / "run.json"
    if done.is_file():
        return Path(json.loads(done.read_text())["run"])
    root.mkdir(parents=True, exist_ok=True)
    make_kaggle(root / "data", n_per_class=16, n_test=4)
    doc = {"data": str(root / "data"), "output": str(root / "out"), "cache_dir": str(root / "cache"),
           "weights": "none", "backbones": [{"name": "resnet50", "image_size": 64}],
           "heads": ["softmax_cam"], "optimizers": [{"name": "adam", "learning_rate": 0.01}],
           "epochs": 2, "batch_size": 16, "seed": 7, "validation": {"holdout": 0.25}}
    (root / "serve.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    result = run_experiment(load_experiment(root / "serve.yaml"), progress=False, submit=False)
    run = result.out_dir / "runs" / result.records[0].run_id
    export_run(run, ["tflite"], run / "export")
    done.write_text(json.dumps({"run": str(run)}))
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``catsdogs serve MODEL`` on 127.0.0.1 and a free port, in a subprocess stopped by pid."""

    def __init__(self, model: Path, log: Path, *args: str, start_timeout: float = 240):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "catsdogs", "serve", str(model), "--host", "127.0.0.1",
               "--port", str(self.port), *args]
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._wait(start_timeout)

    def _wait(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"catsdogs serve exited ({self.proc.returncode}):\n"
                                   f"{self.log.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"catsdogs serve did not answer in {timeout:.0f} s:\n"
                           f"{self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def png_bytes(array: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG", **save)
    return buf.getvalue()


def gradient_png(size: int = 160) -> bytes:
    """A non-pet picture: a smooth colour gradient."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    img = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)),
                    np.full((size, size), 200.0)], axis=2)
    return png_bytes(img.astype(np.uint8))


def bomb_png(side: int = 20_000) -> bytes:
    """A decompression bomb: a 1-bit PNG of ``side``^2 pixels (default 400 MP in ~50 KB)."""
    im = Image.new("1", (side, side))
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=True)
    return buf.getvalue()
