"""The playground's screenshot for docs/ and the README: `unclip serve --model demo` on 127.0.0.1,
headless Chromium (Debian's chromium and chromium-driver) typing three prompts into the page.

    PYTHONPATH=$PWD python3 benchmarks/playground_screenshot.py      # writes docs/playground.png
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_soak import REPO, free_port, start_server  # noqa: E402

PROMPTS = [("a yellow triangle on a black background", 3), ("a green square on a white background", 2),
           ("a red circle on a blue background", 1)]


def main() -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1150",
                "--hide-scrollbars"):
        options.add_argument(arg)
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "server.log", "w+") as log:
        server = start_server("demo", port, env, log)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            driver.get(f"http://127.0.0.1:{port}/")
            wait = WebDriverWait(driver, 300, poll_frequency=0.1)
            wait.until(lambda d: "demo" in d.find_element(By.ID, "model").text)
            for k, (prompt, seed) in enumerate(PROMPTS):
                for field, value in (("prompt", prompt), ("seed", str(seed)), ("n", "2")):
                    element = driver.find_element(By.ID, field)
                    element.clear()
                    element.send_keys(value)
                driver.find_element(By.ID, "generate").click()
                wait.until(lambda d, k=k: len(d.find_elements(By.CSS_SELECTOR, "#gallery img.result"))
                           == 2 * (k + 1))
            time.sleep(3.5)  # the status line's next poll shows the recent latency
            out = REPO / "docs" / "playground.png"
            driver.save_screenshot(str(out))
            print(f"wrote {out}")
        finally:
            driver.quit()
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    main()
