"""Real-time action recognition over HTTP with Ray Serve.

    serve run configs/serve.yaml                      # the app, its replicas and limits from a config
    curl -sS --data-binary @video.mp4 http://127.0.0.1:8000/   # -> {"topk": [[class, prob], ...], ...}

One POST body is one video file. Each replica owns a :class:`dvfl.inference.Predictor`: the same
killable decode child and container checks as ingest, evaluation's deterministic views (``views``:
1x1 by default, ``eval`` the model's run's own). Limits: upload
size (413), video duration (413), request time (408; the decode child is killed at the same limit).
A bad upload (empty, not a video, truncated, corrupt) gets a 4xx with the reason and the replica
keeps serving. Replicas or autoscaling come from the config (``num_replicas`` / ``autoscaling``).
"""
from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from dvfl.data import decode as D

# decode reject reason -> HTTP status: the client sent something we cannot use
STATUS = {D.EMPTY: 400, D.NOT_VIDEO: 415, D.UNKNOWN_CONTAINER: 415, D.PLAYLIST: 415, D.TRUNCATED: 400,
          D.CORRUPT: 400, D.NO_VIDEO_STREAM: 415, D.TOO_SHORT: 422, D.TIMEOUT: 408, D.DECODER_CRASH: 422, D.DECODER_KILLED: 422,
          D.BAD_FRAME_SIZE: 422, "too_small": 422, D.TOO_LONG: 413}




EVAL_VIEWS = "eval"


def served_views(views: str, recorded: tuple[int, int] | None) -> tuple[int, int]:
    """(clips, crops) a replica answers from: ``views``, or with "eval" the model's recorded ones (1x1 if none)."""
    from dvfl.inference import parse_views

    return (recorded or (1, 1)) if views == EVAL_VIEWS else parse_views(str(views))


@dataclass
class ServeSettings:
    model: str = ""
    # CLIPSxCROPS; "eval": the views the model's run evaluated with (model.json, predict's default): clips x crops
    # forward passes a request, which request_timeout_s and the queue must allow for
    views: str = "1x1"
    topk: int = 5
    max_upload_mb: float = 64.0
    max_video_seconds: float = 60.0
    request_timeout_s: float = 30.0
    num_replicas: int = 1
    autoscaling: dict | None = None  # Serve's autoscaling_config (min_replicas, max_replicas, ...)
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0  # > 0: the replica's model runs on its GPU (a fraction shares one)
    torch_threads: int = 1
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: dict) -> "ServeSettings":
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"serve args: unknown field(s) {unknown}; known: {sorted(known)}")
        args = dict(args)
        casts = {"int": int, "float": float}
        for key, value in args.items():  # `serve run ... topk=3` passes every value as a string
            kind = cls.__dataclass_fields__[key].type
            if kind == "int" and isinstance(value, float):  # (topk: 3.5 failed every request, not the start)
                if not value.is_integer():
                    raise ValueError(f"serve args: {key} must be an integer, got {value!r}")
                args[key] = int(value)
            elif kind in casts and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
                try:
                    args[key] = casts[kind](value)
                except (TypeError, ValueError):
                    raise ValueError(f"serve args: {key} must be {'an integer' if kind == 'int' else 'a number'}, "
                                     f"got {value!r}") from None
        s = cls(**args)
        s.validate()
        return s

    def validate(self) -> None:
        from dvfl import storage
        from dvfl.inference import parse_views

        # (a URI too: a student that distill wrote to s3:// is served from there, as Predictor reads it)
        checks = [(bool(self.model) and storage.isfile(storage.join(self.model, "model.json")),
                   f"model: {self.model!r} is not a model directory (no model.json)"),
                  (self.topk >= 1, "topk must be >= 1"), (self.max_upload_mb > 0, "max_upload_mb must be > 0"),
                  (self.max_video_seconds > 0, "max_video_seconds must be > 0"),
                  (self.request_timeout_s > 0, "request_timeout_s must be > 0"),
                  (self.num_replicas >= 1, "num_replicas must be >= 1"),
                  (self.cpus_per_replica > 0, "cpus_per_replica must be > 0"),
                  (self.gpus_per_replica >= 0, "gpus_per_replica must be >= 0"),
                  (self.torch_threads >= 1, "torch_threads must be >= 1")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"serve args: {msg}")
        if self.views != EVAL_VIEWS:
            try:
                parse_views(str(self.views))
            except ValueError as exc:
                raise ValueError(f"serve args: views: {exc} (or {EVAL_VIEWS!r}: the model's own)") from None
        from dvfl.artifacts import read_spec
        from dvfl.inference import input_spec
        from dvfl.models import CheckpointError

        try:
            spec = read_spec(storage.join(self.model, "model.json"))
        except CheckpointError as exc:
            raise ValueError(f"serve args: model: {exc}") from None
        if not spec.get("classes") or not spec.get("inputs"):  # else every replica fails to start, over and over
            raise ValueError(f"serve args: model: {self.model} records no class names or input sizes (model.json "
                             "'classes' and 'inputs', written by `dvfl distill` and `dvfl teacher`)")
        try:  # (as every replica will read them)
            input_spec(spec)
        except ValueError as exc:
            raise ValueError(f"serve args: model: {self.model}: {exc}") from None


