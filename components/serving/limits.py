"""The model's own limits: what one request may cost, how many requests compute at once, and when a request's
work stops. The registered pyfunc (pyfunc_model.py) applies them in `predict`, so they hold wherever the model
is served: `mlflow models serve`, an image from `mlflow models build-docker`, `datencoder serve` (uvicorn or
Ray Serve). The servers add what only a server can do (body size, a queue answered with Retry-After).

- budget (`check_budget`): distinct input images <= `serve.max_input_images`, each at most
  `serve.max_image_mb`; generated images (rows with a prompt x num_images) <= `serve.max_images`; tuning +
  sampling steps (concepts x tuning_steps + generated images x num_inference_steps) <= `serve.max_steps`.
  Over one: `OverBudget` (a UserError: HTTP 400 with the message), before any work.
- concurrency (`Slots`): `serve.max_concurrent` requests compute, `serve.max_queue` wait for a slot; the next
  is refused at once (`Busy`: HTTP 503), and so is one still waiting at its deadline.
- deadline (`deadline`, `stop_when_late`): a request's work stops at its next UNet call once its deadline has
  passed (`RequestCancelled`: HTTP 504). The UNet carries a forward pre-hook (every tuning and every sampling
  step calls the UNet) that reads the deadline of the calling thread. Deadlines nest: a server that knows when
  the request arrived sets one, the model its own (`timeout_s`), and the earlier one counts.

The limits are the serve section of the config the model was registered with, overridden where it is served
by the JSON object in DATENCODER_SERVE_LIMITS (`datencoder serve` sets it from its own config), e.g.
`DATENCODER_SERVE_LIMITS='{"max_images": 8}' mlflow models serve -m ...`.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from pydantic import ValidationError

from components.config import ServeConfig
from components.errors import UserError


LIMITS_ENV = "DATENCODER_SERVE_LIMITS"  # JSON object of serve.* keys, over the registered ones
# MLflow's scoring server answers 504 after this many seconds (`mlflow models serve --timeout`, default 60)
# but lets the work go on; the model stops its own work then too
MLFLOW_TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"


class OverBudget(UserError):
    """A request over the per-request budget (HTTP 400)."""


class Busy(Exception):
    """Every compute slot is taken and the queue is full (HTTP 503)."""


class RequestCancelled(Exception):
    """Raised inside a request's work once its deadline has passed (HTTP 504)."""


def serving_limits(registered: ServeConfig) -> ServeConfig:
    """`registered` with the serving environment's DATENCODER_SERVE_LIMITS over it."""
    given = os.environ.get(LIMITS_ENV, "").strip()
    if not given:
        return registered
    try:
        values = json.loads(given)
        if not isinstance(values, dict):
            raise ValueError("not a JSON object")
        return ServeConfig.model_validate({**registered.model_dump(), **values})
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        reason = e.errors()[0] if isinstance(e, ValidationError) else None
        what = f"{reason['loc'][0]}: {reason['msg']}" if reason else str(e)
        raise UserError(f"{LIMITS_ENV} must be a JSON object of serve.* limits ({what})") from None


def timeout_s(limits: ServeConfig) -> float:
    """How long the model lets one request run: serve.request_timeout_s, or the scoring server's own timeout
    where that is shorter (after it the server has answered 504 and nobody reads the result)."""
    try:
        server = float(os.environ.get(MLFLOW_TIMEOUT_ENV, "inf"))
    except ValueError:
        server = float("inf")
    return min(float(limits.request_timeout_s), server if server > 0 else float("inf"))


# --- the budget ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """What the budget needs of one input row."""

    image: str  # a digest of the row's image (rows with the same image are one input)
    size: int  # the image's bytes
    prompted: bool  # a row without a prompt only adds its photo to its concept
    concept: str | None = None  # rows with the same label are photos of one concept


def row(image: bytes | str, prompt, concept=None, size: int | None = None) -> Row:
    """A Row from an input row's values: image bytes (or base64 text, `size` then its decoded length)."""
    data = image.encode() if isinstance(image, str) else bytes(image)
    return Row(hashlib.sha256(data).hexdigest(), len(data) if size is None else size,
               isinstance(prompt, str) and bool(prompt), concept if isinstance(concept, str) and concept else None)


