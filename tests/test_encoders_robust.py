"""What a new user hits in the first hour: broken model directories, truncated weights, an offline hub, noisy loads.

Every case must end in one EncoderlabError naming the file or model and the fix, quickly and without library noise.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from encoderlab.encoders import create_encoder, hf_loading
from encoderlab.encoders import hf as hf_module
from encoderlab.errors import EncoderlabError

TOKENIZER_VOCAB = ("vocab.json", "merges.txt", "tokenizer.json")
#: files a message may name; each at most once (a fix repeating the message's file name reads as noise)
MODEL_FILE_NAMES = ("config.json", "preprocessor_config.json", "model.safetensors", "tokenizer.json", "vocab.json",
                    "merges.txt", "vocab.txt", "spiece.model", "tokenizer_config.json", "heads.safetensors")


def copy_without(src: Path, dst: Path, *names: str) -> Path:
    shutil.copytree(src, dst)
    for name in names:
        (dst / name).unlink()
    return dst


def error_of(spec: str) -> str:
    with pytest.raises(EncoderlabError) as info:
        create_encoder(spec, device="cpu")
    return str(info.value)


def assert_names_each_file_once(message: str) -> None:
    for name in MODEL_FILE_NAMES:
        assert len(re.findall(rf"(?<![\w.]){re.escape(name)}", message)) <= 1, (name, message)


@pytest.fixture(autouse=True)
def _fresh_hub_probe(monkeypatch):
    """Each test decides itself whether the hub is reachable; none touches the network."""
    monkeypatch.setattr(hf_loading, "_hub_reachable", None, raising=False)


# ---- tokenizers ---------------------------------------------------------------------------------------------


def test_a_directory_without_tokenizer_files_is_refused_naming_them(tiny_clip_dir, tmp_path):
    d = copy_without(tiny_clip_dir, tmp_path / "clip", *TOKENIZER_VOCAB)
    assert (d / "tokenizer_config.json").exists()  # what is left is not enough
    msg = error_of(f"hf:{d}")
    assert str(d) in msg and "no tokenizer vocabulary" in msg and "tokenizer_config.json alone" in msg
    for wanted in ("tokenizer.json", "vocab.json + merges.txt", "vocab.txt", "spiece.model"):
        assert wanted in msg
    assert "save_pretrained(DIR)" in msg and "same embedding" in msg
    assert "no tokenizer vocabulary" in error_of(f"local:{d}")
    assert_names_each_file_once(msg)


def test_half_a_bpe_tokenizer_names_the_missing_half(tiny_clip_dir, tmp_path):
    d = copy_without(tiny_clip_dir, tmp_path / "clip", "merges.txt", "tokenizer.json")
    assert "it has vocab.json but not merges.txt" in error_of(f"hf:{d}")


def test_a_text_encoder_without_its_vocabulary_is_refused(tiny_bert_dir, tmp_path):
    names = [n for n in ("vocab.txt", "tokenizer.json") if (tiny_bert_dir / n).exists()]
    d = copy_without(tiny_bert_dir, tmp_path / "bert", *names)
    assert "no tokenizer vocabulary" in error_of(f"hf-text:{d}")


def test_complete_directories_still_load(tiny_clip_dir, tiny_siglip_dir, tiny_align_dir, tiny_bert_dir):
    for d in (tiny_clip_dir, tiny_siglip_dir, tiny_align_dir):
        assert create_encoder(f"hf:{d}", device="cpu").encode_texts(["a cat", "a dog"]).shape[0] == 2
    for pool in ("mean", "cls"):
        assert create_encoder(f"hf-text:{tiny_bert_dir}?pool={pool}", device="cpu").embed_dim == 32


def test_a_tokenizer_that_maps_every_text_to_unknown_tokens_is_refused(tiny_clip_dir, tmp_path, monkeypatch):
    """The check after loading: what a hub repo without tokenizer files gives (no file check covers a hub id)."""
    d = copy_without(tiny_clip_dir, tmp_path / "clip", *TOKENIZER_VOCAB)
    monkeypatch.setattr(hf_loading, "check_model_dir", lambda path, what: None)
    msg = error_of(f"hf:{d}")
    assert "has no usable vocabulary" in msg and "'a photo of a cat'" in msg and "same embedding" in msg


def test_a_text_tower_that_ignores_its_input_is_refused(tiny_clip_dir, monkeypatch):
    monkeypatch.setattr(hf_module.HFDualEncoder, "encode_text_batch", lambda self, texts: torch.ones(len(texts), 16))
    msg = error_of(f"hf:{tiny_clip_dir}")
    assert "gives different texts the same embedding" in msg and "cosine 1.000000" in msg


# ---- weights and configs ------------------------------------------------------------------------------------


def truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


@pytest.mark.parametrize("keep", [None, 5])
def test_truncated_weights_are_named_with_the_fix(tiny_clip_dir, tiny_vit_dir, tmp_path, keep):
    d = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, d)
    truncate(d / "model.safetensors", keep)
    for spec in (f"hf:{d}", f"local:{d}"):
        msg = error_of(spec)
        assert f"weights file {d / 'model.safetensors'} is truncated or damaged" in msg
        assert "download or save the model again" in msg
        assert_names_each_file_once(msg)
    v = tmp_path / "vit"
    shutil.copytree(tiny_vit_dir, v)
    truncate(v / "model.safetensors", keep)
    assert f"weights file {v / 'model.safetensors'} is truncated" in error_of(f"hf-vision:{v}")


def test_a_folder_without_config_json_says_so(tiny_clip_dir, tmp_path):
    d = copy_without(tiny_clip_dir, tmp_path / "clip", "config.json")
    for prefix in ("hf", "hf-vision", "hf-text"):
        msg = error_of(f"{prefix}:{d}")
        assert f"{str(d)!r} has no config.json: not a transformers model directory" in msg
        assert "upgrade" not in msg
        assert_names_each_file_once(msg)


def test_configs_transformers_cannot_read(tmp_path):
    (tmp_path / "nomodel").mkdir()
    (tmp_path / "nomodel" / "config.json").write_text('{"hidden_size": 8}')
    msg = error_of(f"hf:{tmp_path / 'nomodel'}")
    assert "names no model_type" in msg and "upgrade" not in msg
    (tmp_path / "future").mkdir()
    (tmp_path / "future" / "config.json").write_text('{"model_type": "clip-from-the-future"}')
    msg = error_of(f"hf:{tmp_path / 'future'}")
    assert "model_type 'clip-from-the-future'" in msg and "upgrade transformers" in msg


def test_missing_weights_and_image_processor_are_named(tiny_clip_dir, tmp_path):
    d = copy_without(tiny_clip_dir, tmp_path / "noweights", "model.safetensors")
    msg = error_of(f"hf:{d}")
    assert "has no weights file (model.safetensors or pytorch_model.bin)" in msg
    assert_names_each_file_once(msg)
    d = copy_without(tiny_clip_dir, tmp_path / "noproc", "preprocessor_config.json")
    msg = error_of(f"hf:{d}")
    assert "has no preprocessor_config.json" in msg and "AutoImageProcessor" in msg
    assert_names_each_file_once(msg)


def test_a_damaged_encoderlab_json_is_named(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "encoderlab.json").write_text('{"kind": "alig')
    assert "encoderlab.json is truncated or damaged" in error_of(f"local:{tmp_path / 'm'}")


# ---- the hub, offline ---------------------------------------------------------------------------------------


class _DeadSession:
    """huggingface_hub's session on a machine without network: every request fails to connect."""

    calls = 0

    def head(self, url, timeout=None):
        _DeadSession.calls += 1
        raise OSError("[Errno -2] Name or service not known")