async def run_exclusive(lock: asyncio.Lock, fn, timeout: float):
    """``fn(seconds_left)`` in a thread, one at a time under ``lock``; raises
    ``asyncio.TimeoutError`` at ``timeout`` s after the call, waiting for the lock included (a
    request that waited behind others has only what is left), but the lock is held until ``fn``
    has really finished: a thread cannot be cancelled, and the next request must not drive the
    same decode child alongside it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    await asyncio.wait_for(lock.acquire(), timeout)
    left = deadline - loop.time()
    try:
        if left <= 0:
            raise asyncio.TimeoutError
        task = asyncio.ensure_future(asyncio.to_thread(fn, left))
    except BaseException:
        lock.release()
        raise
    task.add_done_callback(lambda _: lock.release())
    return await asyncio.wait_for(asyncio.shield(task), left)


INFERENCE_SLACK_S = 5.0  # a request's limit: request_timeout_s for the decode, this for the model


def _error(status: int, reason: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": reason, "detail": detail}, status_code=status)


# One video at a time per replica (its decode child): one more waits in the replica, a bounded
# queue waits in front of it, and past that Serve answers 503 at once instead of piling up requests.
@serve.deployment(name="Recognizer", max_ongoing_requests=2, max_queued_requests=16)
class Recognizer:
    def __init__(self, settings: dict, weights_fingerprint: str | None = None):
        import torch

        from dvfl.inference import Predictor

        self.s = ServeSettings(**settings)
        torch.set_num_threads(self.s.torch_threads)
        # the GPU only when Ray gave the replica one: Ray leaves CUDA_VISIBLE_DEVICES alone for a
        # replica of 0 GPUs, so torch would see (and share, uncounted) the node's GPUs
        self.pred = Predictor.load(self.s.model, timeout=self.s.request_timeout_s,
                                   device="cuda" if self.s.gpus_per_replica > 0 else "cpu")
        self.views = served_views(self.s.views, self.pred.eval_views)
        self.weights = self.pred.spec.get("weights_fingerprint")
        if weights_fingerprint and self.weights != weights_fingerprint:
            # an export published there since: this replica (autoscaling, a restart) serves it beside replicas of
            # the first one; said, and every answer names its weights (refusing left a one-replica app with none)
            print(f"[serve] warning: {self.s.model} now holds other weights ({self.weights}) than `serve run` loaded "
                  f"({weights_fingerprint}): this replica serves them; run `serve run` again to serve one model",
                  file=sys.stderr, flush=True)
        self.lock = asyncio.Lock()  # one decode child per replica: one video at a time
        from dvfl.scratch import make_scratch_dir

        self.tmp = make_scratch_dir("serve")  # a killed replica's folder goes with the next replica

    def __del__(self):
        try:
            self.pred.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
        except Exception:
            pass

    async def _read_body(self, request: Request, limit: int, path: str) -> int | JSONResponse:
        """The body streamed into ``path`` (a waiting request holds no upload in memory): its size."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _error(413, "too_large", f"upload of {int(declared)} bytes > limit {limit} bytes")
        size = 0
        try:
            with open(path, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        return _error(413, "too_large", f"upload > limit {limit} bytes")
                    f.write(chunk)
        except OSError as exc:  # the server's disk, not the client's upload: the API's own answer, not a bare 500
            return _error(507, "storage", f"the server could not store the upload ({exc.strerror or exc})")
        return size

    def _predict(self, path: str, decode_timeout: float | None = None) -> dict:
        from dvfl.inference import PredictError

        try:
            try:
                # the length limit is judged by the decoder as soon as it knows the frames (before decoding them)
                res = self.pred.decode(path, self.views[0], timeout=decode_timeout, max_seconds=self.s.max_video_seconds)
            except PredictError as exc:  # (the decoder's text names the server's temp file: not the client's business)
                return {"status": STATUS.get(exc.reason, 422), "error": exc.reason,
                        "detail": exc.detail.replace(path, "<upload>").replace(str(self.tmp), "<tmp>")}
            try:
                probs = self.pred.probabilities([v[3] for v in res["views"]], self.views[1])
            except PredictError as exc:
                return {"status": STATUS.get(exc.reason, 422), "error": exc.reason, "detail": exc.detail}
            note = self.pred.length_note(res["src_num_frames"], res["src_fps"])  # as predict says it
            return {"status": 200, "topk": [[c, round(p, 6)] for c, p in self.pred.topk(probs, self.s.topk)],
                    "weights": self.weights,  # which model answered (a client can tell a redeployed one)
                    "views": f"{self.views[0]}x{self.views[1]}",
                    "frames": res["src_num_frames"], "fps": res["src_fps"], **({"note": note} if note else {})}
        finally:  # here, not in the request: after a time-out the work goes on and still reads it
            Path(path).unlink(missing_ok=True)

    async def __call__(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        if request.method != "POST":
            return _error(405, "method", "POST the video file as the request body")
        fd, path = tempfile.mkstemp(dir=self.tmp, suffix=".video")
        os.close(fd)
        started = []  # once the work has begun, the work removes the file (it may outlive a time-out)

        def work(seconds_left: float) -> dict:
            started.append(True)
            # the decode gets what is left of the request's time, less the slack kept for inference
            return self._predict(path, max(0.5, min(self.s.request_timeout_s, seconds_left - INFERENCE_SLACK_S)))

        # one limit for the whole request: a client that sends its body a byte at a time holds a
        # replica slot for as long as it reads, so the upload counts against it too
        budget = self.s.request_timeout_s + INFERENCE_SLACK_S
        try:
            try:
                size = await asyncio.wait_for(self._read_body(request, int(self.s.max_upload_mb * 2 ** 20), path),
                                              budget)
            except asyncio.TimeoutError:
                return _error(408, "timeout", f"the upload did not arrive within {budget:g} s")
            if isinstance(size, JSONResponse):
                return size
            if not size:
                return _error(400, D.EMPTY, "empty request body: POST the video file")
            out = await run_exclusive(self.lock, work, budget - (time.perf_counter() - t0))
        except asyncio.TimeoutError:
            return _error(408, "timeout", f"no result within {self.s.request_timeout_s:g} s")
        finally:
            if not started:
                Path(path).unlink(missing_ok=True)
        status = out.pop("status")
        if status != 200:
            return _error(status, out["error"], out["detail"])
        out["seconds"] = round(time.perf_counter() - t0, 4)
        return JSONResponse(out)


def build_app(args: dict):
    """The Serve application (``serve run dvfl.serve:build_app model=DIR`` or configs/serve.yaml)."""
    from dvfl import storage

    s = ServeSettings.from_args(dict(args))
    s.model = storage.absolute(s.model)  # (a URI stays one: abspath made s3://b/m ./s3:/b/m)
    from dvfl.artifacts import load_model

    try:  # here, once: a replica that cannot load it is restarted by Serve, over and over, a traceback each
        _, spec = load_model(s.model)
    except Exception as exc:  # noqa: BLE001  (damaged weights, a spec of another version: one line)
        raise ValueError(f"serve args: model: {s.model} cannot be loaded: {exc}") from None
    from dvfl.inference import recorded_views

    recorded = recorded_views(spec.get("inputs") or {})
    served = served_views(s.views, recorded)
    if recorded and served != recorded:  # (a test video may get another class than evaluation counted)
        print(f"[serve] answering from {served[0]}x{served[1]} views; the model's run evaluated {recorded[0]}x"
              f"{recorded[1]} (model.json): views: {EVAL_VIEWS} answers as evaluation and predict do, "
              f"{recorded[0] * recorded[1]} forward passes a request", file=sys.stderr, flush=True)
    # every replica answers from these, even one started after a rerun rewrote the model's eval_views
    s.views = f"{served[0]}x{served[1]}"
    opts = {"ray_actor_options": {"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica}}
    if s.autoscaling:
        opts["autoscaling_config"] = dict(s.autoscaling)
    else:
        opts["num_replicas"] = s.num_replicas
    return Recognizer.options(**opts).bind(asdict(s), spec.get("weights_fingerprint"))
