"""The web chat page in headless Chromium (system chromium driven by playwright): attach an image
(file picker, then clipboard paste), ask, watch the answer stream in, screenshot to the test
artifacts. Skips with a reason when playwright or chromium is missing."""
import base64
import json
import os
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = os.environ.get("LLAVA_JAX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("no chromium executable (apt-get install chromium, or set LLAVA_JAX_CHROMIUM)", allow_module_level=True)

from serve_util import make_chat_checkpoint, png_bytes, rand_image  # noqa: E402

from llava_jax.serve.engine import DecodeBatch  # noqa: E402
from llava_jax.serve.generator import ChatGenerator  # noqa: E402
from llava_jax.serve.server import Limits, make_server, serve_in_thread  # noqa: E402

ARTIFACTS = Path(os.environ.get("LLAVA_JAX_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    d, _, _ = make_chat_checkpoint(tmp_path_factory.mktemp("web"), chat_template=True)
    gen = ChatGenerator.from_pretrained(d, chunk_size=2, name="tiny-llava")
    srv = make_server(gen, "127.0.0.1", 0, limits=Limits(max_tokens=64))
    serve_in_thread(srv)
    host, port = srv.server_address[:2]
    # The tiny model would finish before the page paints once: pace the engine like a big model.
    step = DecodeBatch.step
    DecodeBatch.step = lambda self: (time.sleep(0.03), step(self))[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        DecodeBatch.step = step
        srv.shutdown()
        srv.server_close()


def _api_answer(url, image_png, question, max_tokens):
    import urllib.request

    body = {"model": "tiny-llava", "max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image_png).decode()}},
        {"type": "text", "text": question}]}]}
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=120).read())["choices"][0]["message"]["content"]


# Records every text the page shows in the newest assistant bubble.
OBSERVE = """() => {
  window.__shown = [];
  new MutationObserver(() => {
    const m = [...document.querySelectorAll('.msg.assistant .text')].pop();
    if (m && m.textContent && window.__shown[window.__shown.length - 1] !== m.textContent) window.__shown.push(m.textContent);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""

PASTE = """(b64) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], 'pasted.png', {type: 'image/png'}));
  document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true}));
}"""


def test_web_chat_in_headless_chromium(url, tmp_path):
    img = png_bytes(rand_image(3, 64, 48))
    (tmp_path / "photo.png").write_bytes(img)
    question = "What is in the image?"
    expected = _api_answer(url, img, question, 40)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 720})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            sync_api.expect(page.locator("#model")).to_have_text("tiny-llava")
            page.set_input_files("#file", str(tmp_path / "photo.png"))
            sync_api.expect(page.locator("#preview")).to_be_visible()
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "40")
            page.fill("#prompt", question)
            page.evaluate(OBSERVE)
            page.click("#send")
            reply = page.locator(".msg.assistant").first
            sync_api.expect(reply).to_have_attribute("data-done", "1", timeout=120_000)
            shown = page.evaluate("window.__shown")
            text = reply.locator(".text").inner_text()
            chunks = int(reply.get_attribute("data-chunks"))
            assert text == expected.strip() or reply.locator(".text").text_content() == expected
            assert chunks > 1 and len(shown) > 1  # the answer appeared piece by piece
            assert all(expected.startswith(s) for s in shown)
            assert page.locator(".msg.user img").count() == 1
            page.screenshot(path=str(ARTIFACTS / "web_chat.png"), full_page=True)

            # second turn: an image pasted from the clipboard, and the conversation goes on
            page.evaluate(PASTE, base64.b64encode(png_bytes(rand_image(4))).decode())
            sync_api.expect(page.locator("#preview")).to_be_visible()
            page.fill("#prompt", "And this one?")
            page.press("#prompt", "Enter")
            second = page.locator(".msg.assistant").nth(1)
            sync_api.expect(second).to_have_attribute("data-done", "1", timeout=120_000)
            assert page.locator(".msg.user img").count() == 2
            assert page.locator(".msg.error").count() == 0, page.locator(".msg.error").all_inner_texts()
            page.screenshot(path=str(ARTIFACTS / "web_chat_two_turns.png"), full_page=True)
            assert not errors, errors
            print(f"\nweb page: first answer streamed in {chunks} chunks, {len(shown)} distinct renders; "
                  f"screenshots in {ARTIFACTS}")
        finally:
            browser.close()
