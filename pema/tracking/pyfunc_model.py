"""The registered PEMA translator, logged with MLflow's "models from code": this file IS the model definition, and
the adapter, head bundle and config travel as plain artifact files (safetensors + JSON + YAML). Nothing is pickled.

The ``pema`` package travels with the model (``code_paths``). With ``resources.owner_url`` in the config artifact
the PLM's next-token distributions and keys come from the owner's service (the token in the environment variable
``resources.owner_token_env``) and no PLM weights are needed here; without it the base model (``model.model_id``)
must be available locally.

    mlflow.pyfunc.load_model("models:/pema-wmt22@champion").predict(["An English sentence."])  # -> German text
"""
from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


def _sources(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "iloc"):  # a pandas DataFrame (one string column) or Series
        column = model_input.iloc[:, 0] if model_input.ndim == 2 else model_input
        return [str(x) for x in column.tolist()]
    return [str(x) for x in model_input]


class PemaTranslator(PythonModel):
    """text -> text: the PLM mixed with the PEMA adapter under the registered lambda schedule (``decode.pema``, the
    recommended PEMA configuration)."""

    def load_context(self, context):
        import yaml

        from pema.adapter.io import load_adapter, load_head
        from pema.config import config_from_dict
        from pema.stages.inputs import plm_or_client

        paths = context.artifacts
        with open(paths["config"], encoding="utf-8") as f:
            self.cfg = config_from_dict(yaml.safe_load(f))
        # the PLM here, or with resources.owner_url in the config the owner's service (no PLM weights here)
        self.model, self.tokenizer = plm_or_client(self.cfg)
        device = "cpu" if self.cfg.resources.owner_url else next(self.model.parameters()).device
        head, head_meta = load_head(paths["head"])
        adapter, adapter_meta = load_adapter(paths["adapter"], head_meta)
        self.head, self.adapter = head.to(device), adapter.to(device)
        self.ratio = adapter_meta["target_source_ratio"]

    def predict(self, context, model_input, params=None):
        from pema.stages.decode import translate

        hyps, _ = translate(self.model, self.tokenizer, _sources(model_input), self.cfg, adapter=self.adapter,
                            head=self.head, schedule=self.cfg.decode.pema, ratio=self.ratio)
        return hyps


mlflow.models.set_model(PemaTranslator())
