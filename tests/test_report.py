"""The HTML report: every section from a full document, escaping, placeholders, and a real headless Chromium.

The browser tests open the page over ``file://`` and check what a reader would see: a page that is not blank, every
image decoded, and no request leaving the page. Each of those checks is first shown to fail on a page built to
fail it (``test_browser_checks_catch_broken_pages``), so a passing report means something. They are skipped only
when chromium, chromedriver or selenium is missing (``make browser`` installs the first two, the dev extra the
third). The screenshots are kept in ``$ENCODERLAB_TEST_ARTIFACTS`` (default ``.test-artifacts/``).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from encoderlab.report import SECTIONS, UNREADABLE_HEADING, check_document, render_report, report_html, report_images
from encoderlab.report.html import CSP, NO_MATPLOTLIB
from encoderlab.report.markdown import markdown_to_html

REPO = Path(__file__).resolve().parents[1]
HEADINGS = ["Encoder Note", "Rungs", "Quality vs cost", "Accuracy vs labels per class", "Per-class recall",
            "Confusion matrix", "Slices", "Failing items", "Retrieval", "Histograms", "Data problems",
            "Unreadable images"]
URL_ATTRS = {"src", "href", "srcset", "action", "formaction", "poster", "data", "background", "cite", "ping",
             "xlink:href", "manifest"}


# ----------------------------------------------------------------------------------------------- test documents

def _images(tmp_path: Path) -> dict[str, Path]:
    """A few small real images, one large one, one corrupt file and one path that does not exist."""
    d = tmp_path / "img"
    d.mkdir()
    paths = {}
    for name, colour, shape in (("red", (220, 40, 40), "ellipse"), ("blue", (40, 80, 220), "rectangle"),
                                ("green", (30, 170, 60), "polygon")):
        im = Image.new("RGB", (64, 64), "white")
        draw = ImageDraw.Draw(im)
        if shape == "polygon":
            draw.polygon([(32, 6), (60, 58), (4, 58)], fill=colour)
        else:
            getattr(draw, shape)([8, 8, 56, 56], fill=colour)
        paths[name] = d / f"{name}.png"
        im.save(paths[name])
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:450]
    photo = np.stack([xx * 255 / 450, yy * 255 / 300, 128 + 40 * np.sin(xx / 17)], -1) + rng.normal(0, 8, (300, 450, 3))
    paths["photo"] = d / "photo.jpg"
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(paths["photo"], quality=90)
    rgba = Image.new("RGBA", (72, 72), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse([4, 4, 68, 68], fill=(250, 200, 20, 255))
    paths["emoji"] = d / "emoji.png"
    rgba.save(paths["emoji"])
    paths["corrupt"] = d / "corrupt.png"
    whole = paths["photo"].read_bytes()
    paths["corrupt"].write_bytes(whole[: len(whole) // 2])  # a JPEG cut in half, named .png
    paths["missing"] = d / "gone.png"
    return paths


def _rungs() -> list[dict[str, Any]]:
    def rung(name: str, level: int, kind: str, value: float | None, fit: float, ms: float, params: int,
             chosen: bool = False, skipped: str | None = None) -> dict[str, Any]:
        ci = None if value is None else 0.04
        return {"name": name, "level": level, "kind": kind, "metric": "top1", "value": value,
                "ci_low": None if ci is None else value - ci, "ci_high": None if ci is None else value + ci,
                "fit_seconds": fit, "predict_ms_per_item": ms, "peak_rss_mb": 512.0 + level * 100,
                "trainable_params": params, "chosen": chosen, "skipped": skipped}

    return [rung("majority", 0, "baseline", 0.21, 0.001, 0.0004, 0),
            rung("pixels+logreg", 0, "baseline", 0.38, 2.5, 0.02, 30_730),
            rung("zero-shot", 1, "rung", 0.61, 0.0, 0.35, 0),
            rung("knn", 2, "rung", 0.69, 0.4, 0.5, 0),
            rung("linear probe", 2, "rung", 0.78, 3.1, 0.36, 5_130, chosen=True),
            rung("tip-adapter-f", 3, "rung", 0.79, 41.0, 0.41, 512_000),
            rung("coop", 3, "rung", None, 0.0, 0.0, 8_192, skipped="not needed: linear probe is within 1 point")]


def _curve() -> dict[str, Any]:
    points, fit = [], []
    for method, top in (("linear", 0.8), ("tip-adapter", 0.83)):
        for shots in (1, 2, 4, 8, 16):
            points.append({"method": method, "shots": shots, "mean": top - 0.35 / shots ** 0.5, "std": 0.03,
                           "n_seeds": 3})
        points.append({"method": method, "shots": "full", "mean": top, "std": 0.0, "n_seeds": 1})
        for shots in (1, 2, 4, 8, 16, 32, 64):
            pred = top - 0.35 / shots ** 0.5
            fit.append({"method": method, "shots": shots, "pred": pred, "lo": pred - 0.04, "hi": pred + 0.04})
    return {"points": points, "fit": fit, "note": "fitted a + b * log2(shots); extrapolated past 16 shots"}


def full_doc(tmp_path: Path) -> dict[str, Any]:
    img = _images(tmp_path)
    classes = ["cat", "dog", "<b>bird</b>", "fish"]
    nb = [{"id": "train/7", "image": str(img["red"]), "text": None, "label": "cat", "similarity": 0.91},
          {"id": "train/9", "image": str(img["blue"]), "text": None, "label": "dog", "similarity": 0.88},
          {"id": "train/3", "image": str(img["corrupt"]), "text": None, "label": "dog", "similarity": 0.85}]
    return {
        "title": "Ladder run: emoji with efficientnet-minilm",
        "encoder": "local:/models/efficientnet-minilm", "dataset": "emoji", "created": "2025-12-01T16:30:00+00:00",
        "note_md": ("# Encoder Note\n\nThe **linear probe** is enough: `top1` 0.78.\n\n## Why\n\n- zero-shot is 17 "
                    "points lower\n- fine-tuning was *not* needed\n\n| rung | top1 |\n|---|---|\n| probe | 0.78 |\n"
                    "| zero-shot | 0.61 |\n\nSee https://example.org/paper for the method."),
        "rungs": _rungs(),
        "curve": _curve(),
        "per_class": [{"class": c, "recall": r, "ci_low": None if r is None else max(0, r - 0.1),
                       "ci_high": None if r is None else min(1, r + 0.1), "n": 20 + i}
                      for i, (c, r) in enumerate(zip(classes + ["frog", "owl"], [0.9, 0.55, 0.7, 0.3, 1.0, None]))],
        "confusion": {"classes": classes, "matrix": [[18, 2, 0, 0], [5, 11, 3, 1], [0, 4, 14, 2], [1, 2, 9, 8]]},
        "slices": [{"column": "source", "value": "camera", "accuracy": 0.81, "ci_low": 0.77, "ci_high": 0.85,
                    "n": 400, "small": False},
                   {"column": "source", "value": "scan", "accuracy": 0.52, "ci_low": 0.40, "ci_high": 0.64,
                    "n": 60, "small": False},
                   {"column": "year", "value": "1999", "accuracy": 0.2, "ci_low": 0.0, "ci_high": 0.6, "n": 5,
                    "small": True}],
        "failing": [{"id": "test/1", "image": str(img["green"]), "text": None, "label": "cat", "prediction": "dog",
                     "neighbours": nb},
                    {"id": "test/2", "image": str(img["corrupt"]), "text": "a small dog", "label": "dog",
                     "prediction": "cat", "neighbours": nb[:1]},
                    {"id": "test/3", "image": None, "text": "a cat on a mat", "label": "cat", "prediction": "fish",
                     "neighbours": [{"id": "train/1", "image": None, "text": "a fish in a bowl", "label": "fish",
                                     "similarity": 0.7}]}],
        "retrieval": [{"query": {"text": "a red circle", "image": None},
                       "results": [{"image": str(img["red"]), "text": None, "rank": 1, "score": 0.93, "correct": True},
                                   {"image": str(img["photo"]), "text": None, "rank": 2, "score": 0.61,
                                    "correct": False},
                                   {"image": str(img["missing"]), "text": None, "rank": 3, "score": 0.5,
                                    "correct": False}]},
                      {"query": {"text": None, "image": str(img["emoji"])},
                       "results": [{"image": None, "text": "a yellow face", "rank": 1, "score": 0.8,
                                    "correct": True}]}],
        "histograms": [{"title": "caption-image similarity", "cut": 0.2, "xlabel": "cosine similarity",
                        "values": np.random.default_rng(1).normal(0.3, 0.08, 500).tolist()},
                       {"title": "empty", "values": [], "cut": None, "xlabel": "x"}],
        "data_problems": {"counts": {"corrupt": 2, "cross-split duplicates": 6},
                          "items": [{"kind": "corrupt", "id": "img/x.png", "detail": "truncated"},
                                    {"kind": "duplicate", "id": "train/4", "detail": "same bytes as test/9"}]},
    }


# ------------------------------------------------------------------------------------------------ page parsing

class _Page(HTMLParser):
    """Tags with their attributes, heading texts, and the text of every <style>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.headings: dict[str, list[str]] = {}
        self.styles: list[str] = []
        self._open: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in ("h1", "h2", "h3", "style"):
            self._open, self._text = tag, []
        if attrs and dict(attrs).get("style"):
            self.styles.append(dict(attrs)["style"] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == self._open:
            text = "".join(self._text)
            if tag == "style":
                self.styles.append(text)
            else:
                self.headings.setdefault(tag, []).append(text)
            self._open = None

    def handle_data(self, data: str) -> None:
        if self._open:
            self._text.append(data)


def parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    p.close()
    return p


def img_tags(p: _Page) -> list[dict[str, str | None]]:
    return [a for t, a in p.tags if t == "img"]


# ------------------------------------------------------------------------------------------------------ unit tests

def test_full_document_renders_every_section(tmp_path: Path) -> None:
    doc = json.loads(json.dumps(full_doc(tmp_path)))  # the ladder hands over plain JSON
    out = render_report(doc, tmp_path / "run" / "report.html")
    assert out == tmp_path / "run" / "report.html"
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # written atomically: no temporary left over
    page = parse(out.read_text(encoding="utf-8"))
    found = page.headings["h2"] + page.headings["h3"]
    for heading in HEADINGS:
        assert heading in found, heading
    assert [h for _, _, h, _ in SECTIONS] + [UNREADABLE_HEADING] == page.headings["h2"]
    assert page.headings["h1"] == [doc["title"]]
    # 5 plots (rungs, curve, per-class, confusion, one histogram: the empty one has none) + readable thumbnails
    plots = [a for a in img_tags(page) if a.get("class") == "plot"]
    assert len(plots) == 5
    readable = {str(p) for p in report_images(doc)} - {str(tmp_path / "img" / n) for n in ("corrupt.png", "gone.png")}
    thumbs = [a for a in img_tags(page) if a.get("class") == "thumb"]
    assert len({a["src"] for a in thumbs}) == len(readable) == 5
    for a in plots + thumbs:
        data = base64.b64decode(a["src"].split(",", 1)[1])
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if a.get("class") == "thumb":
                assert max(im.size) <= 96 and (im.width, im.height) == (int(a["width"]), int(a["height"]))


def test_page_references_nothing_outside_itself(tmp_path: Path) -> None:
    html_text = render_report(full_doc(tmp_path), tmp_path / "report.html").read_text(encoding="utf-8")
    page = parse(html_text)
    metas = [a for t, a in page.tags
             if t == "meta" and (a.get("http-equiv") or "").lower() == "content-security-policy"]
    assert [m["content"] for m in metas] == [CSP] == ["default-src 'none'; img-src data:; style-src 'unsafe-inline'"]
    refs = [(t, k, v) for t, a in page.tags for k, v in a.items() if k in URL_ATTRS]
    assert refs, "the page has images and in-page links"
    for tag, attr, value in refs:
        assert value and (value.startswith("data:") or value.startswith("#")), (tag, attr, (value or "")[:60])
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html_text, re.I)
    assert not {t for t, _ in page.tags} & {"script", "iframe", "object", "embed", "base", "form", "video", "audio"}
    assert [a["href"] for t, a in page.tags if t == "link"] == ["data:,"]  # the favicon, so none is fetched
    for css in page.styles:
        assert all(u.strip("'\" ").startswith("data:") for u in re.findall(r"url\(([^)]*)\)", css)), css
        assert "@import" not in css and "@font-face" not in css
    assert "https://example.org/paper" in html_text  # the note's URL is text, not a link


