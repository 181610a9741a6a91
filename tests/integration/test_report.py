"""``matrix-hpc report`` on a finished run, opened in a real headless
Chromium driven over the Chrome DevTools protocol: the page loads with no
console error and no network request, every figure decodes and draws
something (pixels of its screenshot), and its numbers equal ``inspect``'s.

The run: Coral dialogues on the simulated LLM (a few 400s injected, so the
error table has rows), through the CLI on its own local Ray.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration.runs import log_of, run_cli
from tests.unit.test_report import inspect_numbers

pytestmark = [pytest.mark.integration, pytest.mark.needs("ray", "chromium"), pytest.mark.timeout(300)]

SIM = ["llm=sim", "llm.sim.num_replicas=1", "llm.sim.ttft_s=0.01", "llm.sim.time_per_output_token_s=0", "llm.sim.output_tokens=16",
       "llm.sim.bad_request_rate=0.02", "workflow.max_turns=4"]
FIGURES = 9  # 6 common figures + Coral's agreement, turns and stop reasons


def browser() -> str:
    found = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    assert found, "no chromium (sudo bash .ci/setup_chromium.sh)"
    return found


class DevTools:
    """A minimal Chrome DevTools protocol client over one page's websocket (aiohttp)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._next = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        await self.ws.send_json({"id": self._next, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), timeout=30)
            if msg.get("id") == self._next:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return dict(msg.get("result", {}))
            self.events.append(msg)

    async def wait_for(self, event: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(e.get("method") == event for e in self.events):
            msg = await asyncio.wait_for(self.ws.receive_json(), timeout=max(0.1, deadline - time.monotonic()))
            self.events.append(msg)

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries (e.g. a resource that failed to load)."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e.get("method") == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails'].get('text')}")
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A headless Chromium with the DevTools protocol on a loopback port; yields its page websocket URL."""
    profile = tmp_path_factory.mktemp("chromium-profile")
    args = [browser(), "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
            "--window-size=1200,900", "about:blank"]
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # Chromium's own sandbox refuses to run as root
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert proc.poll() is None and time.time() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        yield asyncio.run(_page_websocket(port))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def _page_websocket(port: int) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        for _ in range(100):
            async with s.get(f"http://127.0.0.1:{port}/json/list") as r:
                pages = [t for t in await r.json() if t.get("type") == "page"]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
            await asyncio.sleep(0.1)
    raise AssertionError("chromium has no page target")


PAGE_STATE = """JSON.stringify({
  figures: [...document.querySelectorAll('figure')].map(f => {
    const img = f.querySelector('img'); const r = img.getBoundingClientRect();
    return {id: f.id, complete: img.complete, w: img.naturalWidth, h: img.naturalHeight,
            x: r.left + window.scrollX, y: r.top + window.scrollY, cw: r.width, ch: r.height};
  }),
  numbers: Object.fromEntries([...document.querySelectorAll('[data-key]')].map(e => [e.dataset.key, e.textContent])),
})"""


async def open_page(ws_url: str, url: str, shots: bool = True) -> dict[str, Any]:
    """Load ``url``; return problems, requests, figure states, numbers and a screenshot of each figure."""
    import aiohttp

    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url, max_msg_size=0) as ws:
        dt = DevTools(ws)
        for domain in ("Page", "Runtime", "Log", "Network"):
            await dt.call(f"{domain}.enable")
        await dt.call("Page.navigate", url=url)
        await dt.wait_for("Page.loadEventFired")
        await asyncio.sleep(0.3)  # late console messages
        state = json.loads((await dt.call("Runtime.evaluate", expression=PAGE_STATE, returnByValue=True))
                           ["result"]["value"])
        if shots:
            for fig in state["figures"]:
                clip = {"x": fig["x"], "y": fig["y"], "width": fig["cw"], "height": fig["ch"], "scale": 1}
                shot = await dt.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
                fig["pixels"] = _pixels(base64.b64decode(shot["data"]))
        await dt.call("Page.navigate", url="about:blank")
        return {"problems": dt.problems(), "requests": dt.requests(), **state}


def _pixels(png: bytes) -> dict[str, float]:
    """How much a screenshot draws: the share of non-white pixels and the spread of values."""
    from matplotlib.image import imread

    rgb = imread(io.BytesIO(png))[..., :3]
    return {"ink": float((rgb.min(axis=2) < 0.9).mean()), "std": float(rgb.std()), "height": rgb.shape[0]}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "coral"
    result = run_cli("workflow=coral", "dataset=mmlu_pro_sample", f"output.dir={out}", *SIM, timeout_s=240)
    assert result.returncode == 0, log_of(result)[-3000:]
    return out


def test_report_of_a_finished_run_renders_in_chromium(finished_run: Path, chromium: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from matrix_hpc.cli.main import main

    assert main(["inspect", str(finished_run)]) == 0
    inspected = capsys.readouterr().out
    html = tmp_path / "report.html"
    assert main(["report", str(finished_run), "--out", str(html)]) == 0
    page = asyncio.run(open_page(chromium, html.as_uri()))

    assert page["problems"] == []
    assert all(u.startswith(("file:", "data:")) for u in page["requests"]), page["requests"]  # works offline
    figures = page["figures"]
    assert len(figures) == FIGURES, [f["id"] for f in figures]
    for fig in figures:
        assert fig["complete"] and fig["w"] > 300 and fig["h"] > 150, fig  # the PNG decoded
        # drawn: axes, text and data put ink on well over 2% of the area (a blank image has none)
        assert fig["pixels"]["ink"] > 0.02 and fig["pixels"]["std"] > 0.05, fig
    expected = inspect_numbers(inspected)
    got = {k: page["numbers"].get(k, "").replace(",", "") for k in expected}
    assert got == expected, inspected
    assert {"rows", "distinct_ids", "status.ok", "tokens.total", "workflow.agreement_rate"} <= set(got)
    assert int(got["rows"]) == 40


def test_the_browser_check_catches_a_broken_page(chromium: str, tmp_path: Path) -> None:
    """The checks above can fail: a console error, a missing image and a blank image are all seen."""
    from matplotlib.figure import Figure

    blank = io.BytesIO()
    Figure(figsize=(4, 3)).savefig(blank, format="png")
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom')</script>"
                   "<figure id=missing><img src='nowhere.png'></figure>"
                   f"<figure id=blank><img src='data:image/png;base64,{base64.b64encode(blank.getvalue()).decode()}'>"
                   "</figure></body></html>")
    page = asyncio.run(open_page(chromium, bad.as_uri()))
    assert any("boom" in p for p in page["problems"]) and any("nowhere.png" in p for p in page["problems"])
    by_id = {f["id"]: f for f in page["figures"]}
    assert by_id["missing"]["w"] == 0
    assert by_id["blank"]["w"] > 0 and by_id["blank"]["pixels"]["ink"] < 0.02 and np.isfinite(
        by_id["blank"]["pixels"]["std"])
