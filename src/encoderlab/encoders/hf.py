"""Hugging Face transformers adapters: ``hf:`` dual encoders, ``hf-vision:`` backbones, ``hf-text:`` text encoders.

Everything loads through ``from_pretrained`` (config, weights, tokenizer, image processor), so a hub id and a
directory written by ``save_pretrained`` behave the same. Preprocessing is the model's own image processor (PIL
backend, the reference implementation) and its own tokenizer, with each family's padding rule: CLIP and ALIGN trim
padding to the longest text in a batch, SigLIP pads to ``max_length`` because its text tower was trained that way.

Options ride on the spec after ``?``: ``hf-vision:facebook/dinov2-small?pool=mean``,
``hf-text:BAAI/bge-small-en-v1.5?pool=cls&max_length=256``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import EncoderlabError
from ..hashing import json_digest
from ..normalize import normalize_rows
from ..specs import parse_options, split_query
from .base import Encoder, ScoreKind, inference_context, state_dict_digest
from .registry import register_prefix
from .trainable import ModelBackedTrainable, TowerLayout, TowerModule

# ---- family tables -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DualFamily:
    """How one dual-encoder family scores and tokenizes."""

    score_kind: ScoreKind
    padding: Literal["longest", "max_length"]
    #: SigLIP's text tower was trained on max_length-padded ids with no attention mask (big_vision, open_clip);
    #: passing a mask changes its last-token pooled output.
    use_attention_mask: bool = True
    #: truncation length used by the family's own processor, when it overrides the tokenizer's
    max_length: int | None = None


DUAL_FAMILIES: dict[str, DualFamily] = {
    "clip": DualFamily(score_kind="softmax", padding="longest"),
    "siglip": DualFamily(score_kind="sigmoid", padding="max_length", use_attention_mask=False),
    "align": DualFamily(score_kind="softmax", padding="longest", max_length=64),  # AlignProcessor's max_length
}


def _layout(embeddings: tuple[str, ...], blocks: str, *after: tuple[str, tuple[str, ...]]) -> TowerLayout:
    return TowerLayout(before=(("embeddings", embeddings),), blocks=blocks, after=after)


#: where each family's towers live in the transformers model, input -> output (the trainable contract's groups)
DUAL_LAYOUTS: dict[str, dict[str, TowerLayout]] = {
    "clip": {
        "image": _layout(("vision_model.embeddings", "vision_model.pre_layrnorm"), "vision_model.encoder.layers",
                         ("final_norm", ("vision_model.post_layernorm",)), ("projection", ("visual_projection",))),
        "text": _layout(("text_model.embeddings",), "text_model.encoder.layers",
                        ("final_norm", ("text_model.final_layer_norm",)), ("projection", ("text_projection",))),
    },
    "siglip": {  # SigLIP's "head"s are its projections: attention pooling (image), a linear layer (text)
        "image": _layout(("vision_model.embeddings",), "vision_model.encoder.layers",
                         ("final_norm", ("vision_model.post_layernorm",)), ("projection", ("vision_model.head",))),
        "text": _layout(("text_model.embeddings",), "text_model.encoder.layers",
                        ("final_norm", ("text_model.final_layer_norm",)), ("projection", ("text_model.head",))),
    },
    "align": {  # EfficientNet image features are pooled without a projection; BERT's pooler is unused
        "image": _layout(("vision_model.embeddings",), "vision_model.encoder.blocks"),
        "text": _layout(("text_model.embeddings",), "text_model.encoder.layer",
                        ("pooler", ("text_model.pooler",)), ("projection", ("text_projection",))),
    },
}

#: model types whose image input is not a fixed-size [C,H,W] tensor, with what to use instead
UNSUPPORTED_DUAL: dict[str, str] = {
    "siglip2": "NaFlex SigLIP 2 (model_type siglip2) takes variable-size patch sequences, which this adapter does "
    "not support; the fixed-resolution SigLIP 2 checkpoints (e.g. google/siglip2-base-patch16-224) load as "
    "model_type siglip and work with hf:",
}

#: two unrelated texts encoded at load: a model that embeds them identically has a broken tokenizer
SANITY_TEXTS = ("a photo of a cat", "the stock market report")
#: above this the two texts count as one embedding. Not 0.9999: tiny random towers pooling the CLS token reach
#: 1 - 6e-6 (their residual stream is mostly the CLS embedding), while real models keep unrelated texts far apart
SAME_TEXT_COSINE = 1 - 1e-6

PoolMode = Literal["pooler", "cls", "mean"]
VISION_POOLS: tuple[str, ...] = ("pooler", "cls", "mean")
TEXT_POOLS: tuple[str, ...] = ("mean", "cls")

#: default image pooling per ``model_type``: "pooler" where the family's pooler_output is its trained global
#: descriptor, "cls" where the classifier reads the CLS token but the pooler is an (often untrained) tanh layer,
#: "mean" (patch tokens without CLS/registers, or spatial mean for CNN maps) for everything else.
VISION_POOLING: dict[str, PoolMode] = {
    "vit": "cls",  # ViTForImageClassification and DINO read the final-norm CLS; ViTModel's tanh pooler is untrained
    "deit": "cls",  # same structure as ViT
    "vit_mae": "mean",  # MAE's CLS is not trained for a global representation; its papers mean-pool patches
    "dinov2": "pooler",  # final-norm CLS token, DINOv2's global descriptor
    "dinov2_with_registers": "pooler",
    "beit": "pooler",  # layer-normed mean of patch tokens (use_mean_pooling)
    "data2vec-vision": "pooler",
    "clip_vision_model": "pooler",  # post-layernorm CLS (unprojected)
    "siglip_vision_model": "pooler",  # attention-pooling head
    "swin": "pooler",  # average of final-norm tokens
    "swinv2": "pooler",
    "resnet": "pooler",  # global average pool of the last stage
    "convnext": "pooler",  # layer-normed global average pool
    "convnextv2": "pooler",
    "regnet": "pooler",
    "bit": "pooler",
    "efficientnet": "pooler",
    "mobilenet_v2": "pooler",
}

#: submodule prefixes that only feed ``pooler_output``: when a checkpoint lacks them and we do not pool with them,
#: their random initialization must not reach the fingerprint
_POOLER_PREFIXES = ("pooler.",)

# ---- spec options and loading ------------------------------------------------------------------------------


def split_target(target: str, allowed: dict[str, tuple[str, ...] | type]) -> tuple[str, dict[str, Any]]:
    """``"id?pool=mean&max_length=128"`` -> ``("id", {"pool": "mean", "max_length": 128})``, validated."""
    model_id, query, _ = split_query(target)
    options = parse_options(query, allowed, spec=target, what="encoder")
    if not model_id:
        raise EncoderlabError(f"encoder spec {target!r} names no model", "e.g. hf:openai/clip-vit-base-patch32")
    return model_id, options


def hub_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning "could not fetch from the hub": OSError plus the HTTP libraries' own errors.

    Only libraries already imported are consulted: an error can only come from one that was loaded.
    """
    kinds: list[type[BaseException]] = [OSError]
    hub_errors = sys.modules.get("huggingface_hub.errors")
    if hub_errors is not None and hasattr(hub_errors, "HfHubHTTPError"):
        kinds.append(hub_errors.HfHubHTTPError)
    for module, name in (("requests", "RequestException"), ("httpx", "HTTPError"), ("httpx2", "HTTPError")):
        error = getattr(sys.modules.get(module), name, None)
        if isinstance(error, type) and issubclass(error, BaseException):
            kinds.append(error)
    return tuple(kinds)


