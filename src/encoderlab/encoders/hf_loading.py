"""Loading transformers models for the ``hf:`` adapters: spec options, hub reachability, directory checks, quiet
``from_pretrained`` with errors in the user's terms.

A hub id is probed once per process (a short HEAD request); offline, loads use the local cache only and fail in one
line naming the model and the local fix, instead of waiting through retries. A local directory is checked for the
files each part needs (config, weights, tokenizer, image processor) before transformers runs, so a missing or
truncated file is named rather than surfacing as a library traceback. Library progress bars and warnings are
silenced during loading (``ENCODERLAB_HF_VERBOSE=1`` shows them).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import EncoderlabError
from ..specs import parse_options, split_query

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


def output_tensor(out: Any) -> torch.Tensor:
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
