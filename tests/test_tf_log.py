"""TensorFlow's absl start-up lines are held to ``TF_CPP_MIN_LOG_LEVEL`` (catsdogs.util.tf_log).

A real module in a subprocess writes, while it is imported, absl-formatted lines of each
severity, absl's notice and a plain line straight to file descriptor 2 (as TensorFlow's C++ does),
then a Python warning; the CLI's hook is installed for it by name. Whether TensorFlow still prints
such lines is checked by the CLI test (tests/test_cli.py) and, for the lines of its device probe
and first float16 op, by the last test here, on the real TensorFlow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from catsdogs.util.tf_log import ABSL_NOTICE, split_lines

LINES = {
    "notice": ABSL_NOTICE,
    "info": "I0000 00:00:1796541910.612889   18409 port.cc:153] oneDNN custom operations are on.",
    "warning": "W1203 10:11:12.000001   18409 cpu_feature_guard.cc:227] a warning",
    # with a CUDA driver (no NO_DRIVER line before it) a failed cuInit is a fault, and is shown
    "error": "E0000 00:00:1796541913.660813   18409 cuda_platform.cc:52] failed call to cuInit",
    "plain": "To enable the following instructions: AVX2 FMA",
}

#: what TensorFlow prints on a machine without a CUDA driver, and at its first float16 op
NO_DRIVER_LINE = ("I0000 00:00:1796649249.556379   19546 cudart_stub.cc:31] Could not find cuda "
                  "drivers on your machine, GPU will not be used.")
CU_INIT_LINE = ("E0000 00:00:1796649250.948451   19546 cuda_platform.cc:52] failed call to cuInit: "
                "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)")
DT_HALF_LINE = ("E0000 00:00:1796649250.974043   19546 util.cc:131] oneDNN supports DT_HALF only on "
                "platforms with AVX-512. Falling back to the default Eigen-based implementation if present.")

NOISY = textwrap.dedent(f"""
    import os
    import warnings

    for line in {list(LINES.values())!r}:
        os.write(2, (line + "\\n").encode())
    warnings.warn("a Python warning while importing", UserWarning)
    VALUE = 42
""")

DRIVER = textwrap.dedent("""
    import importlib.resources, json, logging, sys
    logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(message)s")
    from catsdogs.util.tf_log import quiet_tensorflow_import
    quiet_tensorflow_import(["noisy_pkg"])
    quiet_tensorflow_import(["noisy_pkg"])  # once is enough
    import noisy_pkg
    print(json.dumps({"value": noisy_pkg.VALUE,
                      "resource": importlib.resources.files("noisy_pkg").joinpath("data.txt").read_text()}))
""")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    (root / "noisy_pkg").mkdir()
    (root / "noisy_pkg" / "__init__.py").write_text(NOISY)
    (root / "noisy_pkg" / "data.txt").write_text("packaged")
    return root


def _import(site, level: str | None):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    if level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = level
    proc = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True, env=env,
                          timeout=120, check=True)
    *debug, result = proc.stdout.strip().splitlines()
    return proc.stderr, "\n".join(debug), json.loads(result)


@pytest.mark.parametrize("level, shown", [
    ("2", {"error", "plain"}),
    ("1", {"warning", "error", "plain"}),
    ("3", {"plain"}),
    ("0", set(LINES)),
    (None, set(LINES)),  # unset: TensorFlow shows everything, so do we
])
def test_lines_below_the_level_are_held_and_logged_at_debug(site, level, shown):
    stderr, debug, result = _import(site, level)
    assert result == {"value": 42, "resource": "packaged"}  # the module and its loader work
    for key, line in LINES.items():
        if key in shown:
            assert line in stderr and line not in debug, (key, stderr)
        else:
            assert line not in stderr and f"tensorflow: {line}" in debug, (key, stderr, debug)
    assert "a Python warning while importing" in stderr
    # what is shown keeps its order
    positions = [stderr.index(LINES[k]) for k in LINES if k in shown]
    assert positions == sorted(positions)


def test_split_lines():
    text = "".join(line + "\n" for line in LINES.values())
    kept, held = split_lines(text, 2)
    assert [ln.rstrip() for ln in held] == [LINES["notice"], LINES["info"], LINES["warning"]]
    assert [ln.rstrip() for ln in kept] == [LINES["error"], LINES["plain"]]
    assert split_lines("no newline at the end", 3) == (["no newline at the end"], [])
    assert split_lines(text, 0) == (text.splitlines(keepends=True), [])


@pytest.mark.parametrize("level", [1, 2])
def test_the_cuinit_line_is_held_only_where_tensorflow_found_no_driver(level):
    driverless = f"{NO_DRIVER_LINE}\n{CU_INIT_LINE}\n{DT_HALF_LINE}\n"
    kept, held = split_lines(driverless, level)
    assert kept == [] and len(held) == 3
    # a driver was found (no cudart_stub line): cuInit failing is a fault, shown
    kept, held = split_lines(f"{CU_INIT_LINE}\n{DT_HALF_LINE}\n", level)
    assert kept == [CU_INIT_LINE + "\n"] and held == [DT_HALF_LINE + "\n"]
    # an error that merely mentions them outside an absl line is not TensorFlow's notice
    assert split_lines("failed call to cuInit (from somewhere else)\n", level)[1] == []
    # TF_CPP_MIN_LOG_LEVEL=0 keeps every line
    assert split_lines(driverless, 0) == (driverless.splitlines(keepends=True), [])


PROBED = textwrap.dedent("""
    import json, logging, os, sys
    logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="DEBUG %(message)s")
    import catsdogs.cli  # installs the import hook, as running the command line does
    import tensorflow as tf
    os.write(2, b"-- imported\\n")
    # the import ran no op: a plugin may still configure TensorFlow's runtime after it
    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.set_visible_devices(tf.config.list_physical_devices("CPU"))
    from catsdogs.util.tf_log import float16_notice_held
    float16_notice_held()  # as the maps model and the finetune head do before their first
    tf.cast(tf.ones((2, 2)), tf.float16)
    float16_notice_held()  # once per process
    os.write(2, b"-- used\\n")
    print(json.dumps({"threads": tf.config.threading.get_intra_op_parallelism_threads()}))
