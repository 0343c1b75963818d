"""Measure the dashboard at scale (docs/benchmarks.md, "dashboard at scale"; issue #19).

    python -m tests.coordinator.measure_dashboard 5000 10000

For each peer count: the fake status server (tests/fake_status.py) serves that many peers; prints
/api/status's size and time (plain and gzipped), then opens the page twice in Debian's Chromium
and prints the time from navigation to the peer table drawn, the last render's time, the
elements on the page, how many redraws ~3 s of an unchanging swarm caused, and the time from a
click on a sort header to the next frame; each line with the load average. A figure for a
report, not a test: nothing here is asserted.
"""

from __future__ import annotations

import sys
import time
import urllib.request

from tests.fake_status import FakeStatusServer, make_status


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def measure(n: int) -> None:
    from playwright.sync_api import sync_playwright

    st = make_status(n_peers=n, n_stages=5, empty_stages=(3,), rebuilt={2: "checkfree"})
    with FakeStatusServer(st, interval=1.0) as fake:
        for enc in (None, "gzip"):
            t = time.perf_counter()
            req = urllib.request.Request(fake.url + "/api/status",
                                         headers={"Accept-Encoding": enc} if enc else {})
            with urllib.request.urlopen(req, timeout=60) as r:
                raw = r.read()
                ce = r.headers.get("Content-Encoding") or "plain"
            print(f"peers={n} GET /api/status (Accept-Encoding {enc}): {len(raw) / 1e6:.2f} MB "
                  f"{ce} in {(time.perf_counter() - t) * 1e3:.0f} ms; load {load()}", flush=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                         args=["--no-sandbox", "--disable-gpu"])
            for k in range(2):
                page = browser.new_page(viewport={"width": 1440, "height": 900})
                t = time.perf_counter()
                page.goto(fake.url + "/")
                page.wait_for_function("window.__shoal && window.__shoal.renders > 0",
                                       timeout=120_000, polling=50)
                page.wait_for_selector("#peer-rows tr[data-peer-id]", timeout=120_000)
                took = time.perf_counter() - t
                info = page.evaluate("({r: window.__shoal.lastRenderMs,"
                                     " n: document.getElementsByTagName('*').length})")
                print(f"  load {k}: page load {took:.2f} s (navigation to the table drawn), "
                      f"render {info['r']:.0f} ms, {info['n']} elements; load {load()}",
                      flush=True)
                time.sleep(3)
                renders = page.evaluate("window.__shoal.renders")
                try:
                    t = time.perf_counter()
                    page.click('#peer-head th[data-sort="sps"]', timeout=60_000)
                    page.evaluate("new Promise(r => requestAnimationFrame(() => r(1)))")
                    click = f"{(time.perf_counter() - t) * 1e3:.0f} ms"
                except Exception as exc:  # a page too busy to click is a figure too
                    click = f"failed ({type(exc).__name__})"
                print(f"    {renders} renders after ~3 s of the same swarm; sort click to the "
                      f"next frame {click}; load {load()}", flush=True)
                page.close()
            browser.close()


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["5000"]:
        measure(int(arg))
