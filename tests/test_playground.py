"""The playground page in a real Chromium (Debian's `chromium`, driven by Playwright): upload a scene, run
detect and point and count the overlay elements against the API's answer, stream a caption, show errors, and
work behind a reverse proxy's path prefix with an API key that never lands in a URL."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from moonbase.api import VL
from moonbase.data.shapes import render_scene
from moonbase.hub import nano
from moonbase.server.app import ServerConfig, create_app
from moonbase.server.models import ServedModels

from .serving import serving

CHROMIUM = os.environ.get("MOONBASE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"  # screenshots (gitignored; CI keeps them)
playwright = pytest.importorskip("playwright.sync_api", reason="the test extras install playwright")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: .ci/run installs Debian's chromium package")


@pytest.fixture(scope="module")
def vl():
    return VL(nano())


@pytest.fixture(scope="module")
def server(vl):
    with serving(create_app(ServedModels({"nano": vl}, "nano")), 26020) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("page") / "scene.png"
    render_scene(seed=7, n_objects=4, size=(384, 384)).image.save(path)  # the README's sample scene
    return path


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _open(browser, url: str, scene: Path | None = None):
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.goto(url)
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    if scene is not None:
        page.set_input_files("#image-input", str(scene))
        page.wait_for_selector("#stage:not([hidden])")
    return page


def _run(page, skill: str, prompt: str = "") -> None:
    page.select_option("#skill", skill)
    if prompt:
        page.fill("#prompt", prompt)
    page.click("#run")
    page.wait_for_function("!document.querySelector('#run').disabled && document.querySelector('#stats').textContent")


def test_detect_and_point_draw_one_element_per_object(browser, server, scene):
    page = _open(browser, server + "/", scene)
    for skill, key, kind in (("detect", "objects", "box"), ("point", "points", "point")):
        want = httpx.post(f"{server}/v1/{skill}", json={"image_url": _data_url(scene), "object": "square"}, timeout=60).json()
        _run(page, skill, "square")
        assert want[key], "nano finds the squares of the sample scene"
        assert page.locator(f'#overlay [data-kind="{kind}"]').count() == len(want[key])
        assert page.text_content("#count").startswith(str(len(want[key])))
        assert "tokens in" in page.text_content("#stats") and page.is_hidden("#error")
    _run(page, "detect", "circle")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-detect.png"))
    box = page.locator('#overlay [data-kind="box"]').first.bounding_box()
    image = page.locator("#preview").bounding_box()
    want = httpx.post(f"{server}/v1/detect", json={"image_url": _data_url(scene), "object": "circle"}, timeout=60).json()
    assert abs((box["x"] - image["x"]) / image["width"] - want["objects"][0]["x_min"]) < 0.01  # drawn where it is
    page.close()


def test_a_streamed_caption_grows_then_completes(browser, server, scene, vl):
    page = _open(browser, server + "/", scene)
    page.evaluate(
        """() => { window.seen = [];
        new MutationObserver(() => window.seen.push(document.querySelector('#answer').textContent))
          .observe(document.querySelector('#answer'), {childList: true, characterData: true, subtree: true}); }"""
    )
    page.select_option("#length", "long")
    _run(page, "caption")
    seen = [s for s in page.evaluate("window.seen") if s]
    import numpy as np
    from PIL import Image

    want = vl.caption(np.asarray(Image.open(scene).convert("RGB")), "long", settings={"temperature": 0.0})["caption"]
    assert len(seen) >= 2 and all(b.startswith(a) for a, b in zip(seen, seen[1:], strict=False)), seen
    assert page.text_content("#answer") == seen[-1] and seen[-1].strip() == want.strip()
    page.close()


def test_errors_show_as_messages(browser, server, scene, tmp_path):
    page = _open(browser, server + "/")
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    page.set_input_files("#image-input", str(bad))
    page.wait_for_selector("#error:not([hidden])")
    assert "not an image" in page.text_content("#error")
    page.set_input_files("#image-input", str(scene))
    page.wait_for_selector("#stage:not([hidden])")
    page.select_option("#skill", "detect")
    page.click("#run")  # no object typed
    assert "Type an object" in page.text_content("#error")
    page.click("#settings summary")
    page.fill("#max_objects", "0")  # the server refuses it: its JSON error is shown
    page.fill("#prompt", "circle")
    page.click("#run")
    page.wait_for_function("document.querySelector('#error').textContent.includes('max_objects')")
    page.close()


@pytest.fixture
def proxied(vl):
    """The app with an API key behind a reverse proxy that serves it under /mb (stripping the prefix)."""
    with serving(create_app(ServedModels({"nano": vl}, "nano"), ServerConfig(api_key="s3cret")), 26120) as backend:
        proxy = FastAPI()
        client = httpx.AsyncClient(base_url=backend, timeout=120)

        @proxy.api_route("/mb/{path:path}", methods=["GET", "POST"])
        async def forward(path: str, request: Request):
            headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
            upstream = client.build_request(request.method, "/" + path, headers=headers, content=await request.body())
            r = await client.send(upstream, stream=True)
            media = r.headers.get("content-type")
            return StreamingResponse(r.aiter_raw(), status_code=r.status_code, media_type=media)

        with serving(proxy, 26220) as url:
            yield url + "/mb/"


def test_behind_a_path_prefix_with_an_api_key(browser, proxied, scene):
    page = browser.new_page()
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.goto(proxied)
    page.wait_for_selector("#error:not([hidden])")
    assert "API key" in page.text_content("#error")  # the page asks for the key
    page.fill("#api-key", "s3cret")
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    page.set_input_files("#image-input", str(scene))
    page.wait_for_selector("#stage:not([hidden])")
    _run(page, "detect", "circle")
    assert page.locator('#overlay [data-kind="box"]').count() >= 1
    assert all("/mb/" in u for u in urls if u.startswith("http")) and not any("s3cret" in u for u in urls)
    assert httpx.get(proxied + "v1/models").status_code == 401  # the key is still required through the prefix
    page.close()


def test_the_page_is_small_and_self_contained(server):
    sizes = {p: len(httpx.get(f"{server}/{p}").content) for p in ("", "page/page.js", "page/page.css")}
    assert all(size > 0 for size in sizes.values()) and sum(sizes.values()) < 40_000
    html = httpx.get(server + "/").text
    assert "http://" not in html and "https://" not in html  # no CDN: everything ships in the package
    assert httpx.get(server + "/page/__init__.py").status_code == 404
