"""``catsdogs serve``: the exported model behind a small web app (FastAPI + uvicorn).

* ``GET /`` — one page (``static/``): drop or pick photos, see the label with its confidence, the
  "neither cat nor dog" warning with its score, and the CAM overlay when the model has a CAM head.
* ``POST /api/predict`` — multipart form, one or more ``file`` fields -> the JSON list of
  ``catsdogs predict --json`` (one row per file, in order); ``cam`` is a ``data:image/jpeg`` URL of
  the overlay instead of a file path (``?cam=false`` leaves it out).
* ``GET /healthz`` — model, backend, limits, requests served, body bytes in flight, and
  ``tensorflow_loaded``. ``/`` and ``/healthz`` answer ``HEAD`` too.
* ``GET /model`` (HTML) and ``GET /api/model`` (JSON) — the export manifest.

**Model.** ``serve`` takes an export directory (``export.json``) or a finished run directory: its
``export/`` when present, else the run is exported there first (TFLite; for a run extracted in
int8 also ``openvino``, which is then served: its own quantised networks, heads on TFLite,
:mod:`catsdogs.app.pipeline`) by ``catsdogs export`` in a child process, so the server process
itself never imports TensorFlow. The model is loaded
once, at start, into ``concurrency`` TFLite (LiteRT) interpreters — an interpreter is not
thread-safe, so each request takes one from a pool; a Keras-only export shares one model (and then
TensorFlow is loaded). At most ``concurrency`` photos are decoded and predicted at once (a thread
limiter); others wait.

**Bad input** never gives a 500: a body that is not ``multipart/form-data`` -> 415; no ``file``
field, empty files, corrupt or truncated images, decompression bombs (refused by the reader,
:mod:`catsdogs.dataset.images`, from the image header before decoding) -> 422 with the reader's
reason; bytes that are not an image -> 415 with the
reader's reason; a file over ``max_upload_mb`` or more than ``max_files`` files -> 413, decided
while the body streams in (the declared ``Content-Length`` first, then counted bytes), never
after buffering it. With several files, the request succeeds when at least one is a usable image
and the others carry ``error`` (as ``catsdogs predict --json`` does); when none is, the status of
the first failure is returned.

**Bytes in flight.** Request bodies held in memory (being received, or waiting for and in
prediction) are bounded across all requests by ``Limits.max_in_flight_bytes`` (default: two
maximal requests, ``2 x max_files x max_upload``): a request reserves its declared
``Content-Length`` (the maximal body when it declares none) *before* reading its body, and waits
while the reservations of others would exceed the bound; meanwhile its bytes stay in the
client's socket (uvicorn reads at most 64 KB ahead per connection). So N slow clients hold at most
the bound, not N bodies.

**Listening.** The address is bound before the model loads: a port in use is one ``Error:`` line
at once, and ``--port 0`` takes a free port, printed in the "serving ..." line.
"""

import asyncio
import base64
import errno
import html
import io
import logging
import math
import os
import queue
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catsdogs.errors import ConfigError, DataError
from catsdogs.util.extras import require

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

logger = logging.getLogger("catsdogs")

STATIC = Path(__file__).with_name("static")
DEFAULT_MAX_UPLOAD_MB = 10.0
DEFAULT_MAX_FILES = 16
#: long side of the CAM overlay sent back (the photo is downscaled before blending)
CAM_SIDE = 480
#: after a 413, at most this many more body bytes are read and dropped so that the client sees
#: the answer instead of a reset connection; beyond it the connection is closed
DRAIN_BYTES = 64 * 1024 * 1024
#: multipart framing allowance per file (boundary and part headers)
PART_OVERHEAD = 16 * 1024
#: the smallest upload limit accepted (a photo smaller than this is no photo)
MIN_UPLOAD_BYTES = 1024


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1024 * 1024)
    max_files: int = DEFAULT_MAX_FILES
    #: request-body bytes held at once over all requests (None: two maximal requests)
    max_in_flight: int | None = None

    @classmethod
    def from_mb(cls, max_upload_mb: float, max_files: int = DEFAULT_MAX_FILES) -> "Limits":
        """Limits from ``--max-upload-mb`` (a finite number of MB, at least 1 KB); a bad value is
        one :class:`ConfigError`."""
        try:
            mb = float(max_upload_mb)
        except (TypeError, ValueError):
            mb = math.nan
        if not math.isfinite(mb) or mb * 1024 * 1024 < MIN_UPLOAD_BYTES:
            raise ConfigError(f"--max-upload-mb must be a finite number of MB, at least "
                              f"{MIN_UPLOAD_BYTES / 1024 / 1024:g} (1 KB), got {max_upload_mb!r}")
        if max_files < 1:
            raise ConfigError(f"--max-files must be at least 1, got {max_files}")
        return cls(max_upload_bytes=int(mb * 1024 * 1024), max_files=max_files)

    @property
    def max_body_bytes(self) -> int:
        return self.max_files * (self.max_upload_bytes + PART_OVERHEAD)

    @property
    def max_in_flight_bytes(self) -> int:
        """The bound on request-body bytes held at once (never below one maximal request)."""
        return max(self.max_body_bytes, self.max_in_flight or 2 * self.max_body_bytes)

    def describe(self) -> dict[str, Any]:
        return {"max_upload_mb": round(self.max_upload_bytes / 1024 / 1024, 3),
                "max_files": self.max_files,
                "max_in_flight_mb": round(self.max_in_flight_bytes / 1024 / 1024, 3)}