def test_title_only_and_empty_documents(tmp_path: Path) -> None:
    page = parse(render_report({"title": "Only a title"}, tmp_path / "a.html").read_text(encoding="utf-8"))
    assert page.headings == {"h1": ["Only a title"]}
    assert img_tags(page) == []
    empty = parse(report_html({}))
    assert empty.headings == {"h1": ["encoderlab report"]}
    # empty values and None mean "no section", as a missing key does
    nothing = {k: v for k, v in zip([s[0] for s in SECTIONS], ["", [], {}, [], {}, [], [], [], [], {}])}
    assert parse(report_html({**nothing, "curve": None})).headings == {"h1": ["encoderlab report"]}


def test_text_is_escaped_everywhere(tmp_path: Path) -> None:
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    doc = full_doc(tmp_path)
    doc["title"] = evil
    doc["note_md"] = f"# {evil}\n\n**{evil}** and `{evil}`\n\n- {evil}\n\n| a | b |\n|---|---|\n| {evil} | x |"
    doc["rungs"][0]["name"] = evil
    doc["rungs"][-1]["skipped"] = evil
    doc["failing"][2]["text"] = evil
    doc["slices"][0]["value"] = evil
    doc["data_problems"]["items"][0]["detail"] = evil
    doc["histograms"][1]["title"] = evil
    html_text = report_html(doc)
    page = parse(html_text)
    assert "script" not in {t for t, _ in page.tags}
    assert not [k for _, a in page.tags for k in a if k.startswith("on")]
    assert all(a["src"].startswith("data:") for a in img_tags(page))
    assert "<script>" not in html_text
    assert html_text.count("&lt;script&gt;") >= 8
    assert "&lt;b&gt;bird&lt;/b&gt;" in html_text and "<b>bird</b>" not in html_text


