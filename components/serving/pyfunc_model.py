"""The MLflow pyfunc model (models-from-code): one-shot personalisation behind `predict`.

Logged by components/serving/registry.py with `python_model=<this file>`; MLflow runs this file and takes
the object passed to `mlflow.models.set_model`. Artifacts: `encoder` (TuningEncoder weights),
`config` (the resolved config), and for toy bases `base` and `backbone_clip`.

Input rows: `image` (bytes; base64 in JSON requests) and `prompt` (with S*). Params: tuning_steps,
num_images, seed, guidance_scale, num_inference_steps, alpha_blend. Output: one row per generated
image, `image` (PNG bytes), `prompt`, `seed`, in input-row order. Rows with the same image are tuned
once (one Personalizer.run per distinct image). Bad input (and running out of GPU memory) raises
MlflowException INVALID_PARAMETER_VALUE, which the scoring server answers with HTTP 400 and the message.

The model runs on the machine that serves it: device and dtype come from DATENCODER_DEVICE /
DATENCODER_DTYPE, else auto (components/runtime.py), never from the registering machine's config;
`mlflow.pyfunc.load_model(uri, model_config={"device": ..., "dtype": ...})` overrides both.
"""

from __future__ import annotations

import hashlib

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from components.errors import UserError
from components.inference.engine import Personalizer
from components.runtime import out_of_memory, serving_config
from components.serving.registry import config_from_artifacts


def reject_unknown_params() -> None:
    """MLflow drops request params that the signature does not declare, with only a log warning, so a
    typo such as `tuning_step` would run silently with the default. In this process (the model server)
    make them an error. MLflow looks the validator up as a global of mlflow.pyfunc, which we wrap;
    if a future MLflow renames it, this does nothing and unknown params are merely ignored again."""
    import mlflow.pyfunc as pyfunc

    enforce = getattr(pyfunc, "_enforce_params_schema", None)
    if enforce is None or getattr(enforce, "rejects_unknown", False):
        return

    def strict(params, schema):
        if schema is not None and isinstance(params, dict):
            known = [p.name for p in schema.params]
            unknown = sorted(str(k) for k in params if str(k) not in known)
            if unknown:
                raise MlflowException.invalid_parameter_value(
                    f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return enforce(params, schema)

    strict.rejects_unknown = True
    pyfunc._enforce_params_schema = strict


class PersonalizeModel(PythonModel):
    def load_context(self, context) -> None:
        reject_unknown_params()
        cfg = serving_config(config_from_artifacts(context.artifacts), context.model_config)
        self.personalizer = Personalizer(cfg, context.artifacts["encoder"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        try:
            return self._predict(model_input, params or {})
        except UserError as e:
            raise MlflowException.invalid_parameter_value(str(e)) from None
        except torch.OutOfMemoryError as e:
            raise MlflowException.invalid_parameter_value(str(out_of_memory(e))) from None

    def _predict(self, rows: pd.DataFrame, params: dict) -> pd.DataFrame:
        missing = {"image", "prompt"} - set(rows.columns)
        if missing:
            raise UserError(f"input is missing column(s) {', '.join(sorted(missing))}")
        settings = self.personalizer.settings(**params)
        images = [bytes(value) if isinstance(value, (bytes, bytearray)) else b"" for value in rows["image"]]
        prompts = [str(p) for p in rows["prompt"]]
        # one run per distinct image, with all of its rows' prompts: the image is tuned once
        by_image: dict[str, list[int]] = {}
        for i, data in enumerate(images):
            by_image.setdefault(hashlib.sha256(data).hexdigest(), []).append(i)
        outputs: dict[int, list] = {}
        for indices in by_image.values():
            result = self.personalizer.run(images[indices[0]], [prompts[i] for i in indices], settings)
            per_prompt = settings.num_images
            for k, i in enumerate(indices):
                outputs[i] = result.images[k * per_prompt:(k + 1) * per_prompt]
        generated = [g for i in range(len(rows)) for g in outputs[i]]
        return pd.DataFrame({"image": [g.png() for g in generated], "prompt": [g.prompt for g in generated],
                             "seed": [g.seed for g in generated]})


mlflow.models.set_model(PersonalizeModel())
