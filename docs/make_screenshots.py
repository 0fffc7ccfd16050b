"""Screenshots of the example workflows as a newcomer meets them: ComfyUI's web frontend in headless
Chromium, each ``example_workflows/*.json`` loaded, and the mini workflow run from the Run button.

    python docs/make_screenshots.py --url http://127.0.0.1:8199 [--out-dir docs/screenshots] [--overwrite]

Needs a running ComfyUI with this pack in ``custom_nodes/`` and the frontend packages its
``requirements.txt`` pins, and here the pack importable (``pip install -e .``), Pillow and Playwright
for Python (``pip install playwright``; no browser download: it drives ``--chromium``, Debian's
``/usr/bin/chromium`` by default). Not part of the tests or of CI. On a CPU venv without torchvision,
start ComfyUI through the stand-ins as the README says ("torchvision and torchaudio").

Writes, in ``--out-dir``:
- ``<workflow>.png`` for each example workflow: the whole graph, zoomed to fit 1600 x 900;
- ``<workflow>_errors.png`` where the frontend reports errors for a workflow (missing models, nodes
  or inputs), with the frontend's details opened: the findings a newcomer sees;
- ``templates.png``: the template browser (Templates in the left rail) on this pack's entry under
  Extensions, with the thumbnails of ``example_workflows/*.jpg``;
- ``wan22_mini_w4a4_demo_result.png`` (unless ``--no-run``): the mini workflow opened from its card
  in that browser, after pressing Run and waiting for the server to finish it, framed on its output
  nodes, the BF16 | W4A4 video paused half-way with its controls hidden. A run that fails leaves
  ``wan22_mini_w4a4_demo_run_error.png`` (what the frontend shows) instead, and the script exits 1.

The frontend draws text-free boxes below a minimum font size (its level-of-detail switch), which
would make a whole-graph view unreadable; the script sets that threshold to 1 px and hides the
minimap, both through the frontend's own settings. Pictures over ``--max-kib`` are stored as 256-colour
PNGs. Existing files are replaced only with ``--overwrite``; each is written as the pack writes files
(``kernels.format.write_bytes``: a temporary name, then renamed into place).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from pathlib import Path

from wan_w4a4.kernels import format as fmt

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "example_workflows"
MINI = "wan22_mini_w4a4_demo"
PACK = "ComfyUI-WanW4A4"  # the name the template browser lists the pack's templates under
VIEWPORT = {"width": 1600, "height": 900}
# What the result screenshot frames: from the two decodes to the saved BF16 | W4A4 video.
OUTPUT_TYPES = ("VAEDecode", "ImageStitch", "CreateVideo", "SaveVideo")
# Frontend settings (ids as in comfyui-frontend-package 1.49): draw node text at every zoom, no minimap.
SETTINGS = {"LiteGraph.Canvas.MinFontSizeForLOD": 1, "Comfy.Minimap.Visible": False}
# Visible overlays that report something: dialogs, toasts, and the "N errors found" panel.
FINDINGS_JS = """() => {
  const seen = [];
  const visible = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
  for (const el of document.querySelectorAll('[role=dialog], [role=alertdialog], .p-toast-message')) {
    if (visible(el) && el.innerText.trim()) seen.push(el.innerText.trim().replace(/\\s+/g, ' ').slice(0, 400));
  }
  for (const el of document.querySelectorAll('div, section')) {
    const t = (el.innerText || '').trim();
    if (/^\\d+ errors? found/i.test(t) && visible(el) && t.length < 200) seen.push(t.replace(/\\s+/g, ' '));
  }
  return [...new Set(seen)];
}"""

# The text of the right-hand panel that "View details" opens (its errors tab), as one line; [] if closed.
PANEL_JS = """() => {
  const hits = [...document.querySelectorAll('div, aside, section')].filter(el => {
    const t = (el.innerText || '').trim();
    return t.startsWith('Workflow Overview') && el.offsetWidth > 0 && el.offsetWidth < 600;
  });
  hits.sort((a, b) => b.innerText.length - a.innerText.length);
  return hits.length ? [hits[0].innerText.trim().replace(/\\s+/g, ' ').slice(0, 2000)] : [];
}"""


def workflow_files(folder: Path = WORKFLOWS) -> list[Path]:
    files = sorted(folder.glob("*.json"))
    if not files:
        raise SystemExit(f"make_screenshots: no workflow in {folder}")
    return files


def encode_png(data: bytes, max_kib: int) -> bytes:
    """The screenshot as PNG, as a 256-colour PNG when the full-colour one is over ``max_kib``."""
    from PIL import Image

    if len(data) <= max_kib * 1024:
        return data
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").quantize(256).save(buf, "PNG", optimize=True)
    return buf.getvalue()


class Shooter:
    """One browser page on the running frontend, and where its pictures go."""

    def __init__(self, page, out_dir: Path, overwrite: bool, max_kib: int):
        self.page, self.out_dir, self.overwrite, self.max_kib = page, out_dir, overwrite, max_kib

    def shoot(self, name: str) -> Path:
        path = self.out_dir / f"{name}.png"
        fmt.write_bytes(path, encode_png(self.page.screenshot(), self.max_kib), overwrite=self.overwrite)
        log.info("wrote %s (%.0f KiB)", path, path.stat().st_size / 1024)
        return path

    def settle(self, seconds: float = 1.5) -> None:
        self.page.wait_for_timeout(seconds * 1000)

    def findings(self) -> list[str]:
        return self.page.evaluate(FINDINGS_JS)

    def close_overlays(self) -> None:
        for _ in range(3):
            self.page.keyboard.press("Escape")
        self.settle(0.5)


def open_app(page, url: str, timeout_s: float) -> list[str]:
    """Opens the frontend, waits for its graph, applies SETTINGS; returns what it showed on arrival."""
    page.goto(url)
    page.wait_for_function("() => window.app && window.app.graph && document.querySelector('canvas')",
                           timeout=timeout_s * 1000)
    page.wait_for_timeout(3000)  # first-visit dialogs (the template browser) open after the graph
    arrival = page.evaluate(FINDINGS_JS)
    page.evaluate("async (s) => { for (const [k, v] of Object.entries(s))"
                  " await window.app.extensionManager.setting.set(k, v); }", SETTINGS)
    return arrival


def load_workflow(shooter: Shooter, path: Path) -> None:
    graph = json.loads(path.read_text(encoding="utf-8"))
    shooter.page.evaluate("async ([g, name]) => { await window.app.loadGraphData(g, true, true, name); }",
                          [graph, path.stem])
    shooter.page.wait_for_function("(n) => window.app.graph.nodes.length === n", arg=len(graph["nodes"]))
    shooter.settle(2.5)


# Zooms the canvas onto the nodes of the given types (all nodes and groups for []), clear of the
# frontend's floating toolbars (top: tabs and Run; bottom: canvas controls). The frontend's Fit View
# leaves wide margins (35 % for the mini graph where 45 % fits).
FIT_JS = """(types) => {
  const c = window.app.canvas, g = window.app.graph;
  const items = types.length ? g.nodes.filter(n => types.includes(n.type)) : [...g.nodes, ...(g.groups || [])];
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const it of items) {
    const [x, y, w, h] = it.boundingRect || [it.pos[0], it.pos[1] - 30, it.size[0], it.size[1] + 30];
    x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
  }
  // the canvas spans the page; the left sidebar lies over its first ~55 px
  const el = c.canvas, top = 90, bottom = 70, left = 75, right = 20;
  const W = el.clientWidth - left - right, H = el.clientHeight - top - bottom;
  const scale = Math.min(W / (x1 - x0), H / (y1 - y0), 2);
  c.deselectAll();
  c.ds.scale = scale;
  c.ds.offset[0] = (left + (W - scale * (x1 - x0)) / 2) / scale - x0;
  c.ds.offset[1] = (top + (H - scale * (y1 - y0)) / 2) / scale - y0;
  c.setDirty(true, true);
  return scale;
}"""


def fit_view(shooter: Shooter, types: tuple[str, ...] = ()) -> None:
    scale = shooter.page.evaluate(FIT_JS, list(types))
    log.info("zoom %.0f %%", 100 * scale)
    shooter.settle()


def record_errors(shooter: Shooter, name: str) -> list[str]:
    """If the frontend reports errors for the loaded workflow: opens its details, screenshots them."""
    found = shooter.findings()
    if not found:
        return []
    details = shooter.page.get_by_role("button", name="View details")
    if details.count():
        details.first.click()
        shooter.settle()
        found = found + shooter.findings() + shooter.page.evaluate(PANEL_JS)
    shooter.shoot(f"{name}_errors")
    shooter.close_overlays()
    close_side_panel(shooter)
    return found


def close_side_panel(shooter: Shooter) -> None:
    """Closes the right-hand panel that "View details" opens (Escape leaves it open)."""
    if shooter.page.evaluate(PANEL_JS):
        shooter.page.locator("button[aria-label='Toggle properties panel']").first.click()
        shooter.page.mouse.move(10, 500)  # off the button: no tooltip in the next picture
        shooter.settle()


def history_ids(page) -> set[str]:
    return set(page.evaluate("async () => Object.keys(await (await fetch('/api/history')).json())"))


def open_pack_templates(shooter: Shooter, pack: str) -> None:
    """Opens the template browser on this pack's templates (the left rail's Extensions entry)."""
    page = shooter.page
    page.locator("button[aria-label='Templates']").click()
    page.get_by_role("dialog").get_by_text(pack, exact=True).first.click()
    page.get_by_role("dialog").get_by_text(MINI, exact=True).wait_for()
    shooter.page.mouse.move(10, 500)
    shooter.settle(3)  # the thumbnails


def open_template(shooter: Shooter, name: str, nodes: int) -> None:
    """Clicks a template card in the open browser, as a newcomer does; waits for its graph."""
    shooter.page.get_by_role("dialog").get_by_text(name, exact=True).click()
    shooter.page.wait_for_function("(n) => window.app.graph.nodes.length === n", arg=nodes)
    shooter.settle(2.5)


def run_from_button(shooter: Shooter, timeout_s: float) -> dict:
    """Presses Run and waits until the server's history holds the new prompt; returns its entry."""
    page = shooter.page
    before = history_ids(page)
    page.locator("[data-testid='queue-button']").click()
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        page.wait_for_timeout(5000)
        new = history_ids(page) - before
        if new:
            pid = new.pop()
            entry = page.evaluate("async (id) => (await (await fetch('/api/history/' + id)).json())[id]", pid)
            log.info("run %s finished after %.0f s: %s", pid, time.monotonic() - start,
                     entry.get("status", {}).get("status_str"))
            return entry
    raise TimeoutError(f"the run did not finish within {timeout_s:.0f} s")


