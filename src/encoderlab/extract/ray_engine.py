"""The Ray engine: the same extraction on a Ray cluster (a local one, or ``address=`` an existing one).

What runs where, and why Ray *tasks and actors* rather than Ray Data: the unit of work here is a block of items
whose result is a committed store shard, and the store's commit protocol (``store.shards``: npy, then sidecar, names
no two writers share) already makes a retried block idempotent. Ray gives exactly the parts that protocol needs --
stateless tasks for hashing, a pool of long-lived actors that load the model once each, restart of a dead actor
and retry of its block (``max_restarts`` / ``max_task_retries``) -- while the decision of what to encode stays in
``extract.loop`` and is the same for both engines. Ray Data would move every decoded image through the object
store as Arrow tensors and hide the block boundary that a shard commit needs.

- **hashing** (content keys: every file's bytes are read) runs as Ray tasks over blocks of paths;
- the **driver** decides what the store lacks (one key-index lookup) and which rows share a content -- as the local
  engine does, so the keys, counts and skip reports are the same;
- **encoding** runs in ``workers`` actors (one model load each; a GPU each when the cluster has them): an actor
  decodes its block on threads, encodes it and commits shards straight into the store from the worker (a shared
  file system on a multi-node cluster). Before encoding a block it asks the store what is still missing, so a
  block retried after its actor died encodes only what the dead one had not committed, and a rerun after the
  driver died encodes only what is missing.

Ray is optional (``pip install 'encoderlab[distributed]'``); the engine is picked with ``--engine ray``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..encoders.base import Encoder
from ..errors import EncoderlabError
from ..progress import progress_bar
from ..store import EmbeddingSpace, EmbeddingStore
from ..store.writer import check_commit_seconds
from .loop import ImageOptions, TextOptions, _hash_images, encode_image_items, encode_text_items

RAY_FIX = "install Ray: pip install 'encoderlab[distributed]' (or pip install 'ray>=2.9')"
HASH_BLOCK = 2048
# Environment a worker needs to see what the driver sees (where models, compiled networks and packaged data live).
FORWARDED_ENV = ("ENCODERLAB_HOME", "ENCODERLAB_ONNXRUNTIME", "ENCODERLAB_COMMIT_SECONDS", "HF_HOME",
                 "TRANSFORMERS_OFFLINE", "HF_HUB_OFFLINE")
# The local cluster's object store: blocks of paths and results are small, so a few hundred MB is plenty (Ray's
# default, 30% of RAM, would reserve GBs of /dev/shm on a laptop).
OBJECT_STORE_BYTES = 512 * 1024 * 1024
# Failure injection for the engine's own tests: ``kill-actor-after-commits:N`` makes the first life of each encoder
# actor kill itself (SIGKILL, as the OOM killer or a lost node would) once it has committed N shards.
FAULT_ENV = "ENCODERLAB_RAY_FAULT"


def require_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise EncoderlabError("--engine ray needs Ray, which is not installed", RAY_FIX) from e
    return ray


def _unwrap(err: BaseException) -> BaseException:
    """The user's error inside a Ray task error (an EncoderlabError raised on a worker), else the error itself."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, EncoderlabError) else err


