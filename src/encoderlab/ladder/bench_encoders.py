"""Several encoders on one labelled dataset: quality, speed and memory side by side (``encoderlab bench-encoders``).

Per encoder:

- quality: linear-probe and kNN top-1 with 95% bootstrap intervals on the test split — the ``linear`` and ``knn``
  rungs on the full training split, knobs chosen on val, refit on train + val (the protocol of ``compare``), on the
  encoder's own embedding and on the store's cached embeddings;
- cost: load seconds, extraction throughput (items/s) and ms/item, peak resident memory, parameters, embedding size.
  The costs are measured in a child process per encoder (``python -m encoderlab.ladder.bench_encoders``), so the
  peak RSS is that encoder's alone, not everything loaded before it, and into a temporary store, so cached
  embeddings cannot fake speed: every item of the fixed speed subset is decoded, preprocessed, encoded and written,
  after one warm-up batch (graph export and compilation are paid there, and reported apart).

Unknown specs fail before any work (with close matches); an encoder whose modalities do not fit the data, or that
cannot be loaded, is skipped and the table says why. The bench is a ``RunResult`` (task "bench-encoders") whose run
directory holds one sub-directory per encoder and rung, and a plot (``bench-encoders.png``).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.manifest import Dataset
from ..errors import EncoderlabError
from ..progress import progress_bar
from ..results import RunResult, data_provenance, write_run
from ..results.run import json_default, slug
from ..results.tables import fmt, format_table
from ..rungs.costs import peak_rss_mb
from ..store import EmbeddingStore

TASK = "bench-encoders"
RUNGS = ("linear", "knn")
MODALITIES = ("auto", "image", "text")
#: items of the fixed speed subset (the first ones by id); ~2-3 s per EfficientNet-Lite pass on 2 CPU cores
SPEED_ITEMS = 128
#: cold extractions of the subset per encoder; the fastest counts
SPEED_REPEATS = 2
WARMUP_ITEMS = 4
PLOT_NAME = "bench-encoders.png"
PROTOCOL = {
    "quality": "rungs linear and knn: fit train, choose knobs on val, refit train+val, report test (95% bootstrap CI)",
    "speed": "a child process per encoder; a fixed subset (the first items by id) embedded into a fresh temporary "
             "store after one warm-up batch, the fastest of speed_repeats such extractions; items/s = items encoded "
             "/ wall seconds of the extraction (decode, preprocess, forward, store write); peak RSS = the child's "
             "ru_maxrss",
}

Measure = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class EncoderBench:
    """One row per encoder (``rows``), each measured encoder's rung results, the skipped ones and why."""

    rows: list[dict[str, Any]]
    results: dict[str, dict[str, RunResult]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    result: RunResult | None = None
    plot: Path | None = None

    def to_json(self) -> dict[str, Any]:
        assert self.result is not None
        return self.result.to_json()

    def format(self) -> str:
        notes = self.result.config.get("notes", []) if self.result is not None else []
        return format_bench(self.rows, notes)


# ---- before any work: specs and modalities -------------------------------------------------------------------


def check_specs(specs: Sequence[str]) -> list[str]:
    """The specs, stripped; an empty list, a repeated spec or an unknown name fails here, with close matches."""
    from ..encoders import parse_spec

    cleaned = [s.strip() for s in specs if s and s.strip()]
    if not cleaned:
        raise EncoderlabError("no encoder to benchmark", "pass e.g. --encoders efficientnet-lite0,efficientnet-lite1")
    repeated = sorted({s for s in cleaned if cleaned.count(s) > 1})
    if repeated:
        raise EncoderlabError(f"encoder(s) listed twice: {', '.join(repeated)}", "list each encoder once")
    for s in cleaned:
        parse_spec(s)  # UnknownNameError names the close matches
    return cleaned


def registered_modalities(spec: str) -> tuple[str, ...] | None:
    """What a named encoder encodes, from the registry (None for prefix specs: known only once loaded)."""
    from ..encoders import list_encoders, parse_spec

    if parse_spec(spec).prefix is not None:
        return None
    info = {i.name: i.modalities for i in list_encoders()}.get(spec.strip())
    return tuple(info) if info else None


def choose_modality(asked: str, encodes: Sequence[str], has_images: bool, has_texts: bool) -> tuple[str | None, str]:
    """``(modality, "")`` an encoder is benchmarked on, or ``(None, why)`` when it does not fit the data.

    ``auto`` prefers images (when both the encoder and the data have them), then texts.
    """
    if asked not in MODALITIES:
        raise EncoderlabError(f"unknown modality {asked!r}", f"use one of {', '.join(MODALITIES)}")
    data = [m for m, has in (("image", has_images), ("text", has_texts)) if has]
    for m in (["image", "text"] if asked == "auto" else [asked]):
        if m in encodes and m in data:
            return m, ""
    what = "+".join(encodes) or "nothing"
    if asked == "auto":
        return None, f"encodes {what}, the data has {' and '.join(m + 's' for m in data) or 'no images or texts'}"
    if asked not in encodes:
        return None, f"has no {asked} tower (encodes {what}; --modality {asked})"
    return None, f"the data has no {asked}s (--modality {asked})"


def speed_subset(dataset: Dataset, n: int) -> dict[str, list[str]]:
    """The fixed speed subset: the first ``n`` distinct image paths and first captions, in id order."""
    t = dataset.table.sort_values("id", kind="stable")
    images = list(dict.fromkeys(str(p) for p in t["image"] if p is not None))[:n]
    texts = list(dict.fromkeys(ts[0] for ts in t["texts"] if ts))[:n]
    return {"images": images, "texts": texts}


# ---- the child process: one encoder's costs ------------------------------------------------------------------


def encoder_params(encoder: Any) -> int:
    """Parameters of the loaded network: the trainable network where the encoder has one (for EfficientNet the
    published network, not its batchnorm-folded copy), else every public module attribute, each tensor once."""
    import torch

    modules = [encoder.trainable_model] if isinstance(getattr(type(encoder), "trainable_model", None), property) \
        else [v for k, v in vars(encoder).items() if not k.startswith("_") and isinstance(v, torch.nn.Module)]
    seen: dict[int, int] = {}
    for m in modules:
        seen.update({id(p): p.numel() for p in m.parameters()})
    for modality in encoder.modalities:  # an encoder built on another's features (an aligned pair) runs it too
        source = encoder.feature_source(modality)
        if source is not None:
            return sum(seen.values()) + encoder_params(source.base)
    return sum(seen.values())


def _warm_up(encoder: Any, modality: str, items: list[str]) -> float:
    """One small batch before timing: first calls allocate, export or compile (ONNX Runtime, TorchScript)."""
    from ..rungs.costs import encode_image_files

    t0 = time.perf_counter()
    if modality == "text":
        encoder.encode_texts(items)
    else:
        encode_image_files(encoder, items)
    return time.perf_counter() - t0


def _cold_extraction(encoder: Any, modality: str, items: list[str], batch: int, progress: bool) -> Any:
    """One extraction of ``items`` into a fresh temporary store (nothing cached), timed by the extraction loop."""
    import pandas as pd

    from ..extract.loop import extract_images, extract_texts

    with tempfile.TemporaryDirectory(prefix="encoderlab-bench-") as tmp:
        store = EmbeddingStore(Path(tmp) / "store")
        if modality == "text":
            return extract_texts(encoder, items, store, batch_size=batch, progress=progress)
        table = pd.DataFrame({"id": [str(i) for i in range(len(items))], "image": items, "texts": None,
                              "label": None, "split": None})
        return extract_images(encoder, Dataset(table, source="bench-speed-subset"), store, batch_size=batch,
                              progress=progress)


def measure_speed(job: dict[str, Any]) -> dict[str, Any]:
    """Load ``job["spec"]``, embed the speed subset into a temporary store; run in a fresh process (see module doc).

    The extraction runs ``job["repeats"]`` times, each into a new empty store, and the fastest counts: the least
    noisy estimate of what the work costs on a shared machine (as ``rungs.costs.ms_per_item``).
    """
    import torch

    from ..encoders import create_encoder
    from ..extract.loop import default_batch_size

    base_rss = peak_rss_mb()
    t0 = time.perf_counter()
    enc = create_encoder(job["spec"], device=job.get("device"), precision=job.get("precision"))
    out: dict[str, Any] = {"spec": job["spec"], "modalities": list(enc.modalities), "embed_dim": int(enc.embed_dim),
                           "params": encoder_params(enc), "load_seconds": time.perf_counter() - t0,
                           "device": str(enc.device), "precision": enc.precision, "base_rss_mb": base_rss,
                           "pid": os.getpid()}
    modality, why = choose_modality(job["modality"], enc.modalities, job["has_images"], job["has_texts"])
    if modality is None:
        return {**out, "skipped": why}
    items = job["images" if modality == "image" else "texts"]
    out["warmup_seconds"] = _warm_up(enc, modality, items[:WARMUP_ITEMS])
    batch = job.get("batch_size") or default_batch_size(enc, modality)
    runs = [_cold_extraction(enc, modality, items, batch, job.get("progress", False))
            for _ in range(max(1, int(job.get("repeats", 1))))]
    res = min(runs, key=lambda r: r.seconds)
    if res.encoded == 0:
        return {**out, "skipped": f"none of the {len(items)} speed items could be encoded ({len(res.skipped)} bad)"}
    out.update(modality=modality, speed_items=res.encoded, speed_seconds=res.seconds, speed_repeats=len(runs),
               batch_size=batch, items_per_s=res.encoded / res.seconds, ms_per_item=1000.0 * res.seconds / res.encoded,
               runtime=getattr(enc, "runtime", "torch"), peak_rss_mb=peak_rss_mb())
    if enc.device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(enc.device) / 2**20, 1)
    return out