def frame_output(shooter: Shooter) -> None:
    """Frames the nodes from the decodes to SaveVideo, the BF16 | W4A4 video paused half-way, its
    controls hidden (paused, Chromium draws them over the lower part of the frames)."""
    page = shooter.page
    page.wait_for_function("() => [...document.querySelectorAll('video')].some(v => v.readyState >= 2)",
                           timeout=60000)
    fit_view(shooter, OUTPUT_TYPES)
    page.evaluate("""() => { for (const v of document.querySelectorAll('video')) {
      v.pause(); v.controls = false; v.currentTime = v.duration / 2; } }""")
    shooter.settle()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", required=True, help="the running ComfyUI, e.g. http://127.0.0.1:8199")
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "screenshots")
    p.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium executable Playwright drives")
    p.add_argument("--overwrite", action="store_true", help="replace existing screenshots")
    p.add_argument("--no-run", action="store_true", help="load the workflows only; do not run the mini one")
    p.add_argument("--run-timeout", type=float, default=900.0, help="seconds to wait for the mini run")
    p.add_argument("--max-kib", type=int, default=400, help="store larger screenshots as 256-colour PNGs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from playwright.sync_api import sync_playwright

    files = workflow_files()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    names = [f.stem for f in files] + ["templates"] + ([] if args.no_run else [f"{MINI}_result"])
    existing = [n for n in names if (args.out_dir / f"{n}.png").exists()]
    if existing and not args.overwrite:  # checked before the browser starts
        print(f"make_screenshots: refusing to overwrite {', '.join(existing)} (pass --overwrite)", file=sys.stderr)
        return 1
    report: dict[str, list[str]] = {}
    ok = True
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT)
        shooter = Shooter(page, args.out_dir, args.overwrite, args.max_kib)
        report["on arrival"] = open_app(page, args.url, timeout_s=120)
        shooter.close_overlays()
        for path in files:
            load_workflow(shooter, path)
            report[path.stem] = record_errors(shooter, path.stem)
            fit_view(shooter)
            shooter.shoot(path.stem)
        open_pack_templates(shooter, PACK)
        shooter.shoot("templates")
        if args.no_run:
            shooter.close_overlays()
        else:
            mini = json.loads((WORKFLOWS / f"{MINI}.json").read_text(encoding="utf-8"))
            open_template(shooter, MINI, len(mini["nodes"]))
            entry = run_from_button(shooter, args.run_timeout)
            status = entry.get("status", {})
            report[f"{MINI} run"] = [f"status {status.get('status_str')}"] + shooter.findings()
            ok = status.get("status_str") == "success"
            if ok:
                frame_output(shooter)
                shooter.shoot(f"{MINI}_result")
            else:
                report[f"{MINI} run"] += [json.dumps(status.get("messages", []))[:2000]]
                shooter.shoot(f"{MINI}_run_error")
        browser.close()
    for what, found in report.items():
        print(f"{what}: {'; '.join(found) if found else 'no dialog or error shown'}")
    return 0 if args.no_run or ok else 1


if __name__ == "__main__":
    sys.exit(main())
