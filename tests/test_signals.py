"""SIGTERM (``timeout``, Slurm, ``docker stop``) stops a command like Ctrl-C: the buffered rows are committed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import encoderlab.store.writer as writer_mod
from encoderlab.cli import main
from encoderlab.store import EmbeddingStore
from encoderlab.testing import ColorEncoder, color_dataset, color_spec, registered_color_encoder

SRC = str(Path(__file__).resolve().parents[1] / "src")

#: `encoderlab embed` in a subprocess, with an encoder that takes 0.25 s a batch and says when it has started
EMBED_CODE = """
import sys, time
from pathlib import Path
from encoderlab.cli import main
from encoderlab.encoders.base import EncoderInfo
from encoderlab.encoders.registry import register_encoder
from encoderlab.testing import ColorEncoder

class SlowColorEncoder(ColorEncoder):
    def encode_pixels(self, pixel_values, normalize=False):
        Path(sys.argv[1]).touch()  # tells the parent that encoding has started
        time.sleep(0.25)
        return super().encode_pixels(pixel_values, normalize)

register_encoder(EncoderInfo("slow-color", ("image", "text"), "slow mock"),
                 lambda target, device, precision: SlowColorEncoder(device, precision))
sys.exit(main(sys.argv[2:]))
"""


def _embed_argv(data: str, store: Path, out: Path, encoder: str) -> list[str]:
    return ["embed", "--encoder", encoder, "--data", data, "--store", str(store), "--out", str(out), "--modality",
            "image", "--batch-size", "4", "--workers", "0", "--no-progress", "--device", "cpu"]


def _run_and_signal(tmp_path: Path, sig: int) -> tuple[subprocess.Popen, str, str, str, Path]:
    """Start the slow embed, send ``sig`` after about 1.5 s of encoding, wait for it to end."""
    data = color_spec(color_dataset(tmp_path / "colors", n_per_class=24))  # 72 images: 18 batches of 0.25 s
    store, marker = tmp_path / "store", tmp_path / "encoding-started"
    # Commits by time never come: only the flush on the way out can save the rows encoded before the signal.
    env = {**os.environ, "PYTHONPATH": SRC, writer_mod.COMMIT_SECONDS_ENV: "100000"}
    proc = subprocess.Popen([sys.executable, "-c", EMBED_CODE, str(marker),
                             *_embed_argv(data, store, tmp_path / "run", "slow-color")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), proc.communicate(timeout=10)
        time.sleep(1.5)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, out, err, data, store


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signalled_embed_keeps_what_it_encoded_and_a_rerun_encodes_the_rest(tmp_path, capsys, sig, code):
    proc, out, err, data, store_dir = _run_and_signal(tmp_path, sig)
    assert proc.returncode == code, err
    assert "interrupted (finished work is kept; run again to resume)" in err and "Traceback" not in err
    space = EmbeddingStore(store_dir).space(ColorEncoder().fingerprint("image"))
    committed = len(space)
    assert 0 < committed < 72 - 8  # about 1.5 s of 0.25 s batches of 4, none committed by time
    assert not [p for p in space.verify() if p["kind"] == "corrupt"]
    with registered_color_encoder():  # the same fingerprint as the slow one: its rows are this encoder's cache
        assert main([*_embed_argv(data, store_dir, tmp_path / "run2", "test-color"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["encoded"], again["cached"]) == (72 - committed, committed)  # only the rest is encoded


def test_sigterm_handler_is_restored_and_only_installed_in_the_main_thread(monkeypatch, capsys):
    before = signal.getsignal(signal.SIGTERM)
    seen: list[object] = []

    def fake_command(args: object) -> dict:
        seen.append(signal.getsignal(signal.SIGTERM))
        return {}

    from encoderlab.cli import encoders

    monkeypatch.setattr(encoders, "cmd_encoders_list", fake_command)  # main's parser binds it when it is built
    assert main(["encoders", "list"]) == 0
    assert seen and seen[0] is not before and callable(seen[0])
    assert signal.getsignal(signal.SIGTERM) is before

    codes: list[int] = []
    worker = threading.Thread(target=lambda: codes.append(main(["encoders", "list"])))
    worker.start()
    worker.join(30)
    assert codes == [0] and seen[-1] is before  # signal.signal would raise ValueError outside the main thread
