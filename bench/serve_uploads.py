"""Memory of ``catsdogs serve`` under many slow uploads: the bytes-in-flight bound, measured.

Starts a real ``catsdogs serve`` on 127.0.0.1 (a tiny exported model: the one the serve tests
build, ResNet50 with random weights at 64 px + ``softmax_cam``, exported to TFLite; reused from
``--run`` or built once into ``--workdir``), measures its idle RSS after one warm-up prediction,
then opens ``--clients`` concurrent uploads that each trickle a ``--body-mb`` multipart body (one
``file`` part: a real photo followed by padding, so the server stores every byte of it) in
``--chunk-kb`` pieces every ``--interval`` seconds. Meanwhile it samples the server's RSS
(``/proc/PID/status``) and ``/healthz`` (bytes, requests in flight and waiting). Reports the idle
RSS, the peak (sampled VmRSS and the kernel's VmHWM), the peak minus idle against the server's
in-flight bound, the answers' status codes, the server's CPU seconds and the machine's load::

    python bench/serve_uploads.py [--clients 100] [--body-mb 9.5] [--run RUN_DIR] [--json out.json]

With the defaults (``--max-upload-mb 10``, ``--max-files 16``) the bound is two maximal requests,
2 x 16 x (10 MB + 16 KB) = 320.5 MB, so at most 33 uploads of 9.5 MB are taken in at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the serve tests' fixtures: build_run, free_port

MB = 1024 * 1024
BOUNDARY = "catsdogs-bench-upload"


def status_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def request_bytes(photo: bytes, body_bytes: int) -> tuple[bytes, bytes]:
    """Headers and body of one upload: a ``file`` part of ``body_bytes`` (photo + padding)."""
    head_part = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
                 f"filename=\"slow.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    padding = body_bytes - len(head_part) - len(photo) - len(tail)
    body = head_part + photo + b"\0" * padding + tail
    head = (f"POST /api/predict?cam=false HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head, body


async def upload(port: int, head: bytes, body: bytes, chunk: int, interval: float) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        view = memoryview(body)
        for start in range(0, len(body), chunk):
            writer.write(view[start:start + chunk])
            await writer.drain()  # blocks while the server leaves the bytes in the socket
            await asyncio.sleep(interval)
        answer = await reader.read()
        return int(answer.split(b" ", 2)[1])
    finally:
        writer.close()


async def sample(pid: int, port: int, stop: asyncio.Event, every: float) -> dict:
    import httpx

    peak = {"rss_kb": 0, "bytes_in_flight": 0, "requests_in_flight": 0, "requests_waiting": 0}
    samples = 0
    async with httpx.AsyncClient(timeout=30) as client:
        while not stop.is_set():
            peak["rss_kb"] = max(peak["rss_kb"], status_kb(pid)["VmRSS"])
            health = (await client.get(f"http://127.0.0.1:{port}/healthz")).json()
            for key in ("bytes_in_flight", "requests_in_flight", "requests_waiting"):
                peak[key] = max(peak[key], health[key])
            samples += 1
            try:
                await asyncio.wait_for(stop.wait(), every)
            except asyncio.TimeoutError:
                pass
    peak["samples"] = samples
    return peak


async def attack(pid: int, port: int, args, head: bytes, body: bytes) -> tuple[list, dict, float]:
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample(pid, port, stop, args.sample_every))
    t0 = time.perf_counter()
    statuses = await asyncio.gather(*(upload(port, head, body, args.chunk_kb * 1024, args.interval)
                                      for _ in range(args.clients)), return_exceptions=True)
    wall = time.perf_counter() - t0
    stop.set()
    return statuses, await sampler, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--body-mb", type=float, default=9.5, help="each upload's body (MiB)")
    parser.add_argument("--chunk-kb", type=int, default=64, help="bytes sent per step (KiB)")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between steps")
    parser.add_argument("--sample-every", type=float, default=0.05)
    parser.add_argument("--run", type=Path, help="a run or export to serve (default: built)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/catsdogs-bench-serve"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import httpx
    from serve_fixtures import SAMPLE_TEST, build_run, free_port

    run = args.run or build_run(args.workdir / "run")
    photo = sorted(SAMPLE_TEST.glob("*.jpg"))[0].read_bytes()
    head, body = request_bytes(photo, int(args.body_mb * MB))
    port = free_port()
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = open(args.workdir / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "catsdogs", "serve", str(run), "--host",
                             "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for _ in range(2400):  # until it answers (the model loads first), at most ~4 minutes
            if proc.poll() is not None:
                sys.exit(f"catsdogs serve exited with {proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        warm = httpx.post(f"http://127.0.0.1:{port}/api/predict", params={"cam": "false"},
                          files={"file": ("warm.jpg", photo, "image/jpeg")}, timeout=60)
        assert warm.status_code == 200, warm.text
        limits = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()["limits"]
        time.sleep(1.0)
        idle = status_kb(proc.pid)
        cpu0 = cpu_seconds(proc.pid)
        statuses, peak, wall = asyncio.run(attack(proc.pid, port, args, head, body))
        end = status_kb(proc.pid)
        cpu = cpu_seconds(proc.pid) - cpu0
        after = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    counts: dict[str, int] = {}
    for s in statuses:
        key = str(s) if isinstance(s, int) else type(s).__name__
        counts[key] = counts.get(key, 0) + 1
    peak_kb = max(peak["rss_kb"], end["VmHWM"])
    result = {
        "clients": args.clients, "body_mb": round(len(body) / MB, 3),
        "sent_mb": round(args.clients * len(body) / MB, 1),
        "trickle": f"{args.chunk_kb} KiB every {args.interval} s per client",
        "limits": limits,
        "idle_rss_mb": round(idle["VmRSS"] / 1024, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "peak_sampled_rss_mb": round(peak["rss_kb"] / 1024, 1),
        "peak_minus_idle_mb": round((peak_kb - idle["VmRSS"]) / 1024, 1),
        "peak_minus_idle_over_bound": round((peak_kb - idle["VmRSS"]) / 1024
                                            / limits["max_in_flight_mb"], 2),
        "without_a_bound_mb": round(args.clients * len(body) / MB, 1),
        "max_bytes_in_flight_mb": round(peak["bytes_in_flight"] / MB, 1),
        "max_requests_in_flight": peak["requests_in_flight"],
        "max_requests_waiting": peak["requests_waiting"],
        "health_samples": peak["samples"],
        "after": {k: after[k] for k in ("bytes_in_flight", "requests_in_flight", "requests_waiting")},
        "statuses": counts, "wall_s": round(wall, 1), "server_cpu_s": round(cpu, 1),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