def test_unreadable_images_become_named_placeholders(tmp_path: Path) -> None:
    doc = full_doc(tmp_path)
    html_text = report_html(doc)
    page = parse(html_text)
    placeholders = [a for t, a in page.tags if t == "div" and a.get("class") == "ph"]
    # corrupt.png: once as a neighbour, once as a failing item; gone.png once, as a retrieval result
    titles = [a.get("title") or "" for a in placeholders]
    assert sum(bool(re.search(r"corrupt\.png: (truncated|corrupt)", t)) for t in titles) == 2, titles
    assert sum("gone.png: missing" in t for t in titles) == 1
    section = html_text.split(f"<h2>{UNREADABLE_HEADING}</h2>", 1)[1]
    assert str(tmp_path / "img" / "corrupt.png") in section and str(tmp_path / "img" / "gone.png") in section
    assert section.split("<tbody>", 1)[1].split("</tbody>", 1)[0].count("<tr>") == 2  # each file listed once
    assert report_images(doc)[:3] == [str(tmp_path / "img" / n) for n in ("green.png", "red.png", "blue.png")]
    assert len(report_images(doc)) == 7


def test_rungs_table_marks_the_chosen_and_the_skipped(tmp_path: Path) -> None:
    doc = {"rungs": _rungs()}
    html_text = report_html(doc)
    chosen = re.findall(r'<tr class="chosen">(.*?)</tr>', html_text)
    skipped = re.findall(r'<tr class="skipped">(.*?)</tr>', html_text)
    assert len(chosen) == 1 and "linear probe" in chosen[0] and "0.780" in chosen[0] and "[0.740, 0.820]" in chosen[0]
    assert len(skipped) == 1 and "not needed: linear probe is within 1 point" in skipped[0]
    assert "512.0k" in html_text and "5.1k" in html_text
    assert parse(html_text).headings["h3"] == ["Quality vs cost"]
    # only skipped rungs (nothing to plot): the table without the plot
    only_skipped = report_html({"rungs": [doc["rungs"][-1]]})
    assert "Quality vs cost" not in only_skipped and "<table>" in only_skipped


