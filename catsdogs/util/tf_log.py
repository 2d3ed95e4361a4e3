"""TensorFlow's start-up log lines, held to ``TF_CPP_MIN_LOG_LEVEL`` again.

Since TensorFlow logs through absl, loading it prints INFO lines from C++ ("oneDNN custom
operations are on ...", "Could not find cuda drivers ...", and absl's own "WARNING: All log
messages before absl::InitializeLog() is called are written to STDERR"), twice, whatever
``TF_CPP_MIN_LOG_LEVEL`` says (an open upstream bug, tensorflow/tensorflow#100442). The CLI sets
that variable to 2 and calls :func:`quiet_tensorflow_import`: while ``tensorflow`` is first
imported, file descriptor 2 goes to a temporary file; afterwards the absl lines below the level
(I = 0, W = 1, E = 2, F = 3) and absl's notice are logged at DEBUG on the ``catsdogs`` logger,
and everything else (errors, Python warnings, anything unrecognised) is written to stderr as it
was. ``TF_CPP_MIN_LOG_LEVEL=0`` keeps every line.

Two E-level lines tell a CPU user nothing to act on, and they come after the import, at the first
device probe and the first float16 op: "failed call to cuInit ... UNKNOWN ERROR (303)" on a machine
where TensorFlow has just said (at I level) that it found no CUDA driver, and "oneDNN supports
DT_HALF only on platforms with AVX-512", a note that half-precision ops take Eigen's kernels.
:data:`NOTICES` holds those two lines below level 3 as well (the cuInit line only where the same
capture has TensorFlow's "Could not find cuda drivers": with a driver it is a real fault, and
stays), and both are made where stderr is held: the import's held block lists the physical devices
(:func:`probe_tensorflow`; listing them initialises no runtime, so a plugin can still configure
TensorFlow's threads and devices after the import), and the code that first runs a float16 op (the
maps model, the ``finetune`` head, a loaded Keras model) calls :func:`float16_notice_held` first,
once per process, where TensorFlow's runtime is in use already.

:func:`retracing_held` does the same, for a block, with TensorFlow's Python warning that a
function was traced again and again ("... triggered tf.function retracing"): code that builds a
new model per fold and predicts row counts of every size traces each model's predict function
for each new batch shape, as it must, and the warning tells a user to restructure code that is
not theirs.

LiteRT's interpreter prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." through
TFLite's own logger, which ignores the variable as well, when it is allocated (``catsdogs predict``
and ``serve`` on a TFLite export): :func:`catsdogs.app.models.tflite_interpreter` allocates it
under :func:`held_to_level`, and :func:`split_lines` reads that logger's ``INFO:`` / ``WARNING:``
/ ``ERROR:`` lines like absl's I / W / E.

:func:`tensorflow_logging_kept` undoes what importing coremltools does to TensorFlow's logging.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

logger = logging.getLogger("catsdogs")

#: an absl log line: severity letter, MMDD, time (before absl is initialised: 00:00: and the
#: seconds since the epoch), thread id, ``file:line]``
ABSL_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\]\s]+:\d+\] ")
#: what absl prints once before its first line when nothing initialised it
ABSL_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}
#: a line of TFLite's (LiteRT's) own minimal logger, which ignores ``TF_CPP_MIN_LOG_LEVEL`` too:
#: ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`` when an interpreter is allocated
TFLITE_LINE = re.compile(r"^(VERBOSE|INFO|WARNING|ERROR): ")
TFLITE_SEVERITY = {"VERBOSE": 0, "INFO": 0, "WARNING": 1, "ERROR": 2}
#: TensorFlow's frequent-retracing warning (``polymorphic_function._FrequentTracingDetector``)
RETRACING = "triggered tf.function retracing"
#: TensorFlow's I-level line when it finds no CUDA driver library (``cudart_stub.cc``)
NO_DRIVER = "Could not find cuda drivers on your machine"
#: E-level absl lines that are notices, not faults, held like the lines below the level when it is
#: at least 1: ``(text in the line, text the same capture must also hold, or None)``
NOTICES: tuple[tuple[str, str | None], ...] = (
    ("failed call to cuInit", NO_DRIVER),  # no driver, as TensorFlow has just said: no GPU
    ("oneDNN supports DT_HALF only on platforms with", None),  # float16 runs on Eigen's kernels
)


def min_log_level() -> int:
    """``TF_CPP_MIN_LOG_LEVEL`` as TensorFlow reads it (unset or not a number: 0, every line)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


@contextlib.contextmanager
def held_to_level() -> Iterator[None]:
    """:func:`stderr_held_to_level` at ``TF_CPP_MIN_LOG_LEVEL``; below 1, nothing is held."""
    level = min_log_level()
    if level < 1:
        yield
        return
    with stderr_held_to_level(level):
        yield