def measure_in_child(job: dict[str, Any]) -> dict[str, Any]:
    """``measure_speed(job)`` in a fresh ``python -m encoderlab.ladder.bench_encoders`` process.

    Its stdout (libraries that print) goes to this process's stderr, so ``--json`` keeps one object on stdout; its
    stderr (progress bars) is inherited.
    """
    with tempfile.TemporaryDirectory(prefix="encoderlab-bench-job-") as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", "encoderlab.ladder.bench_encoders", str(job_path),
                               str(result_path)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        if proc.stdout:
            sys.stderr.write(proc.stdout.decode(errors="replace"))
        if proc.returncode == 0 and result_path.is_file():
            return json.loads(result_path.read_text())
    killed = " (killed by a signal: out of memory?)" if proc.returncode < 0 else ""
    return {"error": f"the measuring process exited with code {proc.returncode}{killed}",
            "fix": f"run `encoderlab embed --encoder {job['spec']} ...` alone to see why"}


def measure_or_error(job: dict[str, Any]) -> dict[str, Any]:
    """``measure_speed(job)``, or ``{"error", "fix"}`` when the encoder cannot be loaded or run."""
    try:
        return measure_speed(job)
    except EncoderlabError as e:
        return {"error": e.message, "fix": e.fix}
    except Exception as e:  # noqa: BLE001 - reported as this encoder's failure; the bench goes on
        return {"error": f"{type(e).__name__}: {e}", "fix": "rerun this encoder alone with --debug"}


