"""The registered pyfunc runs where it is served: DATENCODER_DEVICE / DATENCODER_DTYPE, else auto, never the
registering machine's runtime; an explicit model_config (the CLI's --device/--dtype) wins."""

from __future__ import annotations

import io

import pandas as pd
import torch
from PIL import Image
from smoke_models import isolated_store, smoke_setup, solid_png

from components.config import RuntimeConfig, variant_config


def test_pyfunc_takes_device_and_dtype_from_the_serving_environment(tmp_path, monkeypatch):
    import mlflow

    from components.serving import registry

    _, cfg, encoder = smoke_setup(tmp_path)
    store = isolated_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    mlflow.set_tracking_uri(store)  # the fluent API below: this test's store, whatever an earlier test set
    monkeypatch.delenv("DATENCODER_DEVICE", raising=False)
    monkeypatch.delenv("DATENCODER_DTYPE", raising=False)
    registered = variant_config(cfg, runtime={"dtype": "float16"})  # what the registering machine used
    experiment = mlflow.get_experiment_by_name(registry.EXPERIMENT).experiment_id
    with mlflow.start_run(experiment_id=experiment):
        uri = registry.log_model(registered, encoder).model_uri

    # trust: a model logged here without registering has no recorded code hash (the trust check is not the point)
    assert registry.load_pyfunc_personalizer(uri, trust=True).runtime.dtype == torch.float32  # auto on this CPU
    monkeypatch.setenv("DATENCODER_DTYPE", "bfloat16")
    model = mlflow.pyfunc.load_model(uri)
    personalizer = model.unwrap_python_model().personalizer
    assert personalizer.runtime.describe() == {"device": "cpu", "dtype": "bfloat16"}
    assert personalizer.pipe.unet.dtype == torch.bfloat16
    out = model.predict(pd.DataFrame({"image": [solid_png((220, 40, 40))], "prompt": ["S* on a beach"]}),
                        params={"tuning_steps": 1, "num_inference_steps": 1})
    assert Image.open(io.BytesIO(out["image"][0])).size == (64, 64)
    explicit = registry.load_pyfunc_personalizer(uri, trust=True, runtime=RuntimeConfig(dtype="float32"))
    assert explicit.runtime.dtype == torch.float32 and explicit.pipe.unet.dtype == torch.float32