def split_lines(text: str, level: int) -> tuple[list[str], list[str]]:
    """``(kept, held)``: the absl and TFLite lines of ``text`` below ``level``, and absl's notice
    and the :data:`NOTICES` when ``level`` >= 1, are held; every other line is kept, in order."""
    kept: list[str] = []
    held: list[str] = []
    notices = [shown for shown, needs in NOTICES if needs is None or needs in text]
    for line in text.splitlines(keepends=True):
        match = ABSL_LINE.match(line)
        lite = TFLITE_LINE.match(line)
        below = ((match is not None and SEVERITY[match.group(1)] < level)
                 or (lite is not None and TFLITE_SEVERITY[lite.group(1)] < level))
        notice = level >= 1 and (line.strip() == ABSL_NOTICE
                                 or (match is not None and any(n in line for n in notices)))
        (held if below or notice else kept).append(line)
    return kept, held


@contextlib.contextmanager
def stderr_held_to_level(level: int) -> Iterator[None]:
    """File descriptor 2 captured for the block (C++ writes included); then the lines
    :func:`split_lines` holds are logged at DEBUG and the others written to ``sys.stderr``."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        captured = tempfile.TemporaryFile()
    except OSError:  # no writable temporary folder: hold nothing back
        yield
        return
    with captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept, held = split_lines(captured.read().decode("utf-8", "replace"), level)
            for line in held:
                logger.debug("tensorflow: %s", line.rstrip())
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _HeldLoader(importlib.abc.Loader):
    """The module's own loader, its ``exec_module`` run under :func:`stderr_held_to_level`."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        level = min_log_level()
        if level < 1:
            self.loader.exec_module(module)
            return
        with stderr_held_to_level(level):
            self.loader.exec_module(module)
            probe_tensorflow(module)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...
        return getattr(self.loader, name)


def probe_tensorflow(tf: Any) -> None:
    """What TensorFlow logs at its first device probe, done now: the physical devices listed
    (module docstring). Nothing is initialised by it: no op runs. A module without
    ``config.list_physical_devices`` is left alone; a probe that fails is TensorFlow's to report
    when the work itself runs."""
    list_devices = getattr(getattr(tf, "config", None), "list_physical_devices", None)
    if list_devices is None:
        return
    with contextlib.suppress(Exception):
        list_devices()


@functools.cache  # once per process: TensorFlow prints its notice once
def float16_notice_held() -> None:
    """TensorFlow's E-level DT_HALF notice (module docstring) made now, by a one-element float16
    cast while stderr is held to ``TF_CPP_MIN_LOG_LEVEL``. Call it where TensorFlow's runtime is in
    use already (an eager op initialises it), before the first float16 op. Below level 1 nothing is
    held, and nothing is done."""
    if min_log_level() < 1:
        return
    import tensorflow as tf

    with held_to_level(), contextlib.suppress(Exception):
        tf.cast(tf.zeros((1,)), tf.float16)


class _HeldImportFinder(importlib.abc.MetaPathFinder):
    """Finds ``names`` as the other finders do and wraps their loaders (:class:`_HeldLoader`)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)
        self._finding = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.names or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        if spec is not None and spec.loader is not None:
            spec.loader = _HeldLoader(spec.loader)
        return spec


def quiet_tensorflow_import(names: Iterable[str] = ("tensorflow",)) -> None:
    """Hold TensorFlow's start-up lines to ``TF_CPP_MIN_LOG_LEVEL`` when it is first imported
    (module docstring); once per process, and nothing once it is imported."""
    names = tuple(names)
    if all(name in sys.modules for name in names):
        return
    if any(isinstance(f, _HeldImportFinder) and f.names == frozenset(names) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _HeldImportFinder(names))


class _RetracingHeld(logging.Filter):
    """Stops TensorFlow's retracing warning at its logger, logging it at DEBUG on ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if RETRACING not in message:
            return True
        logger.debug("tensorflow: %s", message)
        return False


@contextlib.contextmanager
def tensorflow_logging_kept() -> Iterator[None]:
    """TensorFlow's logging settings as they were before the block: ``TF_CPP_MIN_LOG_LEVEL`` (set
    or unset) and the level of TensorFlow's Python logger. Importing coremltools' TensorFlow
    frontend sets them to 3 and FATAL for the whole process, and the variable for every process it
    starts (a Ray worker, a subprocess): TensorFlow's warnings and errors would vanish after an
    export to Core ML."""
    variable = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    try:
        yield
    finally:
        if variable is None:
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
        else:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = variable
        tf_logger.setLevel(level)


@contextlib.contextmanager
def retracing_held() -> Iterator[None]:
    """TensorFlow's "... triggered tf.function retracing" warnings logged at DEBUG on the
    ``catsdogs`` logger during the block instead of written to stderr (module docstring); every
    other record of TensorFlow's logger passes as before."""
    held = _RetracingHeld()
    tf_logger = logging.getLogger("tensorflow")  # what tf.get_logger() returns
    tf_logger.addFilter(held)
    try:
        yield
    finally:
        tf_logger.removeFilter(held)