def _child_main(argv: Sequence[str]) -> int:
    """Entry point of the child: read the job, write the measurement (or the error) as JSON."""
    job_path, result_path = argv
    result = measure_or_error(json.loads(Path(job_path).read_text()))
    Path(result_path).write_text(json.dumps(result, default=json_default))
    return 0


# ---- the bench -----------------------------------------------------------------------------------------------


def bench_encoders(
    specs: Sequence[str],
    dataset: Dataset,
    store: EmbeddingStore,
    *,
    modality: str = "auto",
    speed_items: int = SPEED_ITEMS,
    speed_repeats: int = SPEED_REPEATS,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
    out_dir: str | Path | None = None,
    measure: Measure = measure_in_child,
) -> EncoderBench:
    """Benchmark ``specs`` on ``dataset`` (see the module docstring); writes ``out_dir`` when given.

    ``measure`` runs one encoder's cost measurement (default: in a child process); tests may pass another.
    """
    specs = check_specs(specs)  # before any work
    choose_modality(modality, (), False, False)  # an unknown --modality fails here too
    if speed_items < 1 or speed_repeats < 1:
        raise EncoderlabError(f"speed_items and speed_repeats must be >= 1, got {speed_items}, {speed_repeats}",
                              "use e.g. 128 and 2")
    dataset = dataset.ensure_validation(seed=seed)
    if not dataset.classes:
        raise EncoderlabError(f"dataset {dataset.source!r} has no labels",
                              "bench-encoders fits a linear probe and kNN: use a labelled dataset")
    subset = speed_subset(dataset, speed_items)
    job = {"modality": modality, "has_images": dataset.has_images, "has_texts": dataset.has_texts,
           "device": device, "precision": precision, "batch_size": batch_size, "progress": progress,
           "repeats": speed_repeats, **subset}
    bench = EncoderBench(rows=[])
    with progress_bar(len(specs), "encoder", progress, desc=TASK) as bar:
        for spec in specs:
            bar.set_postfix(encoder=spec)
            row, results = _bench_one(spec, dataset, store, {**job, "spec": spec}, measure,
                                      n_boot=n_boot, seed=seed, progress=progress)
            bench.rows.append(row)
            if results is None:
                bench.skipped[spec] = row["why"]
            else:
                bench.results[spec] = results
            bar.update(1)
    bench.result = bench_result(bench, dataset, specs, job, speed_items=speed_items, n_boot=n_boot, seed=seed)
    if out_dir is not None:
        write_bench(bench, Path(out_dir))
    return bench