class ByteBudget:
    """Request-body bytes held at once, bounded (see the module docstring): a request reserves
    its bytes before reading its body and releases them when its answer is ready."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0  # bytes reserved
        self.holders = 0  # requests holding a reservation
        self.waiting = 0  # requests waiting for one
        self._condition: asyncio.Condition | None = None

    @asynccontextmanager
    async def reserve(self, n: int) -> AsyncIterator[None]:
        n = max(0, min(n, self.limit))
        if self._condition is None:  # created in the server's event loop
            self._condition = asyncio.Condition()
        condition = self._condition
        async with condition:
            self.waiting += 1
            try:
                await condition.wait_for(lambda: self.used + n <= self.limit)
            finally:
                self.waiting -= 1
            self.used += n
            self.holders += 1
        try:
            yield
        finally:
            async with condition:
                self.used -= n
                self.holders -= 1
                condition.notify_all()

    def describe(self) -> dict[str, int]:
        return {"bytes_in_flight": self.used, "requests_in_flight": self.holders,
                "requests_waiting": self.waiting}


def body_reservation(request, limits: Limits) -> int:
    """What a request reserves: its declared ``Content-Length``; the maximal body when it declares
    none; nothing when it declares more than the maximum (refused with 413 without keeping any)."""
    declared = request.headers.get("content-length", "")
    if not declared.isdigit():
        return limits.max_body_bytes
    return int(declared) if int(declared) <= limits.max_body_bytes else 0


class UploadError(Exception):
    """A request the server refuses: ``status`` and a one-line ``detail``."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class Upload:
    name: str
    data: bytes