""")


def _at_the_cli_level(script: str, *args: str, level: str = "2") -> subprocess.CompletedProcess:
    """``script`` (with ``args``) run by a new Python at ``TF_CPP_MIN_LOG_LEVEL`` ``level`` (the
    CLI's, 2, unless given); it must succeed."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": level}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_tensorflow_device_probe_and_float16_notices_are_held_on_the_cli():
    proc = _at_the_cli_level(PROBED)
    *debug, result = proc.stdout.strip().splitlines()
    debug, stderr = "\n".join(debug), proc.stderr
    assert json.loads(result) == {"threads": 2}
    assert "DT_HALF" not in stderr, stderr
    if "Could not find cuda drivers" in debug:  # no CUDA driver: no GPU, as TensorFlow said
        assert "cuInit" not in stderr, stderr
    # TensorFlow's start-up lines are in the log, at DEBUG, not on stderr
    for line in stderr.splitlines():
        assert not line.startswith(("I0000", "W0000")), stderr
    assert "-- imported" in stderr and "-- used" in stderr


def test_without_a_temporary_file_nothing_is_held(monkeypatch, capfd):
    import tempfile

    from catsdogs.util import tf_log

    def no_tmp(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_tmp)
    with tf_log.stderr_held_to_level(2):
        os.write(2, (LINES["info"] + "\n").encode())
    assert LINES["info"] in capfd.readouterr().err


#: a script whose first float16 op is one place's, and the rows it gives
FIRST_FLOAT16 = {
    # the maps cache's model casts the maps to float16
    "maps": ("""
from catsdogs.features.maps import MapsModel
images = np.random.default_rng(0).integers(0, 255, (4, 24, 24, 3), dtype=np.uint8)
out = MapsModel(TinyTopSplit(), "none", 24, 1, 2)(images)
""", 4),
    # the finetune head rounds its maps to float16 (fit, then predict)
    "finetune": ("""
from catsdogs.builtin.finetune import FineTuneHead
from catsdogs.plugins import get_registry
from catsdogs.testing import MAPS_HEAD_PARAMS, make_maps
maps, y = make_maps(16)
with get_registry().temporarily("backbones", TinyTopSplit(), "catsdogs.testing"):
    out = FineTuneHead(**MAPS_HEAD_PARAMS).fit(maps, y, epochs=1, batch_size=8, seed=1).predict_proba(maps)
""", 16),
}


@pytest.mark.parametrize("first", sorted(FIRST_FLOAT16))
def test_the_first_float16_op_of_maps_or_finetune_writes_no_dt_half_line(first):
    """oneDNN's DT_HALF notice comes at a process's first float16 op, wherever that is: each
    place that runs one holds it first (under the CLI's level)."""
    body, rows = FIRST_FLOAT16[first]
    proc = _at_the_cli_level("import numpy as np\nimport catsdogs.cli\n"
                             "from catsdogs.testing import TinyTopSplit\n" + body + "print(len(out))\n")
    assert proc.stdout.split()[-1] == str(rows)
    assert "DT_HALF" not in proc.stderr, proc.stderr


LITE_LINE = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."


def test_split_lines_reads_tflites_own_logger_like_absl():
    text = f"{LITE_LINE}\nWARNING: a TFLite warning\nERROR: a TFLite error\nINFO:not its format\n"
    kept, held = split_lines(text, 2)
    assert held == [f"{LITE_LINE}\n", "WARNING: a TFLite warning\n"]
    assert kept == ["ERROR: a TFLite error\n", "INFO:not its format\n"]
    assert split_lines(text, 1)[1] == [f"{LITE_LINE}\n"]
    assert split_lines(text, 0) == (text.splitlines(keepends=True), [])


LITERT = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(message)s")
    import numpy as np
    from catsdogs.app.models import TFLiteModel
    model = TFLiteModel(sys.argv[1])
    print(model({"x": np.zeros(8, np.float32)}))
""")


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory):
    pytest.importorskip("ai_edge_litert")
    tf = pytest.importorskip("tensorflow")
    path = tmp_path_factory.mktemp("lite") / "tiny.tflite"

    class Tiny(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32, name="x")])
        def serve(self, x):
            return {"p": tf.reduce_mean(x, axis=1, keepdims=True)}

    tiny = Tiny()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [tiny.serve.get_concrete_function()], tiny)
    path.write_bytes(converter.convert())
    return path


@pytest.mark.parametrize("level, shown", [("2", False), ("0", True)])
def test_litert_xnnpack_notice_is_held_to_the_level(tiny_tflite, level, shown):
    """LiteRT prints its XNNPACK line when the interpreter is allocated, whatever the level
    says; a TFLite export's runner holds it like TensorFlow's own INFO lines."""
    proc = _at_the_cli_level(LITERT, str(tiny_tflite), level=level)
    assert "'p'" in proc.stdout  # the model ran
    assert (LITE_LINE in proc.stderr) is shown, proc.stderr
    assert (f"tensorflow: {LITE_LINE}" in proc.stdout) is not shown, proc.stdout