def _skipped_row(spec: str, why: str, speed: dict[str, Any] | None = None) -> dict[str, Any]:
    keep = ("modalities", "embed_dim", "params", "load_seconds") if speed else ()
    return {"encoder": spec, "status": "skipped", "why": why, **{k: speed[k] for k in keep if k in speed}}


def _bench_one(spec: str, dataset: Dataset, store: EmbeddingStore, job: dict[str, Any], measure: Measure, *,
               n_boot: int, seed: int, progress: bool) -> tuple[dict[str, Any], dict[str, RunResult] | None]:
    """One encoder's row: its costs (from ``measure``), then its rungs in this process; None results when skipped."""
    from ..encoders import create_encoder
    from ..rungs import RungInputs, RungOptions, create_rung

    known = registered_modalities(spec)
    if known is not None:  # a named encoder that cannot fit is skipped without loading it
        modality, why = choose_modality(job["modality"], known, dataset.has_images, dataset.has_texts)
        if modality is None:
            return _skipped_row(spec, why), None
    speed = measure(job)
    if "error" in speed:
        return _skipped_row(spec, speed["error"] + (f" ({speed['fix']})" if speed.get("fix") else "")), None
    if "skipped" in speed:
        return _skipped_row(spec, speed["skipped"], speed), None
    encoder = create_encoder(spec, device=job["device"], precision=job["precision"])
    # the encoder's own embedding ("joint"): what was timed is the whole encoder, so that is what is scored
    inputs = RungInputs(encoder, dataset, store, modality=speed["modality"], probe_features="joint",
                        progress=progress)
    options = RungOptions(shots=(), full=True, selection="val", n_boot=n_boot, seed=seed, progress=progress,
                          encoder_ms=speed["ms_per_item"])
    results = {name: create_rung(name).run(inputs, options) for name in RUNGS}
    test_items = int(results[RUNGS[0]].metrics.get("n_items", 0))
    del encoder, inputs
    gc.collect()  # the next encoder should not share this one's memory
    return _row(spec, speed, results, test_items), results


