"""The HTML report of ``autopar inspect --html`` (autopar/html_report.py): its structure checked in
Python, then the page loaded in real headless Chromium (installed from Debian's packages by the
``chromium`` fixture when missing): no console errors, and the screenshot shows every chart.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

CHROMIUM = "/usr/bin/chromium"


def install_chromium(timeout_s: float = 600.0) -> str | None:
    """Install Chromium from Debian's packages if it is missing. Returns None when it is there,
    else the reason it could not be installed (which step failed)."""
    if os.path.exists(CHROMIUM):
        return None
    if os.geteuid() != 0:
        return f"{CHROMIUM} is missing and we are not root, so apt-get cannot install it"
    if shutil.which("apt-get") is None:
        return f"{CHROMIUM} is missing and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + timeout_s

    def apt(*args: str) -> str | None:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"apt-get {args[0]}: out of time ({timeout_s:.0f} s in all)"
        try:
            r = subprocess.run(["apt-get", "-q", "-y", *args], env=env, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            return f"apt-get {args[0]} timed out ({timeout_s:.0f} s in all)"
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            return f"apt-get {' '.join(args)} failed (exit {r.returncode}): {' | '.join(tail)}"
        return None

    policy = subprocess.run(["apt-cache", "policy", "chromium"], capture_output=True, text=True, env=env)
    if "Candidate:" not in policy.stdout or "Candidate: (none)" in policy.stdout:
        if err := apt("update"):
            return err
    install = ("install", "--no-install-recommends", "chromium")
    if apt(*install) is not None:  # stale package lists (a 404): update them and try once more
        if err := apt("update"):
            return err
        if err := apt(*install):
            return err
    return None if os.path.exists(CHROMIUM) else f"apt-get installed chromium but {CHROMIUM} is not there"


# ---- the reports -------------------------------------------------------------------------------

import base64  # noqa: E402
import fcntl  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import select  # noqa: E402
import struct  # noqa: E402
import tempfile  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
import zlib  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from html.parser import HTMLParser  # noqa: E402

import numpy as np  # noqa: E402

from autopar.html_report import (  # noqa: E402
    COMM_COLOURS,
    COMPUTE_COLOURS,
    MEMORY_COLOURS,
    MEMORY_STAGE,
    SHARD_COLOURS,
    _step_segments,
    render_html,
)
from autopar.plan import Plan, format_bytes, format_seconds  # noqa: E402
from autopar.report import _COLOURS, inspect_sections  # noqa: E402

GOLDEN = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "golden", "*.json")))
CHARTS = ("sharding-diagram", "step-timeline", "memory-chart", "time-bars", "collectives-table")


@pytest.fixture(scope="module")
def pp_plan() -> Plan:
    """A pipelined plan, planned for real: a small GPT on pp=2 x tp=2, wide enough that tp shards."""
    import torch

    import autopar
    from models import GPT

    with torch.device("meta"):
        model = GPT(layers=4, d=256, heads=4, max_len=128)
    plan = autopar.plan(model, autopar.Mesh({"pp": 2, "tp": 2}, hardware="h100-sxm"),
                        (torch.zeros(8, 128, dtype=torch.long, device="meta"),), pipeline={"schedule": "1f1b"})
    assert plan.collectives and plan.pipeline
    return plan


@pytest.fixture(scope="module", params=[os.path.basename(p)[:-5] for p in GOLDEN] + ["pipelined"])
def report(request, tmp_path_factory) -> tuple[Plan, str, str]:
    """(plan, html, path of the written file) for each golden plan and the pipelined one."""
    if request.param == "pipelined":
        plan = request.getfixturevalue("pp_plan")
    else:
        plan = Plan.load(os.path.join(os.path.dirname(__file__), "golden", f"{request.param}.json"))
    text = render_html(plan, inspect_sections(plan))
    path = tmp_path_factory.mktemp("report") / f"{request.param}.html"
    path.write_text(text, encoding="utf-8")
    return plan, text, str(path)


class _Page(HTMLParser):
    """Every start tag's attributes, the ids, and whether the tags balance."""

    VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr", "source"}
    SVG_EMPTY = {"rect", "line", "path", "circle", "polyline", "polygon"}

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def test_report_is_self_contained_and_well_formed(report):
    plan, text, _ = report
    page = _Page()
    page.feed(text)
    page.close()
    assert text.startswith("<!DOCTYPE html>")
    assert not page.errors and not page.stack, (page.errors, page.stack)
    # self-contained: no script, stylesheet, image or frame fetched from anywhere
    assert not [t for t, _ in page.tags if t in ("script", "link", "img", "iframe", "object", "embed")]
    for tag, attrs in page.tags:
        for k in ("src", "href", "xlink:href", "action", "data"):
            v = attrs.get(k)
            assert v is None or v.startswith("#"), (tag, k, v)  # only links inside the page
    assert not re.search(r"https?://", text.replace('xmlns="http://www.w3.org/2000/svg"', ""))
    assert "url(" not in text and "@import" not in text
    # ids unique, every chart there, every table of contents link lands on one
    ids = [a["id"] for _, a in page.tags if "id" in a]
    assert len(ids) == len(set(ids))
    want = CHARTS + (("pipeline-gantt",) if plan.pipeline else ())
    assert set(want) <= set(ids), set(want) - set(ids)
    toc = [a["href"][1:] for t, a in page.tags if t == "a" and a.get("href", "").startswith("#")]
    assert toc and set(toc) <= set(ids)
    for card in ("model", "mesh", "hardware", "predicted step time", "peak memory per device"):
        assert f'<div class="k">{card}</div>' in text
    # each chart is well-formed XML
    svgs = re.findall(r"<svg\b.*?</svg>", text, flags=re.S)
    assert len(svgs) >= 4 + bool(plan.pipeline)
    for svg in svgs:
        ET.fromstring(svg)