# ------------------------------------------------------------------------------------ model
def resolve_model(path: str | os.PathLike, echo=print) -> Path:
    """The export directory to serve for ``path`` (an export or a run directory, see the module
    docstring); exports a run that has none, in a child process."""
    path = Path(path)
    if (path / "export.json").is_file():
        return path
    if not (path / "record.json").is_file():
        raise DataError(f"{path} is neither an export directory (export.json) nor a finished run "
                        "directory (record.json)")
    export = path / "export"
    if (export / "export.json").is_file():
        return export
    from catsdogs.app.export import load_run
    from catsdogs.app.pipeline import is_int8

    # an int8 run also gets its own quantised networks (openvino), which the server then uses
    formats = "tflite,openvino" if is_int8(load_run(path)) else "tflite"
    echo(f"{path} has no export yet: exporting it ({formats}) to {export} ...")
    cmd = [sys.executable, "-m", "catsdogs", "export", str(path), "--format", formats,
           "--out", str(export)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise DataError(f"exporting {path} failed ({last}); export it with `catsdogs export {path} "
                        f"--format {formats} --out DIR` and serve DIR")
    return export


class ModelPool:
    """The model loaded once, as ``size`` predictors handed out one request at a time."""

    def __init__(self, export_dir: Path, size: int):
        from catsdogs.app.export import load_manifest
        from catsdogs.app.predict import open_predictor

        self.export_dir = export_dir
        self.manifest = load_manifest(export_dir)
        threads = max(1, (os.cpu_count() or 1) // size)
        first = open_predictor(export_dir, "auto", num_threads=threads)
        if first.backend == "keras":  # one Keras model is safe to call from several threads
            logger.warning("%s has no TFLite model: serving Keras (TensorFlow in the server); "
                           "export with `--format tflite` for a lighter server", export_dir)
            rest = [first] * (size - 1)
        else:  # a TFLite interpreter is not: one per slot
            rest = [open_predictor(export_dir, first.backend, num_threads=threads, warn=False)
                    for _ in range(size - 1)]  # the first said what there is to say
        self.size = size
        self.backend = first.backend
        self.cam_capable = first.cam_capable
        self.has_neither = first.threshold is not None
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for predictor in [first, *rest]:
            self._free.put(predictor)

    @contextmanager
    def predictor(self) -> Iterator[Any]:
        predictor = self._free.get()
        try:
            yield predictor
        finally:
            self._free.put(predictor)

    def exported_at(self) -> str:
        stamp = self.manifest.get("exported_at")
        if stamp:
            return stamp
        mtime = (self.export_dir / "export.json").stat().st_mtime
        return datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------ uploads
class _PartCollector:
    """python-multipart callbacks keeping the ``file`` parts, refusing over-size ones as they
    stream in."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.uploads: list[Upload] = []
        self._headers: dict[bytes, bytes] = {}
        self._field = self._value = b""
        self._name: str | None = None  # None: not a ``file`` part
        self._data = bytearray()

    def callbacks(self) -> "MultipartCallbacks":
        return {"on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished}

    def on_part_begin(self) -> None:
        self._headers, self._name, self._data = {}, None, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field = self._value = b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if options.get(b"name") != b"file":
            return  # other fields are ignored
        if len(self.uploads) >= self.limits.max_files:
            raise UploadError(413, f"too many files: at most {self.limits.max_files} per request")
        filename = options.get(b"filename") or f"upload-{len(self.uploads) + 1}".encode()
        self._name = filename.decode("utf-8", "replace")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name is None:
            return
        if len(self._data) + end - start > self.limits.max_upload_bytes:
            mb = self.limits.max_upload_bytes / 1024 / 1024
            raise UploadError(413, f"{self._name}: larger than the upload limit of {mb:g} MB "
                                   "(catsdogs serve --max-upload-mb)")
        self._data += data[start:end]

    def on_part_end(self) -> None:
        if self._name is not None:
            self.uploads.append(Upload(self._name, bytes(self._data)))
        self._name = None


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    dropped = 0
    async for chunk in chunks:
        dropped += len(chunk)
        if dropped > DRAIN_BYTES:
            return


async def read_uploads(request, limits: Limits) -> list[Upload]:
    """The request's ``file`` parts; raises :class:`UploadError` (413 as soon as a limit is
    crossed, 415 for a body that is not ``multipart/form-data``, 400 for a malformed one)."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header
    from starlette.requests import ClientDisconnect

    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(415, "send the photos as multipart/form-data, one or more fields named "
                               "`file` (curl -F file=@photo.jpg)")
    declared = request.headers.get("content-length", "")
    chunks = request.stream().__aiter__()
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        await _drain(chunks)
        raise UploadError(413, f"request body of {int(declared)} bytes is over the limit of "
                               f"{limits.max_body_bytes} ({limits.max_files} files of "
                               f"{limits.max_upload_bytes} bytes)")
    collector = _PartCollector(limits)
    parser = MultipartParser(params[b"boundary"], collector.callbacks())
    received = 0
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > limits.max_body_bytes:
                raise UploadError(413, f"request body over the limit of {limits.max_body_bytes} "
                                       "bytes")
            parser.write(chunk)
        parser.finalize()
    except UploadError as exc:
        if exc.status == 413:
            await _drain(chunks)
        raise
    except FormParserError as exc:
        raise UploadError(400, f"malformed multipart body ({exc})") from None
    except ClientDisconnect:
        raise UploadError(400, "the client disconnected before sending the whole body") from None
    if not collector.uploads:
        raise UploadError(422, "no photo: send one or more multipart fields named `file`")
    return collector.uploads


# ------------------------------------------------------------------------------------ predicting
def cam_data_url(predictor, photo, image) -> str:
    """The CAM overlay of one photo as a ``data:image/jpeg;base64`` URL (long side ``CAM_SIDE``)."""
    import numpy as np
    from PIL import Image

    from catsdogs.app.cam import cam_picture

    thumb = Image.fromarray(photo)
    thumb.thumbnail((CAM_SIDE, CAM_SIDE), Image.Resampling.BILINEAR)
    picture, _, _ = cam_picture(predictor, np.asarray(thumb), image)
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def predict_upload(pool: ModelPool, upload: Upload, limits: Limits, want_cam: bool) -> dict:
    """One row of ``catsdogs predict --json`` for an uploaded photo (``error`` when unusable)."""
    from catsdogs.app.predict import predict_bytes

    with pool.predictor() as predictor:
        pred, prepared = predict_bytes(predictor, upload.data, upload.name)
        row = pred.to_dict()
        if prepared is not None and want_cam and predictor.cam_capable:
            row["cam"] = cam_data_url(predictor, *prepared)
    return row


def error_status(reason: str) -> int:
    """415 for bytes that are not an image, 422 for other unusable images (empty, corrupt, bomb)."""
    return 415 if reason.startswith("not an image") else 422


# ------------------------------------------------------------------------------------ pages
def manifest_page(pool: ModelPool) -> str:
    """The export manifest as a small HTML page."""
    m = pool.manifest
    esc = html.escape
    metrics = m.get("metrics") or {}
    rows = [("run", m.get("run_id")), ("combination", " + ".join(m.get("combination", []))),
            ("head", m.get("head")), ("exported", pool.exported_at()),
            ("validation log loss (ranking)", _fmt(m.get("ranking_logloss", metrics.get("logloss")))),
            ("post-processing", (m.get("postprocess") or {}).get("describe", "none")),
            ("validation accuracy", _fmt(metrics.get("accuracy"))),
            ("input", f"{m['input']['size']} x {m['input']['size']} RGB 0-255, "
                      f"resize: {m['input']['resize']}"),
            ("backend", pool.backend), ("CAM", "yes" if pool.cam_capable else "no"),
            ("neither threshold", _fmt((m.get("neither") or {}).get("threshold"))),
            ("catsdogs version", m.get("catsdogs_version")), ("export directory", pool.export_dir)]
    table = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in rows)
    backbones = "".join(
        f"<tr><td>{esc(str(b.get('name')))}</td><td>{esc(str(b.get('image_size')))}</td>"
        f"<td>{esc(str(b.get('weights', '')))}</td></tr>" for b in m.get("backbones", []))
    files = "".join(
        f"<tr><td>{esc(kind)}</td><td>{esc(fmt)}</td><td>{esc(str(e.get('file')))}</td>"
        f"<td>{e.get('bytes', 0) / 1e6:.1f} MB</td></tr>"
        for kind, formats in m.get("models", {}).items() for fmt, e in formats.items())
    notes = "".join(f"<li>{esc(n)}</li>" for n in m.get("notes", []))
    return (STATIC.joinpath("model.html").read_text()
            .replace("{{summary}}", table).replace("{{backbones}}", backbones)
            .replace("{{files}}", files).replace("{{notes}}", notes or "<li>none</li>"))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------ app