def test_slices_worst_first_and_small_flagged(tmp_path: Path) -> None:
    html_text = report_html({"slices": full_doc(tmp_path)["slices"]})
    order = [html_text.index(v) for v in (">1999<", ">scan<", ">camera<")]
    assert order == sorted(order)
    assert html_text.count('<tr class="small">') == 1 and '<span class="badge small">small</span>' in html_text


def test_markdown_subset() -> None:
    out = markdown_to_html("# Top\n## Sub\npara one\nstill one\n\n- **bold** item\n- `a**b**c` code\n\n"
                           "1. first\n2. second\n\n| h1 | h2 |\n|:--|--:|\n| `x|y` | **z** |\n| only |\n\n"
                           "```\n<pre> & **raw**\n```\n[a link](https://x.org) ![img](http://y.org/i.png)")
    assert "<h3>Top</h3>" in out and "<h4>Sub</h4>" in out
    assert "<p>para one still one</p>" in out
    assert "<ul><li><strong>bold</strong> item</li><li><code>a**b**c</code> code</li></ul>" in out
    assert "<ol><li>first</li><li>second</li></ol>" in out
    assert "<th>h1</th><th>h2</th>" in out and "<td><strong>z</strong></td>" in out and "<td>only</td><td></td>" in out
    assert "<pre><code>&lt;pre&gt; &amp; **raw**</code></pre>" in out
    assert "<a" not in out and "<img" not in out and "[a link](https://x.org)" in out