class _EncoderWorker:
    """One model, loaded once, encoding blocks of either modality into any store (made a Ray actor at run time).

    A call names its target as ``(store root, modality, fingerprint)``; the fingerprint the worker's own model gives
    must equal the driver's, so a node with other weights (or another encoderlab) cannot write into the space.
    """

    def __init__(self, spec: str, precision: str, threads: int) -> None:
        import ray
        import torch

        from ..encoders import create_encoder

        torch.set_num_threads(max(1, threads))
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.encoder = create_encoder(spec, device=device, precision=precision)
        self.threads = max(1, threads)
        self.spaces: dict[tuple[str, str], EmbeddingSpace] = {}
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed

    def _space(self, target: tuple[str, str, str]) -> EmbeddingSpace:
        from .loop import space_for

        root, modality, fingerprint = target
        space = self.spaces.get((root, modality))
        if space is None:
            space = space_for(EmbeddingStore(root), self.encoder, modality)
            if space.fingerprint != fingerprint:
                raise EncoderlabError(
                    f"encoder {self.encoder.spec!r} built on a Ray worker has {modality} fingerprint "
                    f"{space.fingerprint[:12]}, the driver's has {fingerprint[:12]}: the worker loaded other weights "
                    "or settings", "give every node the same model files and encoderlab version (and an explicit "
                    "--precision)")
            self.spaces[(root, modality)] = space
        space.refresh()  # shards other actors (or this one's earlier life) committed since
        return space

    def images(self, target: tuple[str, str, str], block: int, items: list[tuple[str, str]],
               options: ImageOptions) -> dict[str, Any]:
        t0 = time.perf_counter()
        space = self._space(target)
        todo = set(space.missing([k for k, _ in items]))
        work = [(k, p) for k, p in items if k in todo]
        if options.num_workers is None and self.encoder.device.type != "cpu":
            # a GPU actor decodes in worker processes on the CPUs Ray gave it (os.cpu_count() is the node's)
            options = dataclasses.replace(options, num_workers=max(1, self.threads - 1))
        encoded, skipped = encode_image_items(self.encoder, space, work, options, bar=self._fault_bar(space))
        return self._done(block, len(items), len(work), encoded, skipped, t0)

    def texts(self, target: tuple[str, str, str], block: int, texts: list[str], options: TextOptions
              ) -> dict[str, Any]:
        from ..hashing import text_key

        t0 = time.perf_counter()
        space = self._space(target)
        todo = set(space.missing([text_key(t) for t in texts]))
        work = [t for t in texts if text_key(t) in todo]
        encoded = encode_text_items(self.encoder, space, work, options, bar=self._fault_bar(space))
        return self._done(block, len(texts), len(work), encoded, [], t0)

    def hash(self, paths: list[str | None]) -> tuple[list[str | None], list[dict[str, str]]]:
        return _hash_block(paths)

    def _done(self, block: int, n: int, n_work: int, encoded: int, skipped: list, t0: float) -> dict[str, Any]:
        # rows an earlier attempt at this block committed before its actor died count as encoded by this run
        return {"block": block, "encoded": encoded + (n - n_work), "resumed": n - n_work, "skipped": skipped,
                "pid": os.getpid(), "restarted": self.restarted, "seconds": time.perf_counter() - t0,
                "work": n_work}

    def _fault_bar(self, space: EmbeddingSpace) -> Any:
        fault = os.environ.get(FAULT_ENV, "")
        if not fault.startswith("kill-actor-after-commits:") or self.restarted:
            return None
        return _KillAfterCommits(space, int(fault.rsplit(":", 1)[1]))


class _KillAfterCommits:
    """A progress 'bar' that SIGKILLs its process once it has committed ``n`` shards of its own (by pid in the name)."""

    def __init__(self, space: EmbeddingSpace, n: int) -> None:
        self.space, self.n = space, n
        self.start = len(self._own())

    def _own(self) -> list[Path]:
        return list(Path(self.space.shards_dir).glob(f"shard-*-{os.getpid()}-*.json"))

    def update(self, _n: int) -> None:
        if len(self._own()) - self.start >= self.n:
            os.kill(os.getpid(), signal.SIGKILL)


def _score_block(image_space: tuple[str, str], text_space: tuple[str, str], image_keys: list[str],
                 text_keys: list[str], chunk_size: int) -> Any:
    from ..curate.pairs import cosine_scores

    return cosine_scores(EmbeddingSpace(*image_space), EmbeddingSpace(*text_space), image_keys, text_keys,
                         chunk_size=chunk_size)


def _hash_block(paths: list[str | None]) -> tuple[list[str | None], list[dict[str, str]]]:
    return _hash_images(paths, progress=False)