def _svg(text: str, chart_id: str) -> ET.Element:
    m = re.search(rf'<svg [^>]*id="{chart_id}".*?</svg>', text, flags=re.S)
    assert m, chart_id
    return ET.fromstring(m.group(0))


def _rects(svg: ET.Element, cls: str | None = None) -> list[ET.Element]:
    return [r for r in svg.iter("{http://www.w3.org/2000/svg}rect") if cls is None or r.get("class") == cls]


def test_charts_draw_what_the_plan_says(report):
    plan, text, _ = report
    # sharding: one glyph per parameter (identical layers grouped) and placed axis, coloured by kind
    svg = _svg(text, "sharding-diagram")
    glyphs = [r for r in _rects(svg) if (r.get("class") or "").startswith("shard-")]
    axes = [a for a in plan.mesh if any(a in pl for pl in plan.param_placements.values())]
    assert 0 < len(glyphs) <= len(plan.param_placements) * len(axes)
    assert len(glyphs) % len(axes) == 0
    kinds = {r.get("class")[6:] for r in glyphs}
    placed = {p[0] for pl in plan.param_placements.values() for p in pl.values()}
    assert kinds == {k if k in "RSP" else "-" for k in placed}
    for r in glyphs:
        assert r.get("fill") == SHARD_COLOURS[r.get("class")[6:]]
    # timeline: every collective on its axis' lane; the lanes end at the sum of what was drawn
    svg = _svg(text, "step-timeline")
    comm = _rects(svg, "tl-comm")
    assert len(comm) == len(plan.collectives)
    assert {r.get("fill") for r in comm} <= set(COMM_COLOURS.values()) | {"#757575"}
    segs, phases, total = _step_segments(plan)
    listed = sum(c["time_s"] for c in plan.collectives)
    compute = sum(n.get("compute_s", 0.0) for n in plan.nodes)
    assert total == pytest.approx(listed + compute + plan.time_breakdown.get("codec_s", 0) + plan.time_breakdown.get("runtime_s", 0))
    assert [p[0] for p in phases][:2] == ["forward", "backward"]
    for (_, s0, e0), (_, s1, _) in zip(phases, phases[1:]):
        assert s1 == pytest.approx(e0)  # one after the other: the model assumes no overlap
    lanes = {}
    for lane, s, d, _, _ in segs:  # no two segments overlap in time, on any lane
        lanes.setdefault("all", []).append((s, s + d))
    ivs = sorted(lanes["all"])
    assert all(b[0] >= a[1] - 1e-15 for a, b in zip(ivs, ivs[1:]))
    assert "not a measurement" in text and "assumes no overlap" in text
    # memory: one segment per kind of memory, plus one per pp rank
    svg = _svg(text, "memory-chart")
    segs = _rects(svg, "mem-seg")
    kinds = [k for k, v in plan.memory.items() if v > 0]
    ranks = (plan.pipeline or {}).get("rank_memory_bytes") or []
    assert len(segs) == len(kinds) + len(ranks)
    assert sum(r.get("fill") == MEMORY_STAGE for r in segs) == len(ranks)
    # the collectives table: all of them, slowest first, with bytes and time
    table = re.search(r'<table id="collectives-table">.*?</table>', text, flags=re.S).group(0)
    head = re.findall(r"<th>(.*?)</th>", table)
    rows = [re.findall(r'<td[^>]*>(.*?)</td>', r) for r in re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)[1:]]
    assert len(rows) == len(plan.collectives) and "bytes" in head and "time" in head
    slowest = sorted(plan.collectives, key=lambda c: -c["time_s"])
    assert [r[head.index("time")] for r in rows] == [format_seconds(c["time_s"]) for c in slowest]
    assert [r[head.index("bytes")] for r in rows] == [format_bytes(c["bytes"]) for c in slowest]