def test_an_offline_hub_fails_fast_with_one_line(monkeypatch, capfd):
    import huggingface_hub
    from transformers import AutoConfig

    monkeypatch.setattr(huggingface_hub, "get_session", lambda: _DeadSession())
    _DeadSession.calls = 0
    kwargs_seen: list[dict] = []
    real = AutoConfig.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        kwargs_seen.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(spy))
    t0 = time.perf_counter()
    msg = error_of("hf:nonexistent-org/nonexistent-model-xyz")
    seconds = time.perf_counter() - t0
    assert kwargs_seen and kwargs_seen[0].get("local_files_only") is True  # the cache answers; no retries
    assert seconds < 5, seconds  # was ~25 s of retries
    assert "nonexistent-org/nonexistent-model-xyz" in msg and "hub could not be reached" in msg
    assert "no network connection" in msg and "local cache" in msg and "hf:/path/to/dir" in msg
    error_of("hf:another-org/another-model")
    assert _DeadSession.calls == 1  # probed once per process
    assert capfd.readouterr().err == ""  # no "Retrying in 1s" lines


def test_hf_hub_offline_skips_the_probe(monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "get_session", lambda: pytest.fail("probed although HF_HUB_OFFLINE is set"))
    assert "hub could not be reached" in error_of("hf:nonexistent-org/nonexistent-model-xyz")


def test_local_directories_never_probe_the_hub(tiny_clip_dir, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_session", lambda: pytest.fail("a local directory probed the hub"))
    create_encoder(f"hf:{tiny_clip_dir}", device="cpu")


# ---- quiet loading ------------------------------------------------------------------------------------------


def test_loading_prints_nothing_and_restores_the_library_settings(tiny_clip_dir, tiny_bert_dir, tiny_vit_dir, capfd,
                                                                    monkeypatch):
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as tf_logging

    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    monkeypatch.delenv(hf_loading.VERBOSE_ENV, raising=False)
    before = (tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled(), are_progress_bars_disabled())
    capfd.readouterr()
    create_encoder(f"hf:{tiny_clip_dir}", device="cpu")  # its config warns about bos_token_id; weights show a bar
    create_encoder(f"hf-text:{tiny_bert_dir}", device="cpu")
    create_encoder(f"hf-vision:{tiny_vit_dir}", device="cpu")
    out, err = capfd.readouterr()
    assert err == "" and out == ""
    assert (tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()) == before


def test_verbose_env_keeps_the_libraries_output(tiny_clip_dir, capfd, monkeypatch):
    monkeypatch.setenv(hf_loading.VERBOSE_ENV, "1")
    capfd.readouterr()
    create_encoder(f"hf:{tiny_clip_dir}", device="cpu")
    assert "Loading weights" in capfd.readouterr().err