def _row(spec: str, speed: dict[str, Any], results: dict[str, RunResult], test_items: int) -> dict[str, Any]:
    row: dict[str, Any] = {"encoder": spec, "status": "ok", "why": ""}
    for k in ("modality", "embed_dim", "params", "load_seconds", "warmup_seconds", "speed_items", "speed_seconds",
              "speed_repeats", "items_per_s", "ms_per_item", "peak_rss_mb", "base_rss_mb", "peak_gpu_mb",
              "batch_size", "runtime", "device", "precision", "pid"):
        if k in speed:
            row[k] = speed[k]
    row["test_items"] = test_items
    for name, r in results.items():
        for k in ("top1", "top1_ci_low", "top1_ci_high", "balanced_accuracy", "macro_f1"):
            row[f"{name}_{k}"] = r.metrics.get(k)
        full = next((s for s in r.extra.get("settings", []) if s.get("setting") == "full"), {})
        row[f"{name}_knobs"] = full.get("knobs", {})
    return row


def bench_result(bench: EncoderBench, dataset: Dataset, specs: list[str], job: dict[str, Any], *, speed_items: int,
                 n_boot: int, seed: int) -> RunResult:
    """The bench as one result: metrics ``ENCODER/RUNG/name``, costs ``ENCODER/name``, the rows as its table."""
    metrics: dict[str, Any] = {}
    costs: dict[str, Any] = {}
    notes: list[str] = []
    for spec, results in bench.results.items():
        for name, r in results.items():
            metrics.update({f"{spec}/{name}/{k}": v for k, v in r.metrics.items()})
            notes += [n for n in r.config.get("notes", []) if n not in notes]
    for row in bench.rows:
        if row["status"] == "ok":
            costs.update({f"{row['encoder']}/{k}": row[k] for k in ("items_per_s", "ms_per_item", "peak_rss_mb",
                                                                     "load_seconds", "params", "embed_dim")})
    config = {"encoders": specs, "modality": job["modality"], "rungs": list(RUNGS), "speed_items": speed_items,
              "speed_repeats": job["repeats"],
              "batch_size": job["batch_size"], "device": job["device"] or "auto",
              "precision": job["precision"] or "auto", "n_boot": n_boot, "seed": seed, "protocol": PROTOCOL,
              "notes": notes}
    first = next(iter(bench.results), None)
    return RunResult(TASK, metrics, costs, config, data_provenance(dataset),
                     primary=f"{first}/{RUNGS[0]}/top1" if first else "",
                     extra={"table": bench.rows, "skipped_encoders": bench.skipped})


def write_bench(bench: EncoderBench, out: Path) -> Path:
    """Each rung's run under ``ENCODER/RUNG``, the plot, then ``results.json`` (last: its presence means done)."""
    assert bench.result is not None
    for spec, results in bench.results.items():
        for name, r in results.items():
            write_run(r, out / slug(spec) / name)
    bench.plot = plot_bench(bench.rows, out / PLOT_NAME)
    if bench.plot is not None:
        bench.result.extra["plot"] = PLOT_NAME
    else:
        bench.result.config["notes"].append("no plot: matplotlib is not installed (pip install matplotlib)")
    write_run(bench.result, out)
    return out


# ---- table and plot ------------------------------------------------------------------------------------------


def _ci(row: dict[str, Any], name: str) -> str:
    v = row.get(f"{name}_top1")
    if v is None:
        return "-"
    return f"{fmt(v)} [{fmt(row.get(f'{name}_top1_ci_low'))}, {fmt(row.get(f'{name}_top1_ci_high'))}]"


def _millions(n: Any) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{int(n):,}"