def test_golden_timeline_ends_at_the_predicted_step():
    """For a plan whose collectives add up to its communication, the drawn step is the predicted one."""
    plan = Plan.load(os.path.join(os.path.dirname(__file__), "golden", "mlp_dp8_h100.json"))
    _, _, total = _step_segments(plan)
    assert total == pytest.approx(plan.step_time_s, rel=1e-9)


# ---- headless Chromium -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    with open(os.path.join(tempfile.gettempdir(), "autopar-chromium-install.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test workers install it once, one at a time
        why = install_chromium()
    if why is not None:
        pytest.skip(f"no headless Chromium: {why}")
    return CHROMIUM


@dataclass
class Loaded:
    errors: list[str]  # console errors, uncaught exceptions, error log entries
    requests: list[str]  # URLs the page asked for, other than itself
    ids: list[str]  # element ids in the DOM after load
    boxes: dict[str, dict]  # chart id -> its box in page pixels and the area it fills per colour
    image: np.ndarray  # the full-page screenshot, (height, width, 3)
    png: bytes = field(repr=False, default=b"")


class _Pipe:
    """The DevTools protocol over --remote-debugging-pipe: JSON messages, each ended by a NUL byte,
    read by Chromium on fd 3 and written on fd 4."""

    def __init__(self, w: int, r: int):
        self.w, self.r, self.buf, self.n, self.events = w, r, b"", 0, []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30.0) -> dict:
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self.w, data):]
        reply = self.wait(lambda m, n=self.n: m.get("id") == n, timeout, method)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait(self, pred, timeout: float, what: str) -> dict:
        end = time.monotonic() + timeout
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                m = json.loads(raw)
                if "method" in m:
                    self.events.append(m)
                if pred(m):
                    return m
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"Chromium did not answer {what} in {timeout:.0f} s")
            if select.select([self.r], [], [], left)[0]:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise EOFError(f"Chromium exited while waiting for {what}")
                self.buf += chunk


_BOXES_JS = """(() => {
  const out = {};
  for (const id of %s) {
    const el = document.getElementById(id);
    if (!el) continue;
    const b = el.getBoundingClientRect();
    const fills = {};
    for (const r of el.querySelectorAll('rect')) {
      const c = (r.getAttribute('fill') || '').toLowerCase(), q = r.getBoundingClientRect();
      fills[c] = (fills[c] || 0) + q.width * q.height;
    }
    out[id] = {x: b.left + scrollX, y: b.top + scrollY, w: b.width, h: b.height, fills: fills};
  }
  return out;
})()"""


