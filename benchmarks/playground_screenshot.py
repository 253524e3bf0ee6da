"""Chat through serve.py's playground in headless Chromium and save a screenshot (docs/serving_playground.png).

    python serve.py --model runs/tiny &
    python benchmarks/playground_screenshot.py --url http://127.0.0.1:8000 --out docs/serving_playground.png

Needs Debian's chromium (apt-get install chromium) and the playwright package (the test extra). The
page is driven as a user would: settings typed in, messages sent with the button, replies streamed.
tests/test_serve.py drives it with the same functions.
"""
from __future__ import annotations

import argparse
import os

CHROMIUM = os.environ.get("SPIKELM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def open_playground(browser, url: str, max_tokens: int = 24, temperature: float = 0.0, session: bool = False):
    page = browser.new_page(viewport={"width": 1100, "height": 720})
    page.goto(url)
    page.wait_for_function("document.getElementById('model').textContent !== 'connecting…'")
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#temperature", str(temperature))
    if session:
        page.check("#session")
    return page


def send(page, text: str, timeout_ms: int = 60000) -> dict:
    """Type a message, send it, wait for the streamed reply; returns the reply and the stats line."""
    replies = page.locator(".msg.assistant").count()
    page.fill("#input", text)
    page.click("#send")
    page.wait_for_function(f"document.querySelectorAll('.msg.assistant').length > {replies} && "
                           "!document.getElementById('send').disabled", timeout=timeout_ms)
    reply = page.evaluate("() => { const m = document.querySelectorAll('.msg.assistant'); "
                          "return m[m.length - 1].querySelector('.text').textContent; }")
    stats = {k: page.text_content(f"#{k}") for k in ("ttft", "tps", "prompt_tokens", "cached", "state")}
    return {"reply": reply, **stats}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--out", default="docs/serving_playground.png")
    p.add_argument("--max_tokens", type=int, default=40)
    p.add_argument("--messages", nargs="+", default=["Of Man's first disobedience, sing", "And then?",
                                                     "Say more of Eden"])
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch(pw)
        page = open_playground(browser, args.url, args.max_tokens, temperature=0.8)
        for text in args.messages:
            print(send(page, text))
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