class RayEngine:
    """Hashing (on several nodes) and encoding in a pool of Ray actors; a context manager (or call ``close``).

    ``address``: an existing cluster (``auto``, ``ray://host:10001``, ``host:6379``); None starts a local one with
    ``num_cpus`` CPUs (default: all). ``workers``: encoder actors (default: one per GPU, each with the CPUs divided
    among the GPUs for decoding; on CPUs only, one per ``cpus_per_worker`` CPUs, default 1: single-threaded actors
    each decoding and encoding their own blocks beat one actor running the model on every core --
    ``bench/scale.py``, efficientnet-lite0 on 2 CPUs: 2 actors x 1 CPU 0.85x the local engine's time, 1 x 2 1.33x).
    ``block_rows``: items per actor call and so the most a killed actor can lose (default: about 4 blocks per worker,
    256 to 4096 rows).
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, workers: int | None = None, cpus_per_worker: int | None = None,
                 num_cpus: int | None = None, block_rows: int | None = None) -> None:
        for label, value in (("workers", workers), ("cpus_per_worker", cpus_per_worker), ("num_cpus", num_cpus),
                             ("block_rows", block_rows)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise EncoderlabError(f"Ray engine: {label} must be a positive integer, got {value!r}",
                                      f"pass {label}=1 or more, or leave it out for the default")
        self.ray = require_ray()
        self.address, self.workers_asked, self.cpus_per_worker = address, workers, cpus_per_worker
        self.num_cpus, self.block_rows = num_cpus, block_rows
        self.started = False
        self.info: dict[str, Any] = {}
        self.runs: list[dict[str, Any]] = []  # one record per encoding pass: blocks, workers, restarts seen
        self._pools: dict[tuple[str, str, str], list[Any]] = {}
        self._connect()

    # ------------------------------------------------------------------------------------------------ cluster

    def _connect(self) -> None:
        ray = self.ray
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        if ray.is_initialized():
            self.started = False
        else:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            # Ray's start-up chatter (INFO/WARNING lines) would bury the command's own output; errors still show
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "logging_level": logging.ERROR,
                                      "runtime_env": {"env_vars": env} if env else None}
            if self.address is None:  # "local": a new cluster of our own, never another process's by accident
                kwargs.update(num_cpus=self.num_cpus or os.cpu_count() or 1, object_store_memory=OBJECT_STORE_BYTES)
            try:
                ray.init(address=self.address or "local", **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise EncoderlabError(f"cannot join the Ray cluster at {self.address!r}: {e}",
                                      "check --ray-address (e.g. auto, or ray://HEAD:10001) and that the cluster "
                                      "is up (`ray status`), or leave it out to start a local cluster") from e
            self.started = True
        res = ray.cluster_resources()
        self.info = {"address": self.address or "local", "cpus": int(res.get("CPU", 0)),
                     "gpus": int(res.get("GPU", 0)), "nodes": len([n for n in ray.nodes() if n.get("Alive")])}

    def close(self) -> None:
        if self.ray.is_initialized():
            self.release_workers()
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
        self.started = False

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def plan(self) -> dict[str, Any]:
        """Workers, CPUs and GPUs per worker for this cluster (what ``summary()`` records)."""
        cpus, gpus = max(1, self.info["cpus"]), self.info["gpus"]
        if gpus:
            workers = self.workers_asked or gpus
            per_cpu = self.cpus_per_worker or max(1, cpus // workers)
            # more actors than GPUs share them (a whole GPU each would leave the extra ones unscheduled forever)
            share = 1 if workers <= gpus else round(gpus / workers, 4)
            return {"workers": workers, "cpus_per_worker": per_cpu, "gpus_per_worker": share}
        per_cpu = self.cpus_per_worker or (max(1, cpus // self.workers_asked) if self.workers_asked else 1)
        workers = self.workers_asked or max(1, cpus // per_cpu)
        return {"workers": workers, "cpus_per_worker": min(per_cpu, cpus), "gpus_per_worker": 0}

    def summary(self) -> dict[str, Any]:
        return {"engine": "ray", **self.info, **self.plan(), "runs": list(self.runs)}

    # ------------------------------------------------------------------------------------------------ hashing

    def hash_images(self, paths: Sequence[str | None], progress: bool, encoder: Encoder | None = None):
        """Content keys of ``paths``, in path order, with the unreadable ones reported.

        With ``encoder`` its actors are started first (their model loads run while the files are hashed). On a
        one-node cluster the driver hashes (threads: it is as close to the files as any worker, and the CPUs are
        the booting actors'); on several nodes the encoder actors hash blocks of paths (else Ray tasks do).
        """
        actors = self._pool(encoder, len(paths)) if encoder is not None else []
        if self.info.get("nodes", 1) <= 1:
            return _hash_images(paths, progress)
        blocks = [list(paths[i : i + HASH_BLOCK]) for i in range(0, len(paths), HASH_BLOCK)]
        if actors:
            refs = [actors[i % len(actors)].hash.remote(b) for i, b in enumerate(blocks)]
        else:
            self.release_workers()  # idle encoder actors hold the CPUs these tasks need
            refs = [self.ray.remote(num_cpus=1, max_retries=3)(_hash_block).remote(b) for b in blocks]
        keys: list[str | None] = []
        skipped: list[dict[str, str]] = []
        with progress_bar(len(paths), "file", progress, "hash") as bar:
            for block, ref in zip(blocks, refs):
                k, sk = self.ray.get(ref)
                keys.extend(k)
                skipped.extend(sk)
                bar.update(len(block))
        return keys, skipped

    # ------------------------------------------------------------------------------------------------ scoring

    def cosine_scores(self, image_space: EmbeddingSpace, text_space: EmbeddingSpace, image_keys: Sequence[str],
                      text_keys: Sequence[str], *, chunk_size: int, progress: bool = False) -> Any:
        """``curate.pairs.cosine_scores`` split over Ray tasks (each reads its pairs' rows from the store)."""
        import numpy as np

        from ..curate.pairs import cosine_scores

        n = len(image_keys)
        if n != len(text_keys):  # tasks get slices of both: a longer list's tail would be silently left out
            raise EncoderlabError(f"{n} image keys but {len(text_keys)} text keys", "pass one of each per pair")
        if n <= 2 * chunk_size:  # a task's start-up (it opens both spaces) costs more than scoring a few chunks
            return cosine_scores(image_space, text_space, image_keys, text_keys, chunk_size=chunk_size,
                                 progress=progress)
        self.release_workers()  # idle encoder actors hold the CPUs these tasks need
        task = self.ray.remote(num_cpus=1, max_retries=3)(_score_block)
        size = max(chunk_size, math.ceil(n / max(1, 4 * self.info["cpus"])))
        spaces = ((str(image_space.path), image_space.fingerprint), (str(text_space.path), text_space.fingerprint))
        starts = list(range(0, n, size))
        refs = [task.remote(*spaces, list(image_keys[i : i + size]), list(text_keys[i : i + size]), chunk_size)
                for i in starts]
        out = np.empty(n, dtype=np.float32)
        try:
            with progress_bar(n, "pair", progress and n > size, "score", leave=False) as bar:
                for i, ref in zip(starts, refs):
                    part = self.ray.get(ref)
                    out[i : i + len(part)] = part
                    bar.update(len(part))
        except self.ray.exceptions.RayError as e:
            raise _unwrap(e) from None
        return out

    # ------------------------------------------------------------------------------------------------ encoding

    def _pool(self, encoder: Encoder, n_items: int) -> list[Any]:
        """The encoder's actors, started on first use and kept (one model load each) until ``close``."""
        key = (encoder.spec, encoder.precision, os.environ.get(FAULT_ENV, ""))
        if key not in self._pools:
            self.release_workers()  # another model's actors hold the CPUs / GPUs this pool needs
            plan = self.plan()
            actor = self.ray.remote(num_cpus=plan["cpus_per_worker"], num_gpus=plan["gpus_per_worker"],
                                    max_restarts=-1, max_task_retries=-1)(_EncoderWorker)
            if key[2]:  # the engine's failure tests: only these actors get the fault
                env = {k: os.environ[k] for k in (*FORWARDED_ENV, FAULT_ENV) if k in os.environ}
                actor = actor.options(runtime_env={"env_vars": env})
            self._pools[key] = [actor.remote(encoder.spec, encoder.precision, plan["cpus_per_worker"])
                                for _ in range(plan["workers"])]
        return self._pools[key][: max(1, n_items)]

    def release_workers(self) -> None:
        """Stop the encoder actors (the next encoding starts and loads them again); ``close`` does it too."""
        for actors in self._pools.values():
            for a in actors:
                with contextlib.suppress(Exception):
                    self.ray.kill(a, no_restart=True)
        self._pools.clear()

    def _blocks(self, items: Sequence[Any], workers: int, batch_size: int) -> list[list[Any]]:
        size = self.block_rows or min(4096, max(256, math.ceil(len(items) / (4 * workers))))
        size = max(1, math.ceil(size / batch_size) * batch_size) if self.block_rows is None else size
        return [list(items[i : i + size]) for i in range(0, len(items), size)]

    def _run(self, encoder: Encoder, space: EmbeddingSpace, modality: str, items: Sequence[Any], options: Any,
             progress: bool, unit: str) -> tuple[int, list[dict[str, str]]]:
        from ray.util import ActorPool

        # the driver's commit interval, not each worker's environment's
        options = dataclasses.replace(options, commit_seconds=check_commit_seconds(options.commit_seconds))
        actors = self._pool(encoder, len(items))
        blocks = self._blocks(items, len(actors), options.batch_size)
        pool = ActorPool(actors)
        method = "images" if modality == "image" else "texts"
        target = (str(Path(space.path).parent), modality, space.fingerprint)  # a space is <store root>/<fingerprint>
        for i, block in enumerate(blocks):
            pool.submit(lambda a, v: getattr(a, method).remote(*v), (target, i, block, options))
        done: dict[int, dict[str, Any]] = {}
        try:
            with progress_bar(len(items), unit, progress) as bar:
                while pool.has_next():
                    r = pool.get_next_unordered()
                    done[r["block"]] = r
                    bar.update(len(blocks[r["block"]]))
        except BaseException as e:  # the actors may be mid-block: none is reused
            self.release_workers()
            if isinstance(e, self.ray.exceptions.RayError):
                raise _unwrap(e) from None
            raise
        space.refresh()  # the workers' shards, for whatever this process reads next
        ordered = [done[i] for i in range(len(blocks))]  # skip reports in item order, as the local engine has them
        self.runs.append({"modality": modality, "items": len(items), "blocks": len(blocks), "workers": len(actors),
                          "worker_pids": sorted({r["pid"] for r in ordered}),
                          "blocks_after_restart": sum(r["restarted"] for r in ordered),
                          "rows_resumed": sum(r["resumed"] for r in ordered),
                          # what one actor encodes per second of its own time: the rate a cluster scales up from
                          "per_actor_items_per_s": round(sum(r["work"] for r in ordered)
                                                         / max(1e-9, sum(r["seconds"] for r in ordered)), 2)})
        return sum(r["encoded"] for r in ordered), [s for r in ordered for s in r["skipped"]]

    def encode_images(self, encoder: Encoder, space: EmbeddingSpace, items: Sequence[tuple[str, str]],
                      options: ImageOptions, progress: bool) -> tuple[int, list[dict[str, str]]]:
        return self._run(encoder, space, "image", items, options, progress, "img")

    def encode_texts(self, encoder: Encoder, space: EmbeddingSpace, texts: Sequence[str], options: TextOptions,
                     progress: bool) -> int:
        encoded, _ = self._run(encoder, space, "text", texts, options, progress, "text")
        return encoded