def _looks_like_path(model_id: str) -> bool:
    return os.path.isabs(model_id) or model_id.startswith((".", "~")) or os.path.exists(model_id)


def _local_dir(model_id: str) -> Path | None:
    """The directory ``model_id`` names, or None for a hub id."""
    path = Path(os.path.expanduser(model_id))
    return path if path.is_dir() else None


# ---- fail fast offline ------------------------------------------------------------------------------------

#: seconds the hub probe waits; without it an unreachable hub costs ~25 s of retries per file (measured)
HUB_PROBE_TIMEOUT = 2.5
_hub_reachable: bool | None = None  # probed once per process


def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers at all: one HEAD request with a short timeout, remembered.

    Any HTTP answer counts as reachable (an unknown model is then reported by the hub itself); only a failure to
    connect counts as offline. It goes through huggingface_hub's own session, so its proxy and CA settings apply.
    """
    global _hub_reachable
    if _hub_reachable is None:
        from huggingface_hub import constants, get_session

        try:
            get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT)
            _hub_reachable = True
        except Exception:  # noqa: BLE001 - any failure to connect means "offline" here
            _hub_reachable = False
    return _hub_reachable


def _hub_offline() -> bool:
    """True when hub ids must load from the local cache only: HF_HUB_OFFLINE is set, or the probe failed."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or not hub_reachable()


