"""What a user does in a real headless Chromium (Debian's, driven by playwright; no browser is
downloaded): open a chat in Open WebUI and watch the answer stream in. Shared by the local-stack
browser tests (test_browser.py) and the Docker Compose stack test (test_compose_stack.py)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from playwright.sync_api import BrowserContext, Page
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

CHROMIUM = "/usr/bin/chromium"
# No network beyond 127.0.0.1, no first-run UI, nothing that phones home.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
ANSWER_TIMEOUT_MS = 120_000
PAGE_TIMEOUT_MS = 60_000


@contextlib.contextmanager
def chromium_context() -> Iterator[BrowserContext]:
    """A headless Chromium with a throwaway profile, closed and deleted afterwards."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="pagoda-chromium-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 900},
            )
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def record_text_lengths(page: Page, selector: str) -> None:
    """Keeps, in the page, the length of the last `selector` element's text after every DOM
    change: a streamed answer grows through several lengths, a buffered one jumps to its end."""
    page.evaluate("""selector => {
        window.seenLengths = [];
        new MutationObserver(() => {
            const nodes = document.querySelectorAll(selector);
            if (nodes.length) window.seenLengths.push(nodes[nodes.length - 1].innerText.length);
        }).observe(document.body, {childList: true, subtree: true, characterData: true});
    }""", selector)


@dataclass
class OpenWebUIAnswer:
    text: str
    lengths: list[int]  # the answer's length after each change the page saw (0s left out)


def chat_in_open_webui(page: Page, url: str, model_name: str, prompt: str) -> OpenWebUIAnswer:
    """Opens Open WebUI (signed in or without auth), picks `model_name`, sends `prompt` and
    waits until the streamed answer has ended."""
    page.goto(url, timeout=PAGE_TIMEOUT_MS)
    page.locator("#chat-input").wait_for(timeout=PAGE_TIMEOUT_MS)
    # A fresh Open WebUI greets its first user with release notes, shortly after the page shows.
    with contextlib.suppress(PlaywrightTimeoutError):
        page.get_by_role("button", name="Okay, Let's Go!").click(timeout=10_000)
    page.locator("#model-selector-model-button").click()
    page.get_by_role("option", name=model_name).click()
    assert page.get_by_label(f"Selected model: {model_name}").count() == 1

    record_text_lengths(page, "#response-content-container")
    page.locator("#chat-input").click()
    page.keyboard.type(prompt)
    page.keyboard.press("Enter")
    # Open WebUI offers to regenerate an answer once its stream has ended.
    page.get_by_role("button", name="Regenerate").wait_for(timeout=ANSWER_TIMEOUT_MS)
    text = page.locator("#response-content-container").last.inner_text()
    lengths = [length for length in page.evaluate("window.seenLengths") if length]
    return OpenWebUIAnswer(text, lengths)


def assert_streamed(answer: OpenWebUIAnswer) -> None:
    assert answer.text.strip()
    assert len(set(answer.lengths)) >= 3, (
        f"the answer did not stream: {answer.lengths}: {answer.text!r}")
    assert answer.lengths == sorted(answer.lengths)
