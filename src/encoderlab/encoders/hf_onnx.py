"""ONNX Runtime for the image and text towers of ``hf:`` dual encoders (CLIP, SigLIP, ...) on CPU fp32.

Why: on this shared 2-core machine PyTorch eager runs a ViT-B/32 CLIP image tower at ~4 img/s under load and ONNX
Runtime the same graph at ~10 (its worker threads do not spin; PyTorch's OpenMP threads do, and lose their slices
to other processes); on a quiet machine both reach ~17-19. Numbers: ``bench/results/extract_hf.json``. The
embeddings agree with PyTorch to ~1e-7 on L2-normalised outputs, so the encoder's fingerprint does not change.

Each exported graph is the exact call ``HFDualEncoder`` makes (``get_image_features`` / ``get_text_features``, plus
the family's own first-token pooling), exported once per (weights digest, model config, torch / onnx /
transformers versions) into ``$ENCODERLAB_HOME/compiled/`` with an atomic write; text graphs have dynamic batch and
sequence axes, so per-batch padding trimming still applies. Whenever a graph is loaded it is checked against
PyTorch on probe inputs: a damaged or stale file is re-exported with a warning, and a model that cannot be exported
(or disagrees) runs in PyTorch with a warning instead of failing. ``ENCODERLAB_ONNXRUNTIME=0`` turns it off. The
ORT transformer fusions (``onnxruntime.transformers.optimizer``) are not applied: measured, they were not faster.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import EncoderlabError
from ..hashing import json_digest
from .compiled_cache import write_graph
from .hf_loading import output_tensor
from .onnx_runtime import OPSET, compiled_path, cpu_session, onnxruntime_wanted

#: exports done in this process, by compiled file name: lets tests tell a cache hit from a re-export
EXPORTS: Counter[str] = Counter()
#: largest max |difference| between ONNX Runtime and PyTorch on L2-normalised probe embeddings that counts as equal
PROBE_TOLERANCE = 1e-5
#: texts the text graph is exported with and checked on: two lengths (padding) and a batch of one (no padding)
PROBE_TEXTS = (["a photo of a cat", "the stock market report on a rainy monday morning in spring"], ["a dog"])

#: opt-in dynamic int8 for the image tower (ONNX Runtime ``quantize_dynamic``, per-channel int8 weights). Measured
#: on the random ViT-B/32 CLIP: ~2x fp32 ORT, cosine to fp32 mean 0.99984 / min 0.99981 (real weights may differ)
INT8_ENV = "ENCODERLAB_INT8"
#: an int8 graph whose probe embeddings are further than this from fp32 (cosine) is treated as broken
INT8_MIN_COSINE = 0.99

Inputs = Mapping[str, torch.Tensor]


def int8_wanted() -> bool:
    return os.environ.get(INT8_ENV, "").strip().lower() in ("1", "true", "yes")


class TowerFeatures(torch.nn.Module):
    """Named inputs -> one embedding per row: the call ``HFDualEncoder`` makes, as one exportable module."""

    def __init__(self, model: torch.nn.Module, tower: str, names: list[str], first_token: bool) -> None:
        super().__init__()
        self.model = model
        self.tower = tower
        self.names = names
        self.first_token = first_token

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.names, inputs))
        features = self.model.get_image_features if self.tower == "image" else self.model.get_text_features
        x = output_tensor(features(**kwargs))
        return x[:, 0] if self.first_token else x


class OnnxTower:
    """A callable ``{name: Tensor} -> Tensor[B, D]`` backed by an ONNX Runtime CPU session."""

    def __init__(self, path: Path, threads: int) -> None:
        self.path = path
        self.session = cpu_session(path, threads)
        inputs = self.session.get_inputs()
        self.names = [i.name for i in inputs]
        self.dtypes = {i.name: torch.float32 if i.type == "tensor(float)" else torch.int64 for i in inputs}

    def __call__(self, inputs: Inputs) -> torch.Tensor:
        feed = {n: np.ascontiguousarray(inputs[n].detach().to("cpu", self.dtypes[n]).numpy()) for n in self.names}
        return torch.from_numpy(self.session.run(None, feed)[0])


def parameter_version(model: torch.nn.Module) -> int | None:
    """Sum of the parameters' in-place version counters: changes whenever an optimizer or ``load_state_dict``
    writes a weight, so an export of older weights is never used by mistake (cheap: no tensor data is read).
    None when a parameter has no counter (an inference-mode tensor): then nothing can be tracked."""
    try:
        return sum(p._version for p in model.parameters())
    except RuntimeError:
        return None


def export_key(weights_digest: str, model: torch.nn.Module, tower: str) -> str:
    """What the exported graph depends on besides torch's version (already in the file name): the weights, the
    model config (shapes, attention implementation) and the exporter / transformers versions."""
    import onnx
    import transformers

    config = model.config.to_dict() if hasattr(model, "config") else {}
    return json_digest({"weights": weights_digest, "config": config, "tower": tower, "onnx": onnx.__version__,
                        "transformers": transformers.__version__})


def export_tower(module: TowerFeatures, example: Inputs, path: Path, dynamic: dict[int, str]) -> None:
    """Export ``module`` on ``example`` (``dynamic``: the axes every input may vary on) to ``path``, atomically."""
    buffer = io.BytesIO()
    names = list(module.names)
    axes: dict[str, dict[int, str]] = {n: dict(dynamic) for n in names} | {"embeddings": {0: "batch"}}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), tuple(example[n].cpu() for n in names), buffer, dynamo=False,
                          input_names=names, output_names=["embeddings"], dynamic_axes=axes, opset_version=OPSET)
    write_graph(path, buffer.getvalue())
    EXPORTS[path.name] += 1


def probe_difference(network: OnnxTower, module: TowerFeatures, probes: list[Inputs]) -> float:
    """Max |ORT - PyTorch| over L2-normalised embeddings of the probes: the equality the fingerprint relies on."""
    unit = torch.nn.functional.normalize
    worst = 0.0
    for probe in probes:
        with torch.inference_mode():
            ref = module(*(probe[n] for n in module.names)).float()
        got = network(probe).float()
        if got.shape != ref.shape or not bool(torch.isfinite(got).all()):
            return float("inf")
        worst = max(worst, float((unit(got, dim=-1) - unit(ref, dim=-1)).abs().max()))
    return worst


def _checked(path: Path, module: TowerFeatures, probes: list[Inputs], threads: int) -> tuple[Any, str]:
    """(network, "") when ``path`` loads and matches PyTorch on the probes, else (None, why not)."""
    try:
        network = OnnxTower(path, threads)
        diff = probe_difference(network, module, probes)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        return None, f"unreadable ({type(e).__name__})"
    if diff > PROBE_TOLERANCE:
        return None, f"different from PyTorch (max difference {diff:.2e})"
    return network, ""


def load_network(module: TowerFeatures, probes: list[Inputs], name: str, key: str, dynamic: dict[int, str],
                 threads: int) -> OnnxTower | None:
    """The cached ONNX Runtime network for ``module``, exported first when missing; a cached file that is
    unreadable or disagrees with PyTorch is re-exported (with a warning). None (with a warning) when the export
    fails or the fresh export still disagrees: the caller then stays on PyTorch."""
    path = compiled_path(name, key)
    if path.exists():
        network, why = _checked(path, module, probes, threads)
        if network is not None:
            return network
        warnings.warn(f"cached ONNX export {path} is {why}; exporting it again", stacklevel=4)
    try:
        export_tower(module, probes[0], path, dynamic)
    except EncoderlabError:  # the user's setting (e.g. a bad $ENCODERLAB_COMPILED_MAX): no silent fallback
        raise
    except Exception as e:  # noqa: BLE001 - some architectures do not export: PyTorch is always correct
        warnings.warn(f"ONNX export of {name} failed ({type(e).__name__}: {str(e)[:200]}); using PyTorch",
                      stacklevel=4)
        return None
    network, why = _checked(path, module, probes, threads)
    if network is None:
        warnings.warn(f"ONNX export of {name} is {why}; using PyTorch", stacklevel=4)
    return network


def quantized_network(fp32: OnnxTower, module: TowerFeatures, probes: list[Inputs], threads: int) -> OnnxTower:
    """The dynamic-int8 version of an exported graph (cached beside it, written atomically), checked to be close to
    PyTorch in cosine. Errors instead of falling back: an int8 encoder's fingerprint promises int8 embeddings."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = fp32.path.with_name(fp32.path.name.replace(".onnx", "-int8dyn.onnx"))
    for attempt in range(2):
        if attempt or not path.exists():
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(str(fp32.path), str(Path(tmp) / "q.onnx"), weight_type=QuantType.QInt8,
                                 per_channel=True)
                write_graph(path, (Path(tmp) / "q.onnx").read_bytes())
            EXPORTS[path.name] += 1
        try:
            network = OnnxTower(path, threads)
            cosine = min_probe_cosine(network, module, probes)
        except Exception:  # noqa: BLE001 - a damaged cached file: quantize again
            cosine = -1.0
        if cosine >= INT8_MIN_COSINE:
            return network
    raise EncoderlabError(f"the int8 graph {path} does not reproduce the model (probe cosine {cosine:.4f})",
                          f"unset {INT8_ENV} to use the fp32 graph")