def _source_kwargs(model_id: str) -> dict[str, Any]:
    """``local_files_only=True`` for a hub id while the hub is unreachable: the cache answers at once instead."""
    if _local_dir(model_id) is not None or _looks_like_path(model_id):
        return {}
    return {"local_files_only": True} if _hub_offline() else {}


# ---- quiet loading ----------------------------------------------------------------------------------------

#: set to 1 to see transformers' and huggingface_hub's own warnings and progress bars while a model loads
VERBOSE_ENV = "ENCODERLAB_HF_VERBOSE"


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers' and huggingface_hub's progress bars ("Loading weights"), warnings and retry notices.

    They would print through ``--no-progress`` / ``--json`` and bury the one line that matters; our own bars are
    unaffected. Scoped: the previous settings come back afterwards. ``ENCODERLAB_HF_VERBOSE=1`` or an explicit
    ``TRANSFORMERS_VERBOSITY`` keeps the libraries' own output.
    """
    if os.environ.get(VERBOSE_ENV, "").strip() not in ("", "0"):
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as tf_logging

    keep_level = "TRANSFORMERS_VERBOSITY" in os.environ
    tf_level, hub_level = tf_logging.get_verbosity(), hub_logging.get_verbosity()
    tf_bars, hub_bars_off = tf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    try:
        if not keep_level:
            tf_logging.set_verbosity_error()
        hub_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()
        disable_progress_bars()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"(transformers|huggingface_hub)(\.|$)")
            yield
    finally:
        if not keep_level:
            tf_logging.set_verbosity(tf_level)
        hub_logging.set_verbosity(hub_level)
        if tf_bars:
            tf_logging.enable_progress_bar()
        if not hub_bars_off:
            enable_progress_bars()


# ---- what a model directory must hold -----------------------------------------------------------------

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
#: what defines a tokenizer's vocabulary; ``tokenizer_config.json`` alone does not (transformers then builds an
#: empty tokenizer that maps every text to unknown tokens, so all texts get one embedding)
TOKENIZER_FILES = ("tokenizer.json, vocab.json + merges.txt (BPE, CLIP), vocab.txt (WordPiece, BERT) or a "
                   "SentencePiece .model file such as spiece.model (SigLIP, T5)")
_SAVE_HINT = "save it again from the original with save_pretrained() (model, tokenizer and image processor)"


def check_model_dir(path: Path, what: Literal["config", "weights", "image processor", "tokenizer"]) -> None:
    """Refuse a directory that lacks the files ``what`` loads from, naming them (before transformers guesses)."""
    names = {p.name for p in path.iterdir()}
    if what == "config" and "config.json" not in names:
        raise EncoderlabError(f"{str(path)!r} has no config.json: not a transformers model directory",
                              "point the spec at a directory written by transformers' save_pretrained()")
    if what == "weights" and not (names & set(WEIGHT_FILES) or any(n.endswith(".safetensors") for n in names)):
        raise EncoderlabError(f"{str(path)!r} has no weights file (model.safetensors or pytorch_model.bin)",
                              _SAVE_HINT)
    if what == "image processor" and not names & {"preprocessor_config.json", "processor_config.json"}:
        raise EncoderlabError(f"{str(path)!r} has no preprocessor_config.json (how images are resized and normalized)",
                              "save the image processor into it: AutoImageProcessor.from_pretrained(ORIGINAL)"
                              ".save_pretrained(DIR)")
    if what == "tokenizer":
        bpe = {"vocab.json", "merges.txt"}
        sentencepiece = any(n.endswith(".model") for n in names)
        if "tokenizer.json" in names or bpe <= names or "vocab.txt" in names or sentencepiece:
            return
        half = bpe & names
        found = f"it has {next(iter(half))} but not {next(iter(bpe - half))}" if half else (
            "tokenizer_config.json alone does not define a vocabulary" if "tokenizer_config.json" in names else
            "it has no tokenizer files")
        raise EncoderlabError(
            f"{str(path)!r} has no tokenizer vocabulary ({found}; wanted {TOKENIZER_FILES}): without it every "
            "text would get the same embedding",
            "save the tokenizer into it: AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained(DIR)",
        )


def load_error(model_id: str, what: str, err: BaseException) -> EncoderlabError:
    """The one message for "from_pretrained could not find it": names the model and how to load from disk."""
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if os.path.isdir(os.path.expanduser(model_id)):
        return EncoderlabError(f"could not load the {what} from directory {model_id!r}: {detail}", _SAVE_HINT)
    if _looks_like_path(model_id):
        return EncoderlabError(f"model directory {model_id!r} does not exist", "pass hf:/path/to/saved/model")
    fix = ("check the id and the network; or, where the hub is reachable, load it once with transformers, "
           "save_pretrained('/path/to/dir') (model, tokenizer and image processor) and use hf:/path/to/dir")
    if _hub_reachable is False:  # probed: no network, so say that rather than "no such model"
        return EncoderlabError(
            f"could not load the {what} of {model_id!r}: the Hugging Face hub could not be reached (no network "
            "connection to it) and the model is not in the local cache", fix)
    return EncoderlabError(
        f"could not load the {what} of {model_id!r}: the Hugging Face hub could not be reached or has no model "
        f"with that id, and it is not in the local cache ({detail})", fix)


def damaged_weights_error(model_id: str, err: BaseException) -> EncoderlabError:
    """A weights file that does not parse: name it (the first one whose header fails) and how to get it back."""
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    directory = _local_dir(model_id)
    if directory is not None:
        files = sorted(directory.glob("*.safetensors"))
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "model.safetensors")
        files = [Path(cached)] if isinstance(cached, str) else []
    bad = next((f for f in files if not safetensors_readable(f)), None)
    name = str(bad) if bad is not None else f"of {model_id!r}"
    fix = ("download or save the model again (save_pretrained() from the original)"
           if directory is not None else
           f"download it again (huggingface-cli download {model_id} --force-download)")
    return EncoderlabError(f"weights file {name} is truncated or damaged ({detail})", fix)


def safetensors_readable(path: Path) -> bool:
    """True when ``path``'s safetensors header parses and covers the file (cheap: the tensors are not read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return True
    except Exception:  # noqa: BLE001 - any failure to open means damaged here
        return False


