"""How long the playground takes to load from a local `moonbase serve`, and the bytes it transfers (prints JSON).

python bench/playground.py [--model nano] [--runs 10]

Chromium (Debian's, through Playwright) opens the page `--runs` times in fresh contexts (no cache); the load
time is the Navigation Timing `loadEventEnd` and the page counts as ready once the model list has arrived."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics

from playwright.sync_api import sync_playwright

import moonbase
from moonbase.bench import machine
from moonbase.server.app import create_app
from moonbase.server.models import ServedModels
from moonbase.server.run import serving


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="nano")
    p.add_argument("--runs", type=int, default=10)
    a = p.parse_args()
    vl = moonbase.vl(a.model)
    loads, ready, transferred = [], [], []
    with serving(create_app(ServedModels({vl.model.name: vl}, vl.model.name)), 27020) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        for _ in range(a.runs):
            context = browser.new_context()
            page = context.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.querySelector('#model').options.length > 0")
            timing = page.evaluate(
                """() => { const n = performance.getEntriesByType('navigation')[0];
                const r = performance.getEntriesByType('resource');
                return {load: n.loadEventEnd, ready: performance.now(),
                        bytes: n.transferSize + r.reduce((s, e) => s + e.transferSize, 0)}; }"""
            )
            loads.append(timing["load"])
            ready.append(timing["ready"])
            transferred.append(timing["bytes"])
            context.close()
        browser.close()
    result = {
        "machine": machine(vl.model.device),
        "runs": a.runs,
        "load_ms_median": round(statistics.median(loads), 1),
        "load_ms_max": round(max(loads), 1),
        "ready_ms_median": round(statistics.median(ready), 1),
        "bytes_transferred": max(transferred),
        "note": "bytes: the page, its script and stylesheet and the /v1/models answer, with headers, from a fresh context",
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