def create_app(export_dir: str | os.PathLike, concurrency: int = 2, limits: Limits | None = None):
    """The FastAPI app serving ``export_dir`` (the model is loaded here, once)."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    limits = limits or Limits()
    pool = ModelPool(Path(export_dir), concurrency)
    limiter = anyio.CapacityLimiter(concurrency)
    budget = ByteBudget(limits.max_in_flight_bytes)
    stats = {"requests": 0, "photos": 0, "started": time.time()}
    app = FastAPI(title="catsdogs", docs_url="/api/docs", redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(UploadError)
    async def refused(request: Request, exc: UploadError):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/model", response_class=HTMLResponse)
    async def model_page():
        return manifest_page(pool)

    @app.get("/api/model")
    async def model_manifest():
        return {**pool.manifest, "exported_at": pool.exported_at()}

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz():
        return {"status": "ok", "model": str(pool.export_dir), "run_id": pool.manifest.get("run_id"),
                "backend": pool.backend, "cam": pool.cam_capable, "neither": pool.has_neither,
                "concurrency": pool.size, "limits": limits.describe(),
                "requests": stats["requests"], "photos": stats["photos"], **budget.describe(),
                "uptime_s": round(time.time() - stats["started"], 1), "pid": os.getpid(),
                "tensorflow_loaded": "tensorflow" in sys.modules}

    @app.post("/api/predict")
    async def api_predict(request: Request, cam: bool = True):
        async with budget.reserve(body_reservation(request, limits)):
            uploads = await read_uploads(request, limits)
            rows = await asyncio.gather(*(
                anyio.to_thread.run_sync(predict_upload, pool, u, limits, cam, limiter=limiter)
                for u in uploads))
            del uploads
        stats["requests"] += 1
        stats["photos"] += len(rows)
        if all(row["error"] for row in rows):
            first = rows[0]
            raise UploadError(error_status(first["error"]), f"{first['file']}: {first['error']}")
        return rows

    return app


def serve(model: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
          concurrency: int = 2, limits: Limits | None = None, echo=print) -> None:
    """Load the model and run the app with uvicorn until interrupted."""
    for module in ("fastapi", "python_multipart"):
        require(module, feature="catsdogs serve")
    uvicorn = require("uvicorn", feature="catsdogs serve")
    sock = listen_socket(host, port)  # before the model loads: a port in use is found at once
    try:
        export_dir = resolve_model(model, echo)
        app = create_app(export_dir, concurrency, limits)
        if host not in ("127.0.0.1", "localhost", "::1"):
            echo(f"warning: listening on {host}: the app has no authentication")
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        echo(f"serving {export_dir} on http://{shown}:{bound}/ (API: POST /api/predict, GET /healthz)")
        config = uvicorn.Config(app, host=host, port=bound, log_level="info",
                                timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``port`` 0: a free one); an address that cannot be
    used is one :class:`ConfigError`."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: unknown host ({exc.strerror}); "
                          "check --host") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = ("another program uses it; choose another --port (--port 0 picks a free one)"
                if exc.errno == errno.EADDRINUSE else "check --host and --port")
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; {hint}") from None
    sock.set_inheritable(True)
    return sock