def from_pretrained(loader: Callable[..., Any], model_id: str, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained``, quietly, cache-only while offline; failures become one clear EncoderlabError."""
    from safetensors import SafetensorError

    try:
        with quiet_loading():
            return loader.from_pretrained(os.path.expanduser(model_id), **_source_kwargs(model_id), **kwargs)
    except SafetensorError as e:
        raise damaged_weights_error(model_id, e) from e
    except hub_errors() as e:
        raise load_error(model_id, what, e) from e


def load_config(model_id: str) -> Any:
    from transformers import AutoConfig

    directory = _local_dir(model_id)
    if directory is not None:
        check_model_dir(directory, "config")
    try:
        return from_pretrained(AutoConfig, model_id, "config")
    except (ValueError, KeyError) as e:  # no or unknown model_type: a foreign config or too old a transformers
        raise _config_error(model_id, directory, e) from e


def _config_error(model_id: str, directory: Path | None, err: BaseException) -> EncoderlabError:
    detail = str(err).splitlines()[0]
    model_type = None
    if directory is not None:
        try:
            model_type = json.loads((directory / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None
        if not model_type:
            return EncoderlabError(f"{str(directory / 'config.json')!r} names no model_type: not a transformers "
                                   "model config", _SAVE_HINT)
    import transformers

    what = f"model_type {model_type!r}" if model_type else "the config"
    return EncoderlabError(
        f"transformers {transformers.__version__} cannot read {what} of {model_id!r}: {detail}",
        "upgrade transformers; models that need trust_remote_code are not supported",
    )


def load_model(model_id: str) -> tuple[torch.nn.Module, list[str]]:
    """The AutoModel for ``model_id`` in eval mode, and the state-dict keys the checkpoint did not provide."""
    from transformers import AutoModel

    directory = _local_dir(model_id)
    if directory is not None:
        check_model_dir(directory, "weights")
    model, info = from_pretrained(AutoModel, model_id, "weights", output_loading_info=True)
    return model.eval(), list(info.get("missing_keys", []))


def load_image_processor(model_id: str) -> Any:
    """The model's own image processor, PIL backend: the reference implementation, and torchvision-free."""
    import transformers
    from transformers import AutoImageProcessor

    directory = _local_dir(model_id)
    if directory is not None:
        check_model_dir(directory, "image processor")
    major = int(transformers.__version__.split(".")[0])
    kwargs = {"backend": "pil"} if major >= 5 else {"use_fast": False}
    return from_pretrained(AutoImageProcessor, model_id, "image processor", **kwargs)


def load_tokenizer(model_id: str) -> Any:
    """The model's tokenizer; a directory without vocabulary files is refused (it would make every text equal)."""
    from transformers import AutoTokenizer

    directory = _local_dir(model_id)
    if directory is not None:
        check_model_dir(directory, "tokenizer")
    return from_pretrained(AutoTokenizer, model_id, "tokenizer")


def _as_tensor(out: Any) -> torch.Tensor:
    """transformers 5 returns an output object whose ``pooler_output`` is the embedding; 4.x a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find an embedding tensor in model output of type {type(out).__name__}")


# ---- preprocessing ---------------------------------------------------------------------------------------


class HFImageTransform:
    """Picklable ``PIL.Image -> Tensor[C,H,W]`` running the model's own image processor on one image."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Any) -> torch.Tensor:
        if getattr(image, "mode", "RGB") != "RGB":
            image = image.convert("RGB")
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def config(self) -> dict[str, Any]:
        cfg = {k: v for k, v in self.processor.to_dict().items() if not k.startswith("_")}
        cfg["class"] = type(self.processor).__name__  # PIL and torchvision backends differ slightly
        return cfg


def _text_max_length(tokenizer: Any, text_config: Any, override: int | None = None) -> int | None:
    """Truncation length: the smallest of the override, the tokenizer's limit and the position table."""
    limits = [override] if override else []
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:  # unset limits are a huge sentinel
        limits.append(tok_max)
    pos = getattr(text_config, "max_position_embeddings", None)
    if isinstance(pos, int) and pos > 0:
        limits.append(pos)
    return min(limits) if limits else None


class TextTokenization:
    """One family's tokenization rule: padding, truncation length, which inputs reach the model."""

    def __init__(self, tokenizer: Any, padding: str, max_length: int | None, use_attention_mask: bool) -> None:
        if padding == "max_length" and max_length is None:
            raise EncoderlabError("padding to max_length needs a maximum length", "set max_length in the spec")
        if tokenizer.pad_token is None:  # decoder-style tokenizers: padding is masked out, any id will do
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.tokenizer = tokenizer
        self.padding = padding
        self.max_length = max_length
        self.use_attention_mask = use_attention_mask

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(texts),
            padding=self.padding,
            truncation=self.max_length is not None,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch = dict(batch)
        if not self.use_attention_mask:
            batch.pop("attention_mask", None)
        return batch

    def config(self) -> dict[str, Any]:
        tok = self.tokenizer
        vocab = sorted(tok.get_vocab().items())
        return {
            "class": type(tok).__name__,
            "vocab": json_digest(vocab),
            "do_lower_case": getattr(tok, "do_lower_case", None),
            "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
            "padding": self.padding,
            "max_length": self.max_length,
            "attention_mask": self.use_attention_mask,
        }


# ---- encoders ----------------------------------------------------------------------------------------------


class _HFEncoder(Encoder):
    """Shared plumbing: device placement, forward under inference_context, cached fingerprint parts."""

    adapter: str = "hf"

    def __init__(self, model_id: str, model: torch.nn.Module, device: torch.device, precision: str) -> None:
        self.spec = model_id
        self.model_id = model_id
        self.device = device
        self.precision = precision
        self.model = model.to(device).eval()
        self.model_type: str = getattr(model.config, "model_type", type(model).__name__)
        self._digest_exclude: list[str] = []
        self._parts: dict[str, Any] | None = None

    def fingerprint_parts(self) -> dict[str, Any]:
        # Hashing every weight and the vocabulary is the slow part: do it once per encoder.
        if self._parts is None:
            self._parts = {
                "adapter": self.adapter,
                "model_type": self.model_type,
                "weights": state_dict_digest(self.model, exclude=self._digest_exclude),
                **self._preprocessing_parts(),
            }
        return dict(self._parts)

    def _preprocessing_parts(self) -> dict[str, Any]:
        """Image processor / tokenizer / pooling config: whatever besides weights changes the embeddings."""
        raise NotImplementedError

    def _pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.to(self.device, dtype=torch.float32, non_blocking=True)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    @staticmethod
    def _finish(x: torch.Tensor, normalize: bool) -> torch.Tensor:
        x = x.float().cpu()
        return normalize_rows(x) if normalize else x

    def _check_texts_differ(self) -> int:
        """Encode two unrelated texts and refuse a model that cannot tell them apart; returns the embedding dim.

        An empty or default tokenizer (vocabulary files missing from a hub repo or a copied directory) maps every
        text to unknown tokens, and nothing downstream would notice: zero-shot and retrieval just become chance.
        Two checks: the tokens (all one non-special id: the tokenizer has no vocabulary, whatever the model), and
        the embeddings (identical: the text tower ignores its input).
        """
        texts = list(SANITY_TEXTS)
        tokens = self.tokenize(texts)["input_ids"]
        special = set(getattr(self.tokenization.tokenizer, "all_special_ids", []) or [])
        raw = [[int(i) for i in row] for row in tokens]
        ids = [[i for i in row if i not in special] for row in raw]
        z = self.encode_text_batch(texts).float()
        norms = z.norm(dim=-1)
        cosine = float(z[0] @ z[1] / norms.prod()) if bool((norms > 0).all()) else 1.0
        fix = "check its tokenizer files (AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained(DIR)) and weights"
        if len({i for row in ids for i in row}) <= 1:
            raise EncoderlabError(
                f"the tokenizer of {self.model_id!r} has no usable vocabulary: {texts[0]!r} and {texts[1]!r} "
                f"become the same unknown / special tokens ({raw[0]} and {raw[1]}), so every text would get the same "
                "embedding",
                fix,
            )
        if cosine > SAME_TEXT_COSINE:
            raise EncoderlabError(
                f"{self.model_id!r} gives different texts the same embedding (cosine {cosine:.6f} between "
                f"{texts[0]!r} and {texts[1]!r}): its text weights are broken, so zero-shot and retrieval would be "
                "meaningless", fix,
            )
        return int(z.shape[-1])


class HFDualEncoder(ModelBackedTrainable, _HFEncoder):
    """CLIP / SigLIP / ALIGN: projected image and text embeddings in one space, with the model's own scoring."""

    adapter = "hf-dual"

    def __init__(self, model_id: str, *, device: torch.device, precision: str) -> None:
        config = load_config(model_id)
        model_type = getattr(config, "model_type", None)
        family = _dual_family(model_id, config)
        model, missing = load_model(model_id)
        super().__init__(model_id, model, device, precision)
        self.family = family
        self.modalities = ("image", "text")
        self.score_kind = family.score_kind
        self.processor = load_image_processor(model_id)
        tokenizer = load_tokenizer(model_id)
        self.tokenization = TextTokenization(
            tokenizer,
            padding=family.padding,
            max_length=_text_max_length(tokenizer, getattr(config, "text_config", None), family.max_length),
            use_attention_mask=family.use_attention_mask,
        )
        if family.padding == "max_length":
            self.text_max_length = self.tokenization.max_length
        self._digest_exclude = [k for k in missing if k.startswith(_POOLER_PREFIXES)]
        self._set_scores(model_type)
        self.embed_dim = self._probe_dim()

    def _set_scores(self, model_type: str | None) -> None:
        with torch.no_grad():
            if model_type == "align":  # logits = cos / temperature
                self.logit_scale = float(1.0 / self.model.temperature.float().item())
            else:
                self.logit_scale = float(self.model.logit_scale.float().exp().item())
            bias = getattr(self.model, "logit_bias", None)
            self.logit_bias = float(bias.float().item()) if isinstance(bias, torch.Tensor) else None

    def _probe_dim(self) -> int:
        return self._check_texts_differ()

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The exact model inputs for ``texts`` (CPU tensors): padding, truncation and masks as the family needs."""
        return self.tokenization(texts)

    def image_transform(self) -> HFImageTransform:
        return HFImageTransform(self.processor)

    def encode_pixels(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        with inference_context(self.device, self.precision):
            out = _as_tensor(self.model.get_image_features(pixel_values=self._pixels(pixel_values)))
        return self._finish(out, normalize)

    def encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        batch = self._to_device(self.tokenize(texts))
        with inference_context(self.device, self.precision):
            out = _as_tensor(self.model.get_text_features(**batch))
        return out.float().cpu()

    def _preprocessing_parts(self) -> dict[str, Any]:
        return {
            "image_processor": self.image_transform().config(),
            "tokenizer": self.tokenization.config(),
            "pooling": "model",  # get_image_features / get_text_features: the family's own projection
        }

    # ---- the trainable contract (encoders.trainable): the same features, with gradients ---------------------
    def tower_layout(self, tower: str) -> TowerLayout:
        """Where the ``tower`` ("image" / "text") parameters live in this family's model."""
        if tower not in self.modalities:
            raise EncoderlabError(f"unknown tower {tower!r} of {self.spec!r}", "use image or text")
        return DUAL_LAYOUTS[self.model_type][tower]

    def image_module(self) -> TowerModule:
        """Pixel values -> ``get_image_features``, as in ``encode_pixels`` but fp32 and with gradients."""

        def features(pixel_values: torch.Tensor) -> torch.Tensor:
            return _as_tensor(self.model.get_image_features(pixel_values=self._pixels(pixel_values)))

        return TowerModule(self.model, self.tower_layout("image"), features, on_train=self._weights_changed)

    def text_module(self) -> TowerModule:
        """``tokenize`` dict -> ``get_text_features``, as in ``encode_text_batch`` but with gradients."""

        def features(tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return _as_tensor(self.model.get_text_features(**self._to_device(dict(tokens))))

        return TowerModule(self.model, self.tower_layout("text"), features, on_train=self._weights_changed)

    def _weights_changed(self) -> None:
        self._parts = None  # the weight digest is recomputed on the next fingerprint


def _dual_family(model_id: str, config: Any) -> DualFamily:
    model_type = getattr(config, "model_type", None)
    if model_type in DUAL_FAMILIES:
        return DUAL_FAMILIES[model_type]
    if model_type in UNSUPPORTED_DUAL:
        raise EncoderlabError(f"{model_id!r}: {UNSUPPORTED_DUAL[model_type]}")
    vision = hasattr(config, "num_channels") or hasattr(config, "image_size") or hasattr(config, "hidden_sizes")
    alt = "hf-vision" if vision else "hf-text"
    raise EncoderlabError(
        f"{model_id!r} is a {model_type!r} model, not a dual image-text encoder "
        f"(hf: supports {', '.join(sorted(DUAL_FAMILIES))})",
        f"use {alt}:{model_id} for its {'image' if vision else 'text'} embeddings",
    )


def _load_single_tower(model_id: str) -> tuple[Any, Any, list[str]]:
    """(config, model, missing keys) of a one-tower model; a dual encoder is pointed at ``hf:``."""
    config = load_config(model_id)
    model_type = getattr(config, "model_type", None)
    if model_type in DUAL_FAMILIES or model_type in UNSUPPORTED_DUAL:
        raise EncoderlabError(
            f"{model_id!r} is a dual image-text encoder ({model_type})", f"use hf:{model_id} for its embeddings"
        )
    model, missing = load_model(model_id)
    return config, model, missing


class HFVisionEncoder(_HFEncoder):
    """Any AutoModel vision backbone; the embedding is pooled per ``VISION_POOLING`` (or ``?pool=``)."""

    adapter = "hf-vision"

    def __init__(self, target: str, *, device: torch.device, precision: str) -> None:
        model_id, options = split_target(target, {"pool": VISION_POOLS})
        config, model, missing = _load_single_tower(model_id)
        model_type = getattr(config, "model_type", None)
        super().__init__(model_id, model, device, precision)
        self.modalities = ("image",)
        self.pool: PoolMode = options.get("pool") or VISION_POOLING.get(str(model_type), "mean")
        if self.pool == "pooler" and any(k.startswith(_POOLER_PREFIXES) for k in missing):
            raise EncoderlabError(
                f"{model_id!r} has no trained pooler weights (they would be random)",
                f"use hf-vision:{model_id}?pool=cls or ?pool=mean",
            )
        self._digest_exclude = [k for k in missing if k.startswith(_POOLER_PREFIXES)]
        self.processor = load_image_processor(model_id)
        self.patch_size = _patch_size(config)
        self.embed_dim = self._probe_dim()

    def _probe_dim(self) -> int:
        from PIL import Image

        pixels = self.image_transform()(Image.new("RGB", (64, 64)))
        return int(self.encode_pixels(pixels[None]).shape[-1])

    def image_transform(self) -> HFImageTransform:
        return HFImageTransform(self.processor)

    def encode_pixels(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self._pixels(pixel_values)
        with inference_context(self.device, self.precision):
            out = self.model(pixel_values=x)
            pooled = pool_vision_output(out, self.pool, self._prefix_tokens(out, x))
        return self._finish(pooled, normalize)

    def _prefix_tokens(self, out: Any, pixel_values: torch.Tensor) -> int:
        """CLS and register tokens before the patch tokens: sequence length minus the patch count."""
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None or hidden.dim() != 3 or self.patch_size is None:
            return 0
        h, w = pixel_values.shape[-2:]
        patches = (h // self.patch_size) * (w // self.patch_size)
        extra = hidden.shape[1] - patches
        return extra if 0 <= extra <= 16 else 0  # hierarchical models (Swin) merge patches: no prefix

    def _preprocessing_parts(self) -> dict[str, Any]:
        return {"image_processor": self.image_transform().config(), "pooling": self.pool}


def _patch_size(config: Any) -> int | None:
    p = getattr(config, "patch_size", None)
    if isinstance(p, (list, tuple)):
        p = p[0]
    return int(p) if isinstance(p, int) else None


def pool_vision_output(out: Any, pool: str, prefix_tokens: int) -> torch.Tensor:
    """One vector per image from a backbone output: its pooler, its CLS token, or the mean of patch tokens."""
    if pool == "pooler":
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            raise EncoderlabError("this model has no pooler_output", "use ?pool=mean or ?pool=cls")
        return pooled.flatten(1)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        raise EncoderlabError("this model returns no last_hidden_state to pool", "use ?pool=pooler")
    if hidden.dim() == 4:  # CNN feature map [B, C, H, W]
        if pool == "cls":
            raise EncoderlabError("a convolutional backbone has no CLS token", "use ?pool=mean or ?pool=pooler")
        return hidden.mean(dim=(2, 3))
    if pool == "cls":
        return hidden[:, 0]
    return hidden[:, prefix_tokens:].mean(dim=1)


class HFTextEncoder(_HFEncoder):
    """Any AutoModel text encoder: mean over the attention mask (default) or the first token (``?pool=cls``)."""

    adapter = "hf-text"

    def __init__(
        self, target: str, *, device: torch.device, precision: str, default_max_length: int | None = None
    ) -> None:
        model_id, options = split_target(target, {"pool": TEXT_POOLS, "max_length": int})
        config, model, missing = _load_single_tower(model_id)
        super().__init__(model_id, model, device, precision)
        self.modalities = ("text",)
        self.pool: PoolMode = options.get("pool", "mean")
        self._digest_exclude = [k for k in missing if k.startswith(_POOLER_PREFIXES)]
        tokenizer = load_tokenizer(model_id)
        max_length = _text_max_length(tokenizer, config, options.get("max_length") or default_max_length)
        self.tokenization = TextTokenization(tokenizer, "longest", max_length, use_attention_mask=True)
        self.embed_dim = self._check_texts_differ()

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The exact model inputs for ``texts`` (CPU tensors), padded to the longest."""
        return self.tokenization(texts)

    def encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        batch = self._to_device(self.tokenize(texts))
        with inference_context(self.device, self.precision):
            hidden = self.model(**batch).last_hidden_state
            pooled = pool_text_output(hidden, batch["attention_mask"], self.pool)
        return pooled.float().cpu()

    def _preprocessing_parts(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenization.config(), "pooling": self.pool}


def pool_text_output(hidden: torch.Tensor, attention_mask: torch.Tensor, pool: str) -> torch.Tensor:
    """Mean of token states over the attention mask (sentence-transformers' rule), or the first (CLS) token."""
    if pool == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


# ---- factories -----------------------------------------------------------------------------------------


def load_hf(target: str, *, device: torch.device, precision: str) -> Encoder:
    """``hf:ID`` — a CLIP / SigLIP / ALIGN dual encoder from the hub or a save_pretrained directory."""
    model_id, _ = split_target(target, {})
    return HFDualEncoder(model_id, device=device, precision=precision)


def load_hf_vision(target: str, *, device: torch.device, precision: str) -> Encoder:
    """``hf-vision:ID[?pool=pooler|cls|mean]`` — image embeddings from any transformers vision backbone."""
    return HFVisionEncoder(target, device=device, precision=precision)


def load_hf_text(target: str, *, device: torch.device, precision: str) -> Encoder:
    """``hf-text:ID[?pool=mean|cls&max_length=N]`` — text embeddings from any transformers text encoder."""
    return HFTextEncoder(target, device=device, precision=precision)


register_prefix("hf", load_hf, "transformers dual image-text encoder: CLIP, SigLIP, ALIGN (hub id or directory)")
register_prefix("hf-vision", load_hf_vision, "transformers vision backbone: ViT, DINOv2, ResNet, ConvNeXt, ...")
register_prefix("hf-text", load_hf_text, "transformers text encoder (BERT family), mean pooling by default")
