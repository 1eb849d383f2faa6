"""Drive the web app (`python -m unclip.app`) in headless Debian Chromium with selenium: used by test_app.py, and
run as a script to make the docs' screenshots on the bundled pipeline:

    python tests/app_browser.py --pipeline models/shapes --out docs/images

Nothing is downloaded: the browser is /usr/bin/chromium, the driver /usr/bin/chromedriver (Debian's `chromium`
and `chromium-driver` packages).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1400",
]


def missing_browser() -> str | None:
    """Why the browser test cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} is not installed (Debian: apt-get install chromium chromium-driver)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppProcess:
    """`python -m unclip.app` on a free local port, in a subprocess; a context manager."""

    def __init__(self, pipeline: str | Path, out: str | Path, log: str | Path, timeout: float = 180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [
            sys.executable,
            "-m",
            "unclip.app",
            "--pipeline",
            str(pipeline),
            "--port",
            str(self.port),
            "--out",
            str(out),
        ]
        self.log = Path(log)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the app did not answer within {timeout} s:\n{self.log.read_text()}")
            time.sleep(0.5)

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Page:
    """The app's page in headless Chromium, with the steps the test and the screenshot script take."""

    def __init__(self, url: str, profile: str | Path):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in [*FLAGS, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # the page's network requests
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.get(url)
        self.wait_for(lambda: self.find("#gen-prompt textarea"), 60, "the page to load")

    def close(self):
        self.driver.quit()

    # -- elements --------------------------------------------------------------------------------------------

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        found = self.driver.find_elements(By.CSS_SELECTOR, css)
        return found[0] if found else None

    def find_all(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def wait_for(self, condition, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; page text:\n{self.text()[-2000:]}")

    def text(self) -> str:
        body = self.find("body")
        return body.text if body is not None else ""

    def type(self, css: str, text: str, enter: bool = False):
        from selenium.webdriver.common.keys import Keys

        box = self.find(css)
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(text + (Keys.ENTER if enter else ""))
        box.send_keys(Keys.TAB)
        time.sleep(0.2)

    def choose(self, css: str, value: str):
        """Pick `value` in the dropdown `css` (its option; typed, then Enter, when it is not one)."""
        self.find(f"{css} input").click()
        option = self.wait_for(lambda: self.find(f"{css} li[aria-label='{value}']") or "none", 5, "the options")
        if option == "none":
            return self.type(f"{css} input", value, enter=True)
        option.click()
        time.sleep(0.2)

    def click(self, css: str):
        self.find(css).click()

    def tab(self, name: str):
        from selenium.webdriver.common.by import By

        button = next(b for b in self.driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == name)
        button.click()
        time.sleep(0.3)

    def images(self, css: str) -> list[str]:
        return [img.get_attribute("src") for img in self.find_all(f"{css} img") if img.get_attribute("src")]

    def wait_images(self, css: str, count: int, timeout: float, before: list[str] = ()) -> list[str]:
        return self.wait_for(
            lambda: (srcs := self.images(css)) and len(srcs) >= count and srcs != list(before) and srcs,
            timeout,
            f"{count} image(s) in {css}",
        )

    def wait_error(self, words: str, timeout: float = 30) -> str:
        """The text of the error message that contains `words`."""
        return self.wait_for(lambda: words in self.text() and self.text(), timeout, f"an error saying {words!r}")

    def close_toasts(self):
        for button in self.find_all(".toast-close"):
            try:
                button.click()
            except Exception:
                pass
        time.sleep(0.3)

    def upload(self, css: str, path: str | Path):
        self.find(f"{css} input[type=file]").send_keys(str(path))

    def paint(self, css: str, dx: int = 0, height: int = 200):
        """A vertical brush stroke `height` screen pixels long, `dx` pixels right of the editor canvas's centre
        (where the image is)."""
        from selenium.webdriver.common.action_chains import ActionChains

        canvas = self.wait_for(lambda: self.find(f"{css} .pixi-target canvas"), 20, "the editor's canvas")
        time.sleep(0.5)
        chain = ActionChains(self.driver).move_to_element_with_offset(canvas, dx, -height // 2).click_and_hold()
        for _ in range(4):
            chain = chain.move_by_offset(0, height // 4)
        chain.release().perform()
        time.sleep(0.5)

    def requests_elsewhere(self) -> list[str]:
        """The URLs the page has asked for (since the last call) from hosts other than this machine."""
        urls = []
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                url = message["params"]["request"]["url"]
                local = urllib.parse.urlparse(url).hostname in ("127.0.0.1", "localhost")
                if url.startswith(("http:", "https:", "ws:", "wss:")) and not local:
                    urls.append(url)
        return urls

    def screenshot(self, path: str | Path):
        self.driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.3)
        self.driver.save_screenshot(str(path))


def fetch(url: str, path: Path) -> Path:
    with urllib.request.urlopen(url, timeout=30) as r:
        path.write_bytes(r.read())
    return path


def generate(page: Page, prompt: str, size: str, steps: str, timeout: float, n: str = "1") -> list[str]:
    """Type a prompt, set the size, one candidate and the decoder's steps, generate; the gallery's image URLs."""
    before = page.images("#gen-gallery")
    page.type("#gen-prompt textarea", prompt)
    page.choose("#gen-size", size)
    page.type("#gen-n input[type=number]", n)
    if page.find("#gen-candidates input") is None or not page.find("#gen-candidates input").is_displayed():
        page.click("#gen-advanced button")  # open the advanced fold
        page.wait_for(lambda: page.find("#gen-candidates input"), 10, "the advanced fold to open")
    page.type("#gen-candidates input", "1")
    page.type("#gen-decoder-steps input", steps)
    page.click("#gen-advanced button")  # close the fold again
    page.click("#gen-run")
    return page.wait_images("#gen-gallery", int(n), timeout, before)


def variations(page: Page, size: str, timeout: float, shots: Path | None = None, pick: int | None = None):
    """Send the Generate gallery's image (the first, or the `pick`th clicked) to Variations and make them."""
    page.tab("Generate")
    if pick is not None:
        page.find_all("#gen-gallery button.thumbnail-item")[pick].click()
        time.sleep(0.5)
    page.click("#to-variations")
    page.wait_images("#var-image", 1, 20)
    page.choose("#var-size", size)
    page.click("#var-run")
    srcs = page.wait_images("#var-gallery", 1, timeout)
    if shots:
        page.screenshot(shots / "app-variations.png")
    return srcs


def interpolate(page: Page, second_image: Path, size: str, timeout: float, shots: Path | None = None) -> list[str]:
    """Send the Generate gallery's image to Interpolate, upload a second image, walk between them."""
    page.tab("Generate")
    page.click("#to-interpolate")
    page.wait_images("#int-image", 1, 20)
    page.upload("#int-image2", second_image)
    page.wait_images("#int-image2", 1, 20)
    page.choose("#int-size", size)
    page.click("#int-run")
    srcs = page.wait_images("#int-strip", 1, timeout)
    if shots:
        page.screenshot(shots / "app-interpolate.png")
    return srcs


def inpaint(page: Page, prompt: str, size: str, timeout: float, shots: Path | None = None, dx: int = -140):
    """Send the Generate gallery's image to Inpaint, paint a mask with the brush, repaint it."""
    page.tab("Generate")
    page.click("#to-inpaint")
    page.paint("#inp-editor", dx=dx)
    page.type("#inp-prompt textarea", prompt)
    page.choose("#inp-size", size)
    page.click("#inp-run")
    srcs = page.wait_images("#inp-gallery", 1, timeout)
    if shots:
        page.screenshot(shots / "app-inpaint.png")
    return srcs


def main(argv=None):
    p = argparse.ArgumentParser(description="Screenshots of the app's tabs, on a pipeline, for the docs.")
    p.add_argument("--pipeline", default=str(ROOT / "models" / "shapes"))
    p.add_argument("--out", default=str(ROOT / "docs" / "images"))
    p.add_argument("--size", default="256")
    p.add_argument("--steps", default="15")
    args = p.parse_args(argv)
    shots, timeout = Path(args.out), 900
    shots.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with AppProcess(args.pipeline, tmp / "outputs", tmp / "app.log", timeout=600) as app:
            page = Page(app.url, tmp / "profile")
            try:
                second = generate(page, "a blue square", args.size, args.steps, timeout)
                fetch(second[0], tmp / "second.png")
                generate(page, "a red circle above a blue square", args.size, args.steps, timeout)
                page.screenshot(shots / "app-generate.png")
                variations(page, args.size, timeout, shots)
                interpolate(page, tmp / "second.png", args.size, timeout, shots)
                inpaint(page, "a green triangle", args.size, timeout, shots, dx=-60)
            finally:
                page.close()
    print("screenshots in", shots)


if __name__ == "__main__":
    if missing_browser():
        sys.exit(missing_browser())
    main()