def test_wrong_types_fail_with_the_key() -> None:
    with pytest.raises(TypeError, match="rungs must be a list of objects, got dict"):
        report_html({"rungs": {"name": "x"}})
    with pytest.raises(TypeError, match=r"failing\[0\]\.neighbours must be a list"):
        check_document({"failing": [{"id": 1, "neighbours": "x"}]})
    with pytest.raises(TypeError, match=r"per_class\[1\] must be an object"):
        check_document({"per_class": [{}, 3]})
    with pytest.raises(ValueError, match="shape .2, 2. but there are 3 classes"):
        report_html({"confusion": {"classes": ["a", "b", "c"], "matrix": [[1, 0], [0, 1]]}})


def test_plots_survive_odd_numbers() -> None:
    rungs = [{"name": "a", "kind": "rung", "value": 0.5, "fit_seconds": 0.0, "predict_ms_per_item": None},
             {"name": "b", "kind": "baseline", "value": float("nan")},
             {"name": "c", "kind": "rung", "value": "0.7", "ci_low": None, "ci_high": 0.9, "fit_seconds": 3,
              "predict_ms_per_item": 0.2, "chosen": True}]
    curve = {"points": [{"method": "m", "shots": "full", "mean": 0.9, "std": None}], "fit": []}
    page = parse(report_html({"rungs": rungs, "curve": curve, "per_class": [{"class": "x", "recall": None}],
                              "histograms": [{"title": "h", "values": [1.0, float("inf"), "x", 2.0], "cut": 1.5}]}))
    assert len([a for a in img_tags(page) if a.get("class") == "plot"]) == 3  # per-class has no recall to draw