def load_page(path: str, timeout: float = 60.0) -> Loaded:
    """Open ``path`` in headless Chromium (one launch), wait for the load event, and return what
    went wrong on the console, the DOM's ids and chart boxes, and a full-page screenshot."""
    to_chrome, from_us = os.pipe()
    to_us, from_chrome = os.pipe()

    def fds():  # in the child: our pipe ends become fds 3 and 4 (out of the way first: they may be 3 or 4)
        r, w = fcntl.fcntl(to_chrome, fcntl.F_DUPFD_CLOEXEC, 10), fcntl.fcntl(from_chrome, fcntl.F_DUPFD_CLOEXEC, 10)
        os.dup2(r, 3)
        os.dup2(w, 4)

    with tempfile.TemporaryDirectory(prefix="autopar-chromium-") as profile:
        proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            preexec_fn=fds, close_fds=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        cdp = _Pipe(from_us, to_us)
        try:
            target = cdp.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            s = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Page", "Network"):
                cdp.send(f"{domain}.enable", session=s)
            cdp.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 900, "deviceScaleFactor": 1,
                                                            "mobile": False}, session=s)
            url = "file://" + os.path.abspath(path)
            cdp.send("Page.navigate", {"url": url}, session=s)
            cdp.wait(lambda m: m.get("method") == "Page.loadEventFired", timeout, "the load event")
            ids = cdp.send("Runtime.evaluate", {"expression": "[...document.querySelectorAll('[id]')].map(e => e.id)",
                                                "returnByValue": True}, session=s)["result"]["value"]
            boxes = cdp.send("Runtime.evaluate", {"expression": _BOXES_JS % json.dumps(ids), "returnByValue": True},
                             session=s)["result"]["value"]
            height = cdp.send("Runtime.evaluate", {"expression": "document.documentElement.scrollHeight",
                                                   "returnByValue": True}, session=s)["result"]["value"]
            cdp.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": min(int(height), 16000),
                                                            "deviceScaleFactor": 1, "mobile": False}, session=s)
            png = base64.b64decode(cdp.send("Page.captureScreenshot", {"format": "png", "optimizeForSpeed": True},
                                            session=s, timeout=timeout)["data"])
            cdp.send("Browser.close")
        finally:
            os.close(from_us)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            os.close(to_us)
    errors, requests = [], []
    for e in cdp.events:
        p = e.get("params", {})
        if e["method"] == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            errors.append(f"uncaught: {d.get('exception', {}).get('description') or d.get('text')}")
        elif e["method"] == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            errors.append(f"console.{p['type']}: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
            errors.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        elif e["method"] == "Network.requestWillBeSent" and p["request"]["url"] != url:
            requests.append(p["request"]["url"])
    return Loaded(errors, requests, ids, boxes, decode_png(png), png)


def decode_png(data: bytes) -> np.ndarray:
    """An 8-bit RGB or RGBA PNG as an (height, width, 3) array, with zlib and numpy only."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
        elif kind == b"IDAT":
            idat.append(body)
    bpp = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, 1 + w * bpp)
    filters, rows = raw[:, 0], raw[:, 1:].astype(np.int32)
    out = np.zeros((h, w * bpp), np.int32)
    prev = np.zeros(w * bpp, np.int32)
    for y in range(h):  # the filters of RFC 2083 6.3; Sub, Up and None vectorised
        f, line = filters[y], rows[y]
        if f == 0:
            cur = line
        elif f == 1:
            cur = np.cumsum(line.reshape(w, bpp), axis=0).reshape(-1) % 256
        elif f == 2:
            cur = (line + prev) % 256
        elif f in (3, 4):
            cur = line.copy()
            for i in range(w * bpp):
                a = cur[i - bpp] if i >= bpp else 0
                b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
                if f == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[i] = (cur[i] + pred) % 256
        else:
            raise ValueError(f"PNG filter {f}")
        out[y], prev = cur, cur
    return out.reshape(h, w, bpp)[:, :, :3].astype(np.uint8)


def count_colour(image: np.ndarray, colour: str, box: dict | None = None, tol: int = 3) -> int:
    """Pixels of ``colour`` (``#rrggbb``), within ``box`` (page pixels) when given."""
    rgb = np.array([int(colour[k:k + 2], 16) for k in (1, 3, 5)])
    if box is not None:
        y0, x0 = max(int(box["y"]), 0), max(int(box["x"]), 0)
        image = image[y0:int(box["y"] + box["h"]) + 1, x0:int(box["x"] + box["w"]) + 1]
    return int((np.abs(image.astype(np.int32) - rgb).max(axis=2) <= tol).sum())


def chart_colours(plan: Plan) -> dict[str, list[str]]:
    """Each chart's distinctive fills that this plan's report must show."""
    kinds = {p[0] for pl in plan.param_placements.values() for p in pl.values()}
    out = {"sharding-diagram": [SHARD_COLOURS[k] for k in "RSP" if k in kinds],
           "step-timeline": [COMPUTE_COLOURS["forward"], COMPUTE_COLOURS["backward"]]
           + sorted({COMM_COLOURS[c["op"]] for c in plan.collectives if c["op"] in COMM_COLOURS}),
           "memory-chart": [MEMORY_COLOURS[k] for k, v in plan.memory.items() if k in MEMORY_COLOURS and v > 0]}
    if plan.pipeline:
        out["pipeline-gantt"] = [_COLOURS["B"]]
        out["memory-chart"].append(MEMORY_STAGE)
    return out


def check_screenshot(page: Loaded, plan: Plan) -> list[str]:
    """What the screenshot fails to show: for each chart and colour, the pixels of that colour in
    the chart's box against the area the DOM says its rects of that colour fill."""
    missing = []
    for chart, colours in chart_colours(plan).items():
        box = page.boxes.get(chart)
        if box is None or box["w"] < 100 or box["h"] < 20:
            missing.append(f"{chart}: no box on the page ({box})")
            continue
        for c in colours:
            area = box["fills"].get(c, 0.0)
            if area <= 0:
                missing.append(f"{chart}: the DOM has no rect filled with {c}")
                continue
            n = count_colour(page.image, c, box)
            # thin rects blend into their neighbours and text sits on some, so part of the area
            # keeps the exact colour; but at least the legend swatch and a good share of the rest
            if not (min(100, 0.25 * area) <= n <= 1.05 * area + 50):
                missing.append(f"{chart}: {n} pixels of {c} where its rects fill {area:.0f}")
    return missing


BROKEN = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>broken</title></head><body>
<p>a page with no charts, which logs an error, throws, and fails to load an image</p>
<img alt="" src="no-such-image.png">
<script>console.error("autopar-test console error"); throw new Error("autopar-test uncaught");</script>
</body></html>"""


def test_chromium_detects_errors_and_sees_no_charts_on_a_broken_page(chromium, tmp_path):
    """The checks below can fail: this page has console errors, and none of the charts' colours."""
    path = tmp_path / "broken.html"
    path.write_text(BROKEN)
    page = load_page(str(path))
    text = "\n".join(page.errors)
    assert "autopar-test console error" in text and "autopar-test uncaught" in text, page.errors
    assert "no-such-image.png" in text or "no-such-image.png" in " ".join(page.requests), page
    plan = Plan.load(GOLDEN[0])
    assert check_screenshot(page, plan)  # every chart missing
    for colours in chart_colours(plan).values():
        for c in colours:
            assert count_colour(page.image, c) == 0, c


def test_report_in_chromium(chromium, report):
    plan, _, path = report
    page = load_page(path)
    assert page.errors == []
    assert page.requests == []  # nothing fetched: self-contained
    want = CHARTS + (("pipeline-gantt",) if plan.pipeline else ())
    assert set(want) <= set(page.ids)
    assert page.image.shape[1] == 1280 and page.image.shape[0] > 1000
    assert check_screenshot(page, plan) == []
