"""The MLflow pyfunc model (models-from-code): one-shot personalisation behind `predict`.

Logged by components/serving/registry.py with `python_model=<this file>`; MLflow runs this file and takes
the object passed to `mlflow.models.set_model`. Artifacts: `encoder` (TuningEncoder weights),
`config` (the resolved config), and for toy bases `base` and `backbone_clip`.

Input rows: `image` (bytes; base64 in JSON requests), `prompt` (with S*) and optionally `concept`: rows
with the same `concept` label are several photos of one concept (a row with an empty prompt only adds
its photo). Params: tuning_steps, num_images, seed, guidance_scale, num_inference_steps, alpha_blend.
Output: one row per generated image, `image` (PNG bytes), `prompt`, `seed`, in input-row order. Each
concept is tuned once (one Personalizer.run per concept label, or per distinct image where rows have
none). Params are checked by MLflow against the signature's ParamSchema (types; a name it does not
declare is dropped with a warning, MLflow's rule) and here against their ranges. Bad input raises
MlflowException INVALID_PARAMETER_VALUE (running out of GPU memory too), which the scoring server answers
with HTTP 400 and the message.

The model guards itself wherever it is served (components/serving/limits.py): a request over the budget
(input images, their size, generated images, steps) is refused before any work (INVALID_PARAMETER_VALUE:
400); beyond `serve.max_concurrent` computing and `serve.max_queue` waiting it is refused at once
(TEMPORARILY_UNAVAILABLE: 503); past its deadline its work stops at the next UNet call (DEADLINE_EXCEEDED:
504).

The model runs on the machine that serves it: device and dtype come from DATENCODER_DEVICE /
DATENCODER_DTYPE, else auto (components/runtime.py), never from the registering machine's config;
`mlflow.pyfunc.load_model(uri, model_config={"device": ..., "dtype": ...})` overrides both.
"""

from __future__ import annotations

import hashlib
import time

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, TEMPORARILY_UNAVAILABLE
from mlflow.pyfunc import PythonModel

from components.errors import UserError
from components.inference.engine import Personalizer
from components.runtime import out_of_memory, serving_runtime
from components.serving import limits
from components.serving.registry import config_from_artifacts


class PersonalizeModel(PythonModel):
    def load_context(self, context) -> None:
        cfg = config_from_artifacts(context.artifacts, serving_runtime(context.model_config))
        self.limits = limits.serving_limits(cfg.serve)
        self.slots = limits.Slots(self.limits.max_concurrent, self.limits.max_queue)
        self.personalizer = Personalizer(cfg.engine, context.artifacts["encoder"])
        limits.watch(self.personalizer.pipe.unet)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        try:
            return self._predict(model_input, params or {})
        except UserError as e:
            raise MlflowException.invalid_parameter_value(str(e)) from None
        except limits.Busy as e:
            raise MlflowException(str(e), error_code=TEMPORARILY_UNAVAILABLE) from None
        except limits.RequestCancelled:
            raise MlflowException("the request ran past its deadline (serve.request_timeout_s, or the server's own "
                                  "timeout where that is shorter); ask for fewer images or steps",
                                  error_code=DEADLINE_EXCEEDED) from None
        except torch.OutOfMemoryError as e:
            raise MlflowException.invalid_parameter_value(str(out_of_memory(e))) from None

    def _predict(self, rows: pd.DataFrame, params: dict) -> pd.DataFrame:
        missing = {"image", "prompt"} - set(rows.columns)
        if missing:
            raise UserError(f"input is missing column(s) {', '.join(sorted(missing))}")
        settings = self.personalizer.settings(**params)
        images = [bytes(value) if isinstance(value, (bytes, bytearray)) else b"" for value in rows["image"]]
        prompts = ["" if p is None else str(p) for p in rows["prompt"]]
        labels = [c if isinstance(c, str) and c else None
                  for c in (rows["concept"] if "concept" in rows.columns else [None] * len(rows))]
        limits.check_budget(self.limits, [limits.row(*values) for values in zip(images, prompts, labels)],
                            settings.num_images, settings.tuning_steps, settings.num_inference_steps)
        with limits.deadline(time.monotonic() + limits.timeout_s(self.limits)) as until, self.slots.hold(until):
            return self._run(images, prompts, labels, settings)

    def _run(self, images: list[bytes], prompts: list[str], labels: list[str | None], settings) -> pd.DataFrame:
        # one run per concept, with all of its rows' prompts: the concept is tuned once. A concept is the
        # rows with the same `concept` label (its photos: their distinct images, in row order), or without
        # a label the rows with the same image
        groups: dict[str, list[int]] = {}
        for i, data in enumerate(images):
            key = f"label:{labels[i]}" if labels[i] else hashlib.sha256(data).hexdigest()
            groups.setdefault(key, []).append(i)
        outputs: dict[int, list] = {}
        for indices in groups.values():
            photos = list(dict.fromkeys(images[i] for i in indices))
            asked = [i for i in indices if prompts[i]]  # a row without a prompt only adds its photo
            result = self.personalizer.run(photos, [prompts[i] for i in asked], settings)
            per_prompt = settings.num_images
            for k, i in enumerate(asked):
                outputs[i] = result.images[k * per_prompt:(k + 1) * per_prompt]
        generated = [g for i in range(len(images)) for g in outputs.get(i, [])]
        return pd.DataFrame({"image": [g.png() for g in generated], "prompt": [g.prompt for g in generated],
                             "seed": [g.seed for g in generated]})


mlflow.models.set_model(PersonalizeModel())