@dataclass(frozen=True)
class Cost:
    inputs: int  # distinct input images
    concepts: int  # tuned once each
    images: int  # generated
    steps: int  # tuning + sampling


def check_budget(limits: ServeConfig, rows: Sequence[Row], num_images: int, tuning_steps: int,
                 num_inference_steps: int) -> Cost:
    """The cost of a request, or OverBudget naming the limit it is over (module docstring)."""
    if not rows:
        raise OverBudget("the request has no rows")
    concepts = {r.concept or r.image for r in rows}
    inputs = {r.image: r.size for r in rows}
    images = sum(r.prompted for r in rows) * num_images
    cost = Cost(len(inputs), len(concepts), images, len(concepts) * tuning_steps + images * num_inference_steps)
    largest = max(inputs.values())
    if largest > limits.max_image_mb * 2**20:
        raise OverBudget(f"an input image has {largest:,} bytes; the limit is {limits.max_image_mb:g} MiB per image "
                         f"(serve.max_image_mb)")
    if cost.inputs > limits.max_input_images:
        raise OverBudget(f"the request has {cost.inputs} distinct input images; the limit is "
                         f"{limits.max_input_images} per request (serve.max_input_images)")
    if cost.images > limits.max_images:
        raise OverBudget(f"the request asks for {cost.images} images (rows with a prompt x num_images); the limit "
                         f"is {limits.max_images} per request (serve.max_images)")
    if cost.steps > limits.max_steps:
        raise OverBudget(f"the request asks for {cost.steps} tuning + sampling steps; the limit is "
                         f"{limits.max_steps} per request (serve.max_steps)")
    return cost


# --- concurrency --------------------------------------------------------------------------------------
class Slots:
    """At most `concurrent` holders at once and `queue` waiting; beyond that `hold` raises Busy at once."""

    def __init__(self, concurrent: int, queue: int):
        self.concurrent, self.queue = concurrent, queue
        self.active = self.waiting = 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, until: float | None = None) -> Iterator[None]:
        """A slot for the block; waits in the queue at most until `until` (time.monotonic()), then Busy."""
        with self._changed:
            if self.active >= self.concurrent:
                if self.waiting >= self.queue:
                    raise Busy(f"{self.active} request(s) computing and {self.waiting} waiting; retry later")
                self.waiting += 1
                try:
                    while self.active >= self.concurrent:
                        left = None if until is None else until - time.monotonic()
                        if left is not None and left <= 0:
                            raise Busy("no free compute slot before the request's deadline; retry later")
                        self._changed.wait(left)
                finally:
                    self.waiting -= 1
            self.active += 1
        try:
            yield
        finally:
            with self._changed:
                self.active -= 1
                self._changed.notify()


# --- the deadline -------------------------------------------------------------------------------------
_thread = threading.local()  # .deadline: time.monotonic() after which the calling thread's work stops


@contextmanager
def deadline(at: float | None) -> Iterator[float | None]:
    """Within the block, the calling thread's work stops at its next UNet call after `at` (time.monotonic());
    an enclosing deadline that is earlier still counts. Yields the deadline in force."""
    outer = getattr(_thread, "deadline", None)
    _thread.deadline = min(t for t in (outer, at) if t is not None) if (outer, at) != (None, None) else None
    try:
        yield _thread.deadline
    finally:
        _thread.deadline = outer


def current_deadline() -> float | None:
    return getattr(_thread, "deadline", None)


def stop_when_late(module, args) -> None:
    """Forward pre-hook on the UNet (`watch`): every tuning step and every sampling step calls it."""
    at = getattr(_thread, "deadline", None)
    if at is not None and time.monotonic() > at:
        raise RequestCancelled("the request ran past its deadline")


def watch(unet) -> None:
    """Make `unet`'s calls stop a request whose deadline has passed."""
    unet.register_forward_pre_hook(stop_when_late)