def format_bench(rows: Sequence[dict[str, Any]], notes: Sequence[str] = ()) -> str:
    """The bench table: one line per encoder, quality then cost; a skipped encoder says why."""
    header = ["encoder", "modality", "dim", "params", "linear top-1 [95% CI]", "kNN top-1 [95% CI]", "items/s",
              "ms/item", "peak RSS MB", "load s", "note"]
    lines = []
    for r in rows:
        ok = r["status"] == "ok"
        note = (f"{r.get('runtime', '')}, batch {r.get('batch_size')}" if ok else f"skipped: {r['why']}")
        lines.append([r["encoder"], r.get("modality", "-"), fmt(r.get("embed_dim")), _millions(r.get("params")),
                      _ci(r, "linear"), _ci(r, "knn"), fmt(r.get("items_per_s"), 1), fmt(r.get("ms_per_item"), 2),
                      fmt(r.get("peak_rss_mb"), 0), fmt(r.get("load_seconds"), 2), note])
    out = [format_table(lines, header)]
    measured = [r for r in rows if r["status"] == "ok"]
    if measured:
        out.append(f"test items: {measured[0]['test_items']}; speed: {measured[0].get('speed_items')} items per "
                   "encoder, cold temporary store, one child process each (peak RSS is that process's)")
    out += [f"note: {n}" for n in notes]
    return "\n".join(out)


def short_name(spec: str) -> str:
    """A plot label: the spec, with a directory or hub path cut to its last part (``hf-vision:/a/b/vit`` -> ``vit``)."""
    prefix, sep, target = spec.partition(":")
    if not sep or "/" not in target:
        return spec
    return f"{prefix}:{Path(target.split('?')[0].rstrip('/')).name}"


def plot_bench(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Top-1 with its 95% CI against ms/item, marker area ~ parameters, one point per encoder and rung (PNG).

    Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch); None without matplotlib.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    measured = [r for r in rows if r["status"] == "ok"]
    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    biggest = max([r.get("params") or 1 for r in measured] or [1])
    lows = []
    for name, marker, colour in zip(RUNGS, ("o", "s"), ("tab:blue", "tab:orange")):
        pts = [r for r in measured if r.get(f"{name}_top1") is not None]
        x, y = [r["ms_per_item"] for r in pts], [r[f"{name}_top1"] for r in pts]
        low = [r.get(f"{name}_top1_ci_low", v) for v, r in zip(y, pts)]
        high = [r.get(f"{name}_top1_ci_high", v) for v, r in zip(y, pts)]
        lows += low
        ax.errorbar(x, y, yerr=[[v - lo for v, lo in zip(y, low)], [hi - v for v, hi in zip(y, high)]], fmt="none",
                    ecolor=colour, alpha=0.6, capsize=3)
        ax.scatter(x, y, s=[40 + 360 * (r.get("params") or 1) / biggest for r in pts], marker=marker, c=colour,
                   alpha=0.7, edgecolors="black")
        ax.scatter([], [], s=50, marker=marker, c=colour, edgecolors="black",
                   label={"linear": "linear probe", "knn": "kNN"}[name])  # legend entries of one size
    for r in measured:
        top = max(v for v in (r.get(f"{n}_top1") for n in RUNGS) if v is not None)
        ax.annotate(short_name(r["encoder"]), (r["ms_per_item"], top), textcoords="offset points", xytext=(8, 8),
                    fontsize=8)
    if measured and max(r["ms_per_item"] for r in measured) > 10 * min(r["ms_per_item"] for r in measured):
        ax.set_xscale("log")
    ax.margins(x=0.25, y=0.1)
    ax.set_ylim(max(0.0, min(lows or [0.0]) - 0.05), 1.02)
    ax.set_xlabel("ms per item (extraction into a cold store)")
    ax.set_ylabel("test top-1, 95% CI")
    ax.set_title("quality vs speed (marker area ~ parameters)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
