"""The README's screenshot of the page: serve a model, upload a photo-like test image, capture.

    python benchmarks/screenshot.py runs/notebook-... docs/images/page.png [--index 0]

Needs Chromium (Debian's ``chromium``) and Playwright, as the browser test does.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--index", type=int, default=0, help="which test image to photograph")
    parser.add_argument("--data", help="data folder (default: the usual search)")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from fmnist.data.dataset import load_dataset
    from fmnist.data.photolike import photo_like

    spec = importlib.util.spec_from_file_location("load_benchmark", ROOT / "benchmarks" / "load.py")
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    image = load_dataset(args.data).test_images[args.index].numpy()
    with tempfile.TemporaryDirectory() as folder, load.served(args.model) as url:
        photo = Path(folder) / "photo.jpg"
        photo.write_bytes(photo_like(image, np.random.default_rng(args.index)))
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                                 args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 980, "height": 760})
            page.goto(url + "/")
            page.set_input_files("#file", str(photo))
            page.wait_for_function("document.getElementById('label').textContent.length > 0")
            page.wait_for_timeout(300)  # the images finish drawing
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    print(args.out)


if __name__ == "__main__":
    main()