def test_curve_from_labels_per_class() -> None:
    """The ladder's own curve rows: "full" at its real labels per class, a one-point fit at twice that."""
    from encoderlab.report import plots

    points = [{"method": "linear", "shots": k, "labels_per_class": float(k), "mean": 0.4 + 0.05 * k, "std": 0.02}
              for k in (1, 2, 4)] + [{"method": "linear", "shots": "full", "labels_per_class": 37.5, "mean": 0.8}]
    fit = [{"method": "linear", "labels_per_class": 75.0, "pred": 0.84, "lo": 0.8, "hi": 0.88}]
    assert plots.label_curve(points, fit) is not None
    assert plots.label_curve([], fit) is not None  # the fit alone is drawn
    assert plots.label_curve([], [{"method": "linear", "pred": 0.8}]) is None  # no x at all: nothing to draw
    ticks: dict[float, str] = {}
    series = plots._series(points, plots._full_x(points), ticks, "mean", "std")
    assert [x for x, *_ in series] == [1.0, 2.0, 4.0, 37.5] and ticks[37.5] == "full\n(37.5)"


def test_without_matplotlib_tables_stay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    html_text = report_html({"rungs": _rungs(), "per_class": [{"class": "x", "recall": 0.5}]})
    page = parse(html_text)
    assert not [a for a in img_tags(page) if a.get("class") == "plot"]
    assert html_text.count(NO_MATPLOTLIB.replace("'", "&#x27;")) == 2 and "linear probe" in html_text


# --------------------------------------------------------------------------------------------- the real browser

def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    missing = [name for name, found in (("chromium", chromium), ("chromedriver", chromedriver),
                                        ("selenium", importlib.util.find_spec("selenium"))) if not found]
    if missing:
        pytest.skip(f"the browser test needs {', '.join(missing)}: `make browser` installs chromium and "
                    "chromium-driver (apt), `pip install -e '.[dev]'` installs selenium")
    return str(chromium), str(chromedriver)


def chrome(window: str, logs: dict[str, str]) -> Any:
    """A headless Debian Chromium driven by selenium (skips when either is missing); the caller quits it."""
    chromium, chromedriver = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium  # with both paths given, selenium never runs its driver downloader
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={window}",
                "--hide-scrollbars", "--force-device-scale-factor=1", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", logs)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)
    driver.set_page_load_timeout(60)
    return driver


@pytest.fixture(scope="module")
def browser() -> Any:
    driver = chrome("1280,2000", {"performance": "ALL", "browser": "ALL"})
    try:
        yield driver
    finally:
        driver.quit()


def _open(driver: Any, path: Path) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("performance")  # drain what earlier pages logged
    driver.get_log("browser")
    driver.get(path.as_uri())
    WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.readyState") == "complete")


def blank_reason(png: bytes, min_colours: int = 1000, min_std: float = 15.0) -> str | None:
    """Why a screenshot looks blank (too few distinct colours or too little contrast), or None when it does not.

    Measured at 1280 px wide: an empty page has 1 colour and std 0, a page with only a title and a few lines of
    text about 400-700 colours and std 6-8, the full test report about 2,900 colours and std 28 (its plots and
    thumbnails). The thresholds sit between text-only pages and the report.
    """
    with Image.open(io.BytesIO(png)) as im:
        rgb = im.convert("RGB")
    colours = len(rgb.getcolors(maxcolors=rgb.width * rgb.height))
    std = float(np.asarray(rgb.convert("L"), dtype=np.float32).std())
    if colours < min_colours or std < min_std:
        return f"{colours} distinct colours, grey std {std:.1f} (need >= {min_colours} and >= {min_std})"
    return None


