"""The web page of ``encoderlab serve``: plain HTML, one script and one style sheet, all served by the app itself.

Nothing is loaded from elsewhere (no CDN, no web fonts), so the page works offline and under the service's
``default-src 'self'`` policy; there is no inline script or style for that policy to refuse. The page asks
``GET /info`` what the index answers (text, image, like) and which labels it can filter on, then renders the
results of ``/search`` as a grid of thumbnails with their scores and captions; a click on a result searches for
items like it. The query image's preview is a ``data:`` URI, which the policy allows for images.
"""

from __future__ import annotations

PAGE_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>encoderlab search</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/app.css">
<script src="/app.js" defer></script>
</head>
<body>
<header>
  <h1>encoderlab search</h1>
  <p id="about">loading the index&hellip;</p>
</header>
<section id="controls">
  <form id="query" autocomplete="off">
    <input id="text" name="text" type="search" maxlength="1000" placeholder="describe what you are looking for"
           aria-label="query text">
    <button id="go" type="submit">Search</button>
    <label>k <select id="k" aria-label="number of results">
      <option>5</option><option>10</option><option selected>20</option><option>50</option><option>100</option>
    </select></label>
    <label id="label-box">label <select id="label" aria-label="label filter"><option value="">any</option></select>
    </label>
  </form>
  <div id="drop" tabindex="0" aria-label="query image">
    <img id="preview" alt="" hidden>
    <span>Drop an image here, paste one, or <label for="file" class="pick">choose a file</label></span>
    <input id="file" type="file" accept="image/*">
  </div>
</section>
<p id="status" role="status" aria-live="polite"></p>
<main id="grid" aria-label="results"></main>
<footer>Click a result to search for more like it. Scores are cosine similarities.</footer>
</body>
</html>
"""

APP_CSS = """
:root { --fg: #1d2430; --muted: #5b6575; --line: #d8dde6; --accent: #2f5fd0; --bg: #f6f7f9; --error: #b3261e; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1240px; padding: 16px 20px 40px; color: var(--fg); background: #fff;
       font: 15px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; border-bottom: 1px solid var(--line); }
