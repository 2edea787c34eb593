"""The local stack (integration/local_stack.py) driven in a real headless Chromium: Open WebUI
0.12.4 in front of `pagoda serve` streams an answer, and FastChat's Gradio arena gets an answer
from both Pagoda-served models side by side.

Needs Debian's chromium (/usr/bin/chromium) and the playwright package (its driver only; no
browser is downloaded). Open WebUI and the gradio==5.50.0 arena each get their own environment,
built once under $PAGODA_CACHE_DIR/test-venvs (network needed the first time; Open WebUI's is
about 3 GB). Screenshots go to $PAGODA_SCREENSHOT_DIR when set (the README's come from
integration/screenshots), else to the test's temporary folder.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("playwright")

from browser_steps import (
    ANSWER_TIMEOUT_MS,
    CHROMIUM,
    assert_streamed,
    chat_in_open_webui,
    chromium_context,
)
from fastchat_processes import cached_venv, free_port
from playwright.sync_api import BrowserContext
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from test_fastchat_arena import GRADIO_REQUIREMENTS

pytestmark = [pytest.mark.slow, pytest.mark.browser]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
from local_stack import SERVE_MODEL_NAME, WORKER_MODEL_NAME, Ports, Stack  # noqa: E402

OPEN_WEBUI_REQUIREMENTS = ["open-webui==0.12.4"]
# Short answers: Open WebUI's chat runs until the context is full, and screenshots stay readable.
ENGINE_ARGS = "--num-kv-blocks 256 --max-model-len 160"
PROMPT = "Hello! What is a paged KV cache?"
TAB_CLICK_ATTEMPTS = 6


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("PAGODA_SCREENSHOT_DIR")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium)")
    open_webui_python = cached_venv("open-webui", OPEN_WEBUI_REQUIREMENTS)
    gradio_python = cached_venv("fschat-gradio", GRADIO_REQUIREMENTS, system_site_packages=True)
    ports = Ports(free_port(), free_port(), free_port(), free_port(), free_port())
    with Stack(tmp_path_factory.mktemp("stack"), ports, workers=1,
               fastchat_python=gradio_python,
               open_webui=str(Path(open_webui_python).with_name("open-webui")),
               engine_args=shlex.split(ENGINE_ARGS)) as running:
        yield running


@pytest.fixture(scope="module")
def browser_context(stack: Stack) -> Iterator[BrowserContext]:
    with chromium_context() as context:
        yield context


def test_open_webui_streams_an_answer_from_pagoda(stack, browser_context, screenshot_dir):
    page = browser_context.new_page()
    answer = chat_in_open_webui(page, stack.urls["Open WebUI"], SERVE_MODEL_NAME, PROMPT)
    page.screenshot(path=str(screenshot_dir / "open-webui.png"))
    assert_streamed(answer)


def test_arena_side_by_side_both_models_answer(stack, browser_context, screenshot_dir):
    page = browser_context.new_page()
    page.goto(stack.urls["FastChat arena"], timeout=60_000)
    dropdowns = page.locator("input[aria-label='Dropdown']:visible")
    # Gradio draws its tabs before it wires them up: a click that comes too early is lost.
    for _ in range(TAB_CLICK_ATTEMPTS):
        page.get_by_role("tab", name="Arena (side-by-side)").locator("visible=true").click(
            timeout=60_000)
        with contextlib.suppress(PlaywrightTimeoutError):
            dropdowns.nth(1).wait_for(timeout=5_000)
            break
    for side, name in enumerate((SERVE_MODEL_NAME, WORKER_MODEL_NAME)):
        # Typed, not clicked: the other dropdown's option list may still be in the page.
        dropdown = dropdowns.nth(side)
        dropdown.fill(name)
        dropdown.press("Enter")
        assert dropdown.input_value() == name
    page.get_by_text("Parameters").locator("visible=true").click()
    page.get_by_label("number input for Max output tokens").locator("visible=true").fill("48")

    page.get_by_placeholder("Enter your prompt and press ENTER").locator("visible=true").fill(
        PROMPT)
    page.get_by_role("button", name="Send", exact=True).locator("visible=true").click()
    answers = page.locator("[data-testid='bot']:visible")
    answers.nth(1).wait_for(timeout=ANSWER_TIMEOUT_MS)
    # FastChat marks a streaming answer with a trailing cursor; both must finish.
    page.wait_for_function(
        """() => {
            const bots = [...document.querySelectorAll("[data-testid='bot']")]
                .filter(node => node.offsetParent !== null);
            return bots.length === 2 && bots.every(node => node.innerText.trim()
                && !node.innerText.includes("\u258c"));
        }""", timeout=ANSWER_TIMEOUT_MS)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(screenshot_dir / "fastchat-arena.png"))
    texts = [answers.nth(side).inner_text() for side in range(2)]
    assert all(text.strip() for text in texts), texts