def broken_images(driver: Any) -> list[str]:
    """Images the browser could not decode (``complete`` but no natural width), by the start of their src."""
    return driver.execute_script(
        "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
        ".map(i => (i.getAttribute('src') || '').slice(0, 60));")


def requests_off_page(driver: Any, page: Path) -> list[str]:
    """Every URL the page asked for beyond itself and data: URIs, from resource timing and the network log."""
    names = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    urls = [u for u in names if not u.startswith("data:")]
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            url = msg["params"]["request"]["url"]
            if not url.startswith("data:") and url != page.as_uri():
                urls.append(url)
    return urls


def csp_violations(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]


def _artifacts() -> Path:
    out = Path(os.environ.get("ENCODERLAB_TEST_ARTIFACTS") or REPO / ".test-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_browser_checks_catch_broken_pages(browser: Any, tmp_path: Path) -> None:
    """Each check of the report test fails on a page made to fail it; otherwise a pass would mean nothing."""
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body style='background:#fff'></body></html>")
    _open(browser, blank)
    assert blank_reason(browser.get_screenshot_as_png()) is not None
    title_only = tmp_path / "title.html"
    render_report({"title": "Only a title"}, title_only)
    _open(browser, title_only)
    assert blank_reason(browser.get_screenshot_as_png()) is not None  # one line of text is not a report

    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><html><body><img src='data:image/png;base64,iVBORw0KGgoAAAA'></body></html>")
    _open(browser, broken)
    assert broken_images(browser) == ["data:image/png;base64,iVBORw0KGgoAAAA"]

    # port 9 (discard) on loopback: refused at once, nothing leaves the machine, but the request is still made
    leaky = tmp_path / "leaky.html"
    leaky.write_text("<!DOCTYPE html><html><body><img src='http://127.0.0.1:9/x.png'></body></html>")
    _open(browser, leaky)
    assert "http://127.0.0.1:9/x.png" in requests_off_page(browser, leaky)

    # under the report's policy the same image is refused before any request: the CSP check and the image check
    # are what notice it
    guarded = tmp_path / "guarded.html"
    guarded.write_text(f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="{CSP}">'
                       "</head><body><img src='http://127.0.0.1:9/x.png'></body></html>")
    _open(browser, guarded)
    assert broken_images(browser) == ["http://127.0.0.1:9/x.png"]
    assert csp_violations(browser)


def test_report_in_a_real_browser(browser: Any, tmp_path: Path) -> None:
    doc = full_doc(tmp_path)
    page = render_report(doc, tmp_path / "report.html")
    n_img = len(img_tags(parse(page.read_text(encoding="utf-8"))))
    _open(browser, page)
    artifacts = _artifacts()
    shot = browser.get_screenshot_as_png()
    (artifacts / "report.png").write_bytes(shot)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    full = browser.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": 1280, "height": min(int(height), 16000), "scale": 1}})
    (artifacts / "report-full.png").write_bytes(base64.b64decode(full["data"]))
    shutil.copyfile(page, artifacts / "report.html")

    assert browser.title == doc["title"]
    assert blank_reason(shot) is None
    assert browser.execute_script("return document.images.length") == n_img > 10
    assert broken_images(browser) == []
    assert requests_off_page(browser, page) == []
    assert csp_violations(browser) == []
    policy = browser.execute_script(
        "return document.querySelector('meta[http-equiv=\"Content-Security-Policy\"]').content")
    assert policy == CSP
    headings = browser.execute_script("return Array.from(document.querySelectorAll('h2, h3')).map(h => h.innerText)")
    assert set(HEADINGS) <= set(headings)


def test_the_note_section_takes_the_document_title_for_it():
    from encoderlab.report import report_html

    page = report_html({"title": "t", "note_md": "# x\n\nsome text", "note_title": "Filter summary"})
    assert "<h2>Filter summary</h2>" in page and "Encoder Note</h2>" not in page
    assert "<h2>Encoder Note</h2>" in report_html({"title": "t", "note_md": "text"})