h1 { font-size: 20px; margin: 8px 0 10px; }
#about { color: var(--muted); margin: 0; font-size: 13px; }
#controls { display: flex; gap: 16px; align-items: stretch; flex-wrap: wrap; margin: 14px 0 6px; }
#query { display: flex; gap: 8px; align-items: center; flex: 1 1 520px; flex-wrap: wrap; }
#text { flex: 1 1 260px; font: inherit; padding: 8px 10px; border: 1px solid var(--line); border-radius: 6px; }
#text:focus, #drop:focus { outline: 2px solid var(--accent); outline-offset: 1px; }
button, select { font: inherit; padding: 7px 10px; border: 1px solid var(--line); border-radius: 6px;
                 background: #fff; }
button { background: var(--accent); color: #fff; border-color: var(--accent); cursor: pointer; }
label { color: var(--muted); font-size: 13px; }
#drop { position: relative; flex: 0 1 360px; display: flex; align-items: center; gap: 10px; padding: 8px 12px;
        min-height: 48px; border: 2px dashed var(--line); border-radius: 8px; color: var(--muted); font-size: 13px; }
#drop.over { border-color: var(--accent); background: #eef3ff; }
#drop .pick { color: var(--accent); text-decoration: underline; cursor: pointer; font-size: 13px; }
#file { position: absolute; width: 1px; height: 1px; opacity: 0; overflow: hidden; }  /* focusable, scriptable */
#preview { width: 40px; height: 40px; object-fit: contain; border-radius: 4px; background: var(--bg); }
#status { min-height: 1.4em; color: var(--muted); margin: 6px 0 12px; }
#status.error { color: var(--error); }
body.busy #grid { opacity: 0.55; }
.hidden { display: none !important; }
#grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(172px, 1fr)); gap: 14px; }
.hit { margin: 0; border: 1px solid var(--line); border-radius: 8px; overflow: hidden; cursor: pointer;
       background: #fff; transition: box-shadow 0.1s; }
.hit:hover, .hit:focus { box-shadow: 0 2px 10px rgba(20, 40, 90, 0.18); outline: none; border-color: var(--accent); }
.hit img, .hit .noimg { display: block; width: 100%; aspect-ratio: 1 / 1; object-fit: contain; background: var(--bg); }
.hit .noimg { padding: 12px; font-size: 13px; overflow: hidden; }
.hit figcaption { padding: 6px 8px 8px; font-size: 12px; }
.hit .score { font-weight: 600; font-variant-numeric: tabular-nums; }
.hit .label { float: right; color: var(--muted); max-width: 60%; overflow: hidden; text-overflow: ellipsis;
              white-space: nowrap; }
.hit .caption { clear: both; margin-top: 2px; color: var(--fg); overflow: hidden;
                display: -webkit-box; -webkit-line-clamp: 2; -webkit-box-orient: vertical; }
footer { margin-top: 24px; color: var(--muted); font-size: 12px; }
"""

APP_JS = r"""
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  let info = null;

  function status(text, isError) {
    const s = $("status");
    s.textContent = text;
    s.classList.toggle("error", Boolean(isError));
  }

  function params(extra) {
    const p = new URLSearchParams(extra);
    p.set("k", $("k").value);
    if ($("label").value) p.set("label", $("label").value);
    return p.toString();
  }

  async function call(url, options) {
    const res = await fetch(url, options);
    let body;
    try { body = await res.json(); } catch (e) { body = { error: res.status + " " + res.statusText }; }
    if (!res.ok) throw new Error(body.error + (body.fix ? " (" + body.fix + ")" : ""));
    return body;
  }

  function span(cls, text) {
    const s = document.createElement("span");
    s.className = cls;
    s.textContent = text;
    return s;
  }

  function hitFigure(hit) {
    const fig = document.createElement("figure");
    fig.className = "hit";
    fig.dataset.id = hit.id;
    fig.tabIndex = 0;
    fig.title = "more like " + hit.id;
    if (hit.thumbnail) {
      const img = document.createElement("img");
      img.src = hit.thumbnail;
      img.alt = hit.caption || hit.id;
      fig.append(img);
    } else {
      fig.append(span("noimg", hit.caption || hit.id));
    }
    const cap = document.createElement("figcaption");
    cap.append(span("score", hit.score.toFixed(3)));
    if (hit.label !== null && hit.label !== undefined) cap.append(span("label", String(hit.label)));
    cap.append(span("caption", hit.caption || hit.id));
    fig.append(cap);
    fig.addEventListener("click", () => like(hit.id));
    fig.addEventListener("keydown", (e) => { if (e.key === "Enter") like(hit.id); });
    return fig;
  }

  function render(body) {
    const grid = $("grid");
    grid.replaceChildren(...body.results.map(hitFigure));
    grid.dataset.query = JSON.stringify(body.query);
  }

  async function run(describe, url, options) {
    status("searching " + describe + "\u2026");
    document.body.classList.add("busy");
    try {
      const body = await call(url, options);
      render(body);
      const ms = Object.values(body.seconds || {}).reduce((a, b) => a + b, 0) * 1000;
      status(body.count + " results for " + describe + " (" + ms.toFixed(1) + " ms on the server)" +
             (body.note ? ": " + body.note : ""));
    } catch (e) {
      status(e.message, true);
    } finally {
      document.body.classList.remove("busy");
    }
  }

  function like(id) {
    run("items like \u201c" + id + "\u201d", "/search?" + params({ like: id }));
  }

  function sendImage(file) {
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => { $("preview").src = reader.result; $("preview").hidden = false; };
    reader.readAsDataURL(file);
    const form = new FormData();
    form.append("image", file, file.name || "pasted image");
    run("\u201c" + (file.name || "pasted image") + "\u201d", "/search?" + params({}), { method: "POST", body: form });
  }

  function describeIndex(doc) {
    const parts = [doc.count.toLocaleString() + " " + doc.modality + " items", doc.kind + " index"];
    if (doc.encoder && doc.encoder.spec) parts.push("encoder " + doc.encoder.spec);
    const r = doc.metrics && doc.metrics.recall_at_10;
    if (typeof r === "number") parts.push("recall@10 " + r.toFixed(3));
    return parts.join(" \u00b7 ");
  }

  function setUp(doc) {
    info = doc;
    $("about").textContent = describeIndex(doc);
    const labels = doc.filters && doc.filters.label;
    if (labels && labels.values.length) {
      for (const v of labels.values) {
        const o = document.createElement("option");
        o.value = o.textContent = String(v);
        $("label").append(o);
      }
    } else {
      $("label-box").classList.add("hidden");
    }
    const max = doc.limits.max_k;
    for (const o of Array.from($("k").options)) if (Number(o.value) > max) o.remove();
    if (!doc.queries.includes("text")) { $("text").disabled = $("go").disabled = true; $("text").placeholder =
      "this index has no text encoder: drop an image or click a result"; }
    if (!doc.queries.includes("image")) $("drop").classList.add("hidden");
    document.body.dataset.ready = "1";
  }

  function wire() {
    $("query").addEventListener("submit", (e) => {
      e.preventDefault();
      const text = $("text").value.trim();
      if (!text) { status("type a few words first", true); return; }
      run("\u201c" + text + "\u201d", "/search?" + params({ text: text }));
    });
    const drop = $("drop");
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      sendImage(e.dataTransfer.files[0]);
    });
    drop.addEventListener("keydown", (e) => { if (e.key === "Enter") $("file").click(); });
    $("file").addEventListener("change", () => sendImage($("file").files[0]));
    document.addEventListener("paste", (e) => {
      const item = Array.from(e.clipboardData.items).find((i) => i.type.startsWith("image/"));
      if (item && info && info.queries.includes("image")) sendImage(item.getAsFile());
    });
  }

  wire();
  call("/info").then(setUp).catch((e) => status("cannot read the index: " + e.message, true));
})();
"""
