"""Not a benchmark: takes the README's screenshot of the interactive page (docs/serve.jpg).

Starts ``lrp-heatmap serve``'s app on a free loopback port with the embedded model, opens it in headless
Chromium (Debian's chromium and chromedriver), loads ``input/cat.png``, places two patches with the mouse
and saves the page. Run from the repository root: ``python benchmarks/serve_screenshot.py``.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from lrp_cli.config import load_config
from lrp_cli.serve import listen
from lrp_cli.serve.app import create_app
from lrp_cli.serve.engine import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="input/cat.png")
    parser.add_argument("--out", default="docs/serve.jpg")
    args = parser.parse_args()
    engine = Engine(load_config(None, {"device": "cpu"}))
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,930"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='lrp-shot-')}")
    driver = webdriver.Chrome(service=webdriver.ChromeService("/usr/bin/chromedriver"), options=options)
    try:
        wait = WebDriverWait(driver, 120, poll_frequency=0.1)
        driver.get(f"http://127.0.0.1:{sock.getsockname()[1]}/")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        driver.find_element(By.ID, "file").send_keys(str(Path(args.image).resolve()))
        status = driver.find_element(By.ID, "status")
        wait.until(lambda d: status.get_attribute("data-state") == "done")
        canvas = driver.find_element(By.ID, "editor")
        drag = ActionChains(driver).move_to_element_with_offset(canvas, 30, -70).click_and_hold()
        drag.move_by_offset(70, 60).release().perform()
        wait.until(lambda d: status.text == "done (1 patches)")
        Select(driver.find_element(By.ID, "kind")).select_by_value("noise")
        drag = ActionChains(driver).move_to_element_with_offset(canvas, -170, 40).click_and_hold()
        drag.move_by_offset(60, 50).release().perform()
        wait.until(lambda d: status.text == "done (2 patches)")
        shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
        shot.save(args.out, quality=85, optimize=True)
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


if __name__ == "__main__":
    main()
