"""Take docs/img/serve.png: ``catsdogs serve MODEL`` on 127.0.0.1, photos uploaded in headless
Chromium (Playwright), the page saved as PNG.

    python docs/img/serve_screenshot.py RUN_OR_EXPORT docs/img/serve.png PHOTO [PHOTO ...]

A generated colour gradient (a non-pet picture) is uploaded after the photos.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from playwright.sync_api import expect, sync_playwright

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def main(model: str, out: str, *photos: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "catsdogs", "serve", model, "--port", str(port)])
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        with tempfile.TemporaryDirectory() as tmp:
            ramp = np.linspace(0, 255, 240)
            gradient = np.stack([np.tile(ramp, (240, 1)), np.tile(ramp[:, None], (1, 240)),
                                 np.full((240, 240), 200.0)], axis=2).astype(np.uint8)
            picture = Path(tmp) / "gradient.png"
            Image.fromarray(gradient).save(picture)
            chromium = os.environ.get("CATSDOGS_CHROMIUM") or shutil.which("chromium")
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, args=ARGS)
                page = browser.new_page(viewport={"width": 1100, "height": 760})
                page.goto(url + "/")
                page.set_input_files("#picker", [*photos, str(picture)])
                expect(page.locator('article[data-state="pending"]')).to_have_count(0, timeout=120_000)
                page.screenshot(path=out, full_page=True)
                browser.close()
        print(f"wrote {out}")
    finally:
        os.kill(server.pid, signal.SIGINT)
        server.wait(timeout=30)


if __name__ == "__main__":
    main(*sys.argv[1:])
