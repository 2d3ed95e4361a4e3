"""The two model runners behind :class:`catsdogs.app.predict.Predictor` and the exports' checks:
a TFLite (LiteRT) interpreter or a Keras model, each taking one raw RGB image and returning the
model's named outputs. No TensorFlow import for TFLite when LiteRT is installed."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

import numpy as np

from catsdogs.errors import DataError
from catsdogs.util.tf_log import held_to_level

logger = logging.getLogger(__name__)


def convert_tflite(converter) -> bytes:
    """``converter.convert()`` (a ``tf.lite.TFLiteConverter``), with what TensorFlow prints while
    converting (Keras' "Saved artifact at ..." and a listing of every captured tensor: about 950
    lines for a three-backbone model) logged at DEBUG instead of reaching the terminal."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            return converter.convert()
    finally:
        if text := printed.getvalue().strip():
            logger.debug("TFLite converter: %s", text)


def tflite_interpreter(path: str | os.PathLike, num_threads: int | None = None):
    """A LiteRT interpreter (``ai_edge_litert``), or TensorFlow's when LiteRT is not installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - depends on the environment
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    with held_to_level():  # the runtime's "INFO: Created ... XNNPACK delegate" (util.tf_log)
        interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
        interpreter.allocate_tensors()
    return interpreter


class TFLiteModel:
    """A TFLite (LiteRT) model file: one image -> its named outputs (quantised inputs handled)."""

    def __init__(self, path: Path, num_threads: int | None = None):
        self.path = path
        self.interpreter = tflite_interpreter(path, num_threads)
        self.runner = self.interpreter.get_signature_runner()
        self.inputs = {name: (np.dtype(d["dtype"]), d.get("quantization") or (0.0, 0))
                       for name, d in self.runner.get_input_details().items()}

    def _input(self, name: str, image: np.ndarray) -> np.ndarray:
        """The image as input ``name`` takes it: float32, or quantised for an integer input (int8)."""
        dtype, (scale, zero) = self.inputs[name]
        x = np.asarray(image[None], dtype=np.float32)
        if dtype.kind in "iu" and scale:
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        return np.ascontiguousarray(x, dtype=dtype)

    def __call__(self, image) -> dict[str, np.ndarray]:
        """One image (S, S, 3), or ``{input name: image}`` for a model with one input per size
        (:func:`catsdogs.app.export.input_name`) -> the model's named outputs, batch dimension
        dropped."""
        images = image if isinstance(image, dict) else {"image": image}
        out = self.runner(**{k: self._input(k, v) for k, v in images.items()})
        return {k: np.asarray(v)[0] for k, v in out.items()}


class KerasModel:
    """A Keras model (or a ``.keras`` file loaded in safe mode): one image -> its named outputs."""

    def __init__(self, model):
        import tensorflow as tf

        from catsdogs.util.tf_log import float16_notice_held

        float16_notice_held()  # a fine-tuned top rounds its maps to float16
        self.model = model
        self._call = tf.function(lambda x: model(x, training=False))

    def __call__(self, image) -> dict[str, np.ndarray]:
        """One image (S, S, 3), or ``{input name: image}`` -> the named outputs (batch dropped)."""
        if isinstance(image, dict):
            out = self._call({k: np.asarray(v[None], dtype=np.float32) for k, v in image.items()})
        else:
            out = self._call(np.asarray(image[None], dtype=np.float32))
        if not isinstance(out, dict):
            out = {"prediction": out}
        return {k: np.asarray(v)[0] for k, v in out.items()}

    @classmethod
    def load(cls, path: Path) -> KerasModel:
        import keras

        from catsdogs import layers  # noqa: F401  (registers catsdogs layers)
        from catsdogs.app import graph  # noqa: F401  (registers the export's layers)

        try:
            model = keras.saving.load_model(path, compile=False)  # safe_mode: no code in files
        except Exception as exc:  # noqa: BLE001 - Keras raises ValueError, TypeError, OSError ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"{path}: refused to load this Keras model ({first}); only models "
                            "written by `catsdogs export` are loaded, and never code stored in a "
                            "model file (Keras safe mode)") from None
        return cls(model)
