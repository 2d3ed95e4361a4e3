"""The ``catsdogs serve`` page in a real headless Chromium (Debian's ``chromium``, or
``$CATSDOGS_CHROMIUM``) driven by Playwright: upload a real photo, a non-pet picture and a text file,
check what the page shows against the API's answer for the same bytes, save a screenshot PNG."""

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api")

from serve_fixtures import SAMPLE_TEST, Server, build_run, gradient_png  # noqa: E402

pytestmark = [pytest.mark.serve, pytest.mark.slow]

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str:
    """The Chromium to drive; none: a skip on a developer's machine, a failure in CI (``CI`` set,
    as CI services do), where the browser test must run."""
    path = os.environ.get("CATSDOGS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        missing = f"no Chromium at {path} (apt-get install chromium, or set CATSDOGS_CHROMIUM)"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{missing}; CI=true: the browser test must run in CI", pytrace=False)
        pytest.skip(missing)
    return path


@pytest.fixture(scope="module")
def chromium() -> str:
    return chromium_path()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run_dir = build_run(tmp_path_factory.getbasetemp() / "serve-run")
    srv = Server(run_dir, tmp_path_factory.mktemp("serve-browser") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(chromium, server):  # Chromium first: a missing browser is found before the server starts
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            yield page
        finally:
            browser.close()


def api_answer(server, path: Path) -> dict:
    response = httpx.post(server.url + "/api/predict", files=[("file", (path.name, path.read_bytes()))],
                          timeout=60)
    return {"status": response.status_code, **(response.json()[0] if response.is_success
                                                 else response.json())}


def card(page, name: str):
    node = page.locator(f'article.card[data-file="{name}"]')
    sync_api.expect(node).not_to_have_attribute("data-state", "pending", timeout=60_000)
    return node


def check_prediction(node, expected: dict, cam: bool) -> None:
    assert node.get_attribute("data-state") == "done"
    label = expected["label"].capitalize()
    confidence = f"{100 * expected['confidence']:.2f}%"
    assert node.locator(".verdict .label").inner_text() == label
    assert node.locator(".verdict .confidence").inner_text() == confidence
    assert f"P(dog) = {expected['p_dog']:.4f}" in node.locator(".pdog").inner_text()
    score = f"{expected['neither_score']:.3f}"
    if expected["neither"]:
        warning = node.locator(".neither.warning")
        assert warning.is_visible()
        assert "Neither cat nor dog?" in warning.inner_text() and score in warning.inner_text()
        assert node.locator(".neither.ok").count() == 0
    else:
        assert node.locator(".neither.warning").count() == 0
        assert score in node.locator(".neither.ok").inner_text()
    cams = node.locator("img.cam")
    assert cams.count() == (1 if cam else 0)
    if cam:  # the overlay decoded and drawn by the browser
        assert cams.evaluate("img => img.complete && img.naturalWidth > 0")


def test_page_shows_label_confidence_neither_and_cam(page, server, tmp_path):
    photo = sorted(SAMPLE_TEST.glob("*.jpg"), key=lambda p: int(p.stem))[0]
    gradient = tmp_path / "gradient.png"
    gradient.write_bytes(gradient_png())
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo at all\n")
    expected = {p.name: api_answer(server, p) for p in (photo, gradient, text)}
    assert expected[photo.name]["status"] == 200 and expected[gradient.name]["status"] == 200
    assert expected[gradient.name]["neither"] is True  # the non-pet picture is flagged

    page.goto(server.url + "/")
    health = httpx.get(server.url + "/healthz", timeout=10).json()
    sync_api.expect(page.locator("#model-line")).to_contain_text(health["run_id"])
    sync_api.expect(page.locator("#limits")).to_contain_text("10 MB")
    page.set_input_files("#picker", [str(photo), str(gradient), str(text)])

    check_prediction(card(page, photo.name), expected[photo.name], cam=health["cam"])
    check_prediction(card(page, gradient.name), expected[gradient.name], cam=health["cam"])
    bad = card(page, text.name)
    assert bad.get_attribute("data-state") == "error"
    assert bad.locator(".error").inner_text() == "415: notes.jpg: not an image (text)"
    assert page.locator("article.card").count() == 3

    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"\nscreenshot: {shot}")

    page.goto(server.url + "/model")
    sync_api.expect(page.locator("#backbones")).to_contain_text("resnet50")
    assert "validation log loss" in page.locator("#summary").inner_text()