def min_probe_cosine(network: OnnxTower, module: TowerFeatures, probes: list[Inputs]) -> float:
    with torch.inference_mode():
        pairs = [(network(p).float(), module(*(p[n] for n in module.names)).float()) for p in probes]
    return min(float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min()) for a, b in pairs)


def image_probes(shape: tuple[int, ...]) -> list[Inputs]:
    """A fixed pseudo-random batch of two in the range of normalised pixels (the same every load)."""
    generator = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn((2, *shape), generator=generator)}]


class TowerRuntime:
    """Per-encoder state of one tower's ONNX path: built on first use, dropped when the weights change."""

    def __init__(self, tower: str) -> None:
        self.tower = tower
        self.paused = False
        self.reset()

    def reset(self) -> None:
        self.network: OnnxTower | None = None
        self.signature: tuple[Any, ...] | None = None
        self.version: int | None = None
        self.tried = False

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """PyTorch only for the block (the load-time sanity check should not export a tower nobody asked for)."""
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def _signature(self, inputs: Inputs) -> tuple[Any, ...]:
        """What must match the export: input names, and for images the fixed [C, H, W]."""
        if self.tower == "image":
            return ("pixel_values", tuple(inputs["pixel_values"].shape[1:]))
        return tuple(sorted(inputs))

    def network_for(self, encoder: Any, inputs: Inputs) -> OnnxTower | None:
        """The ORT network to run ``inputs`` with, or None for PyTorch (off, training, other input layout)."""
        model = encoder.model
        if self.paused or model.training or not onnxruntime_wanted(encoder.device, encoder.precision):
            return None
        if self.tried and self.version != parameter_version(model):
            # weights were written in place since the export (and since the digest was taken): both are stale
            getattr(encoder, "_weights_changed", self.reset)()
        if not self.tried:
            encoder.fingerprint_parts()  # a digest older than in-place writes is renewed before it keys the export
            self.tried = True
            self.version = parameter_version(model)
            self.signature = self._signature(inputs)
            self.network = self._build(encoder, inputs)
        if self.network is None or self._signature(inputs) != self.signature:
            return None
        return self.network

    def _build(self, encoder: Any, inputs: Inputs) -> OnnxTower | None:
        if self.tower == "image":
            probes = image_probes(tuple(inputs["pixel_values"].shape[1:]))
            dynamic = {0: "batch"}
        else:
            probes = [dict(encoder.tokenize(texts)) for texts in PROBE_TEXTS]
            dynamic = {0: "batch", 1: "sequence"}
        names = sorted(probes[0])
        module = TowerFeatures(encoder.model, self.tower, names, encoder.family.first_token).eval()
        key = export_key(encoder.fingerprint_parts()["weights"], encoder.model, self.tower)
        threads = torch.get_num_threads()
        network = load_network(module, probes, f"hf-{encoder.model_type}-{self.tower}", key, dynamic, threads)
        if self.tower == "image" and getattr(encoder, "int8", False):
            if network is None:
                raise EncoderlabError(f"{INT8_ENV}=1 needs the ONNX export of {encoder.spec!r}, which failed",
                                      f"unset {INT8_ENV}")
            network = quantized_network(network, module, probes, threads)
        return network
