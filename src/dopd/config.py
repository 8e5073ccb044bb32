"""Every setting of a training run; over 450 lines on purpose: each key, its help and its check in one place.

The settings are dataclasses, loaded from YAML with dotted `key=value` overrides (OmegaConf does the parsing and
type checks), validated before any model loads, and saved with each run. The comment after each field is its help
text: `dopd train --help` and the key table of docs/training.md are made from it. Every key is defined here once,
with its help, and the check of its value sits beside the dataclasses, so that a key and what may be given for it
are read in one place.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .objectives import Objective, ObjectiveConfig, build_objective
from .prompts import DEFAULT_PRIVILEGED_TEMPLATE, check_template

# Every linear layer of a Qwen3 (and Llama-style) decoder block.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    enabled: bool = False  # train PEFT LoRA adapters instead of every student weight (the privileged pass uses them)
    r: int = 16  # adapter rank
    alpha: int = 32  # scaling numerator (the update is scaled by alpha / r)
    dropout: float = 0.0  # dropout on the adapter input (the no-gradient scoring passes run without it)
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # module names that get adapters
    save_merged: bool = False  # also write the base with the adapter merged (merged/) beside each saved adapter


@dataclass
class TeacherServerConfig:
    url: str | None = None  # a vLLM server that serves the teacher (e.g. http://10.0.0.3:8001); null: a local teacher
    model: str | None = None  # the served model's name (default: model.teacher)
    top_k: int | None = None  # log-probs per token to request (null: objective.top_k, or 1 if no Top-K term reads it)
    timeout: float = 600.0  # seconds per request
    retries: int = 3  # attempts per request when the server cannot be reached
    max_sequences_per_request: int = 32  # sequences sent in one /v1/completions request
    max_concurrency: int = 4  # requests in flight at once
    api_key: str | None = None  # bearer token for a server started with --api-key (default: $VLLM_API_KEY)


@dataclass
class ModelConfig:
    student: str = ""  # student model: a local path or a hub name (required)
    teacher: str | None = None  # teacher model: a local path or a hub name (required unless the method has no teacher)
    teachers: dict[str, Any] = field(default_factory=dict)  # several teachers: name -> path, or {model, template, ...}
    tokenizer: str | None = None  # tokenizer path or hub name (default: the student's)
    dtype: str = "float32"  # float32 | bfloat16 | float16: the teacher's weights (the student keeps fp32 weights)
    trust_remote_code: bool = False  # passed to from_pretrained
    attn_implementation: str | None = None  # e.g. sdpa, flash_attention_2 (default: transformers' choice)
    gradient_checkpointing: bool = False  # recompute the student's activations in backward to save memory
    kind: str = "auto"  # causal_lm | image_text (AutoModelForImageTextToText) | auto: image_text with data.image_column
    freeze_vision: bool = True  # image_text: keep the student's vision tower frozen (LoRA never adapts it)
    lora: LoraConfig = field(default_factory=LoraConfig)
    teacher_server: TeacherServerConfig = field(default_factory=TeacherServerConfig)


@dataclass
class DataConfig:
    path: str = ""  # JSONL/JSON/Parquet/CSV file, a save_to_disk directory, or a hub data set name (required)
    name: str | None = None  # hub data set configuration name
    split: str = "train"  # split to read
    prompt_column: str = "prompt"  # the question: a string or a list of chat messages
    privileged_column: str = "privileged_context"  # the privileged input, seen only by the privileged passes
    answer_column: str = "answer"  # optional reference answer (kept for evaluation and samples)
    image_column: str | None = None  # images (path, URL or datasets Image): every pass reads the row's image
    box_column: str | None = None  # pixel boxes [x1, y1, x2, y2] per row (or bbox dicts), checked inside the image
    draw_box: bool = False  # draw the box_column boxes on the image the privileged passes see
    teacher_template: str = DEFAULT_PRIVILEGED_TEMPLATE  # how the teacher's prompt inserts the privileged context
    self_template: str = DEFAULT_PRIVILEGED_TEMPLATE  # the same for the privileged student pass
    use_chat_template: bool | None = None  # render prompts with the tokenizer's chat template (default: if it has one)
    teacher_chat_template: bool = False  # render the teacher's prompts with its own chat template when the two differ
    teacher_column: str = "teacher"  # with model.teachers: the column that names each row's teacher
    max_prompt_length: int = 1024  # longest prompt in tokens, privileged prompts included
    drop_long_prompts: bool = False  # drop prompts over max_prompt_length instead of stopping with an error
    max_samples: int | None = None  # use only the first N rows
    shuffle: bool = True  # visit prompts in a seeded random order, reshuffled each epoch


@dataclass
class VLLMConfig:
    mode: str = "colocate"  # colocate (vLLM inside each training process, sharing its GPU) | server (`vllm serve`)
    server_base_url: str | None = None  # server mode: e.g. http://10.0.0.2:8000 (overrides host and port)
    server_host: str = "0.0.0.0"  # server mode: the server's host
    server_port: int = 8000  # server mode: the server's port
    server_timeout: float = 240.0  # server mode: seconds to wait for the server to come up
    group_port: int = 51216  # server mode: port of the NCCL group that streams the student's weights
    gpu_memory_utilization: float = 0.3  # colocate: share of each GPU vLLM may take (the rest is for training)
    tensor_parallel_size: int = 1  # colocate: GPUs per vLLM engine (must divide the number of processes)
    enable_sleep_mode: bool = True  # colocate: free vLLM's weights and KV cache between rollouts
    max_model_len: int | None = None  # longest prompt + completion in vLLM (null: max_prompt_length + max_new_tokens)


@dataclass
class RolloutConfig:
    backend: str = "hf"  # hf (transformers generate on the training model) | vllm (needs `pip install "dopd[vllm]"`)
    num_generations: int = 4  # completions sampled per prompt
    max_new_tokens: int = 256  # longest completion
    temperature: float = 1.0  # sampling temperature; 0 means greedy
    top_p: float = 1.0  # nucleus sampling
    top_k: int = 0  # sample from the top-k tokens only (0: off)
    batch_size: int = 64  # prompts per generate call (hf backend)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class OptimConfig:
    lr: float = 5e-6  # AdamW learning rate (paper: 5e-6)
    weight_decay: float = 0.0  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    schedule: str = "cosine"  # cosine | constant, after the warm-up
    warmup_steps: int = 0  # linear warm-up steps
    max_grad_norm: float | None = 1.0  # gradient clipping (null: off)


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    prompts_per_step: int = 128  # prompts per optimizer step over all processes (each gets num_generations rollouts)
    micro_batch_size: int = 8  # sequences per forward/backward pass (gradient accumulation over the rest)
    max_tokens_per_micro_batch: int = 0  # pack micro-batches by padded prompt+completion tokens instead (0: off)
    seed: int = 0  # seeds data order, sampling and initialization
    loss_form: str = "chunked"  # chunked (hidden states and heads, a chunk at a time) | plain (all full logits at once)
    chunk_size: int | None = None  # tokens per chunk of the chunked loss and the scoring passes (null: automatic)
    device: str | None = None  # force a device, e.g. cpu (default: accelerate's choice)
    mixed_precision: str = "no"  # no | bf16 | fp16: autocast of the student's passes (weights, AdamW, loss: fp32)


@dataclass
class LoggingConfig:
    output_dir: str = ""  # the run directory (required); holds config, metrics, samples, checkpoints
    overwrite: bool = False  # replace a run directory that holds another run
    report_to: list[str] = field(default_factory=list)  # extra trackers: tensorboard, wandb
    project: str = "dopd"  # tracker project name
    run_name: str | None = None  # tracker run name (default: the directory name)
    log_every: int = 1  # steps between metric lines
    sample_every: int = 10  # steps between saved samples with token-level routing (0: never)
    num_samples: int = 4  # completions saved each time
    progress_bar: bool = True  # a progress bar with the loss and the step
    answer_pattern: str | None = None  # regex of an answering ending (completion/early_eos counts those without)


@dataclass
class CheckpointConfig:
    save_every: int = 50  # steps between checkpoints (0: only the final model)
    keep_last: int = 2  # checkpoints kept on disk (older ones are deleted)
    resume: bool = False  # continue from the last checkpoint in output_dir
    keep_best: bool = False  # also keep the model of the best validation accuracy in best/ (needs eval.every)


@dataclass
class EvalConfig:
    every: int = 0  # steps between validations, also run before the first step and after the last (0: off)
    before_train: bool = True  # validate the student before the first step (step 0)
    path: str = ""  # held-out data set: a file, a save_to_disk directory or a hub name (required when every > 0)
    name: str | None = None  # hub data set configuration name
    split: str = "test"  # split to read
    prompt_column: str = "prompt"  # the question: a string or a list of chat messages
    answer_column: str = "answer"  # the reference answer the checker reads (required)
    max_prompts: int | None = None  # use only the first N rows (null: all)
    samples: int = 1  # completions per prompt (pass@k for k up to samples)
    temperature: float = 0.0  # sampling temperature; 0 means greedy
    top_p: float = 1.0  # nucleus sampling
    top_k: int = 0  # sample from the top-k tokens only (0: off)
    max_new_tokens: int = 1024  # longest completion
    batch_size: int = 16  # prompts per generate call (hf backend)
    checker: str = "math"  # math | exact | lab:TASK, as `dopd eval --checker`
    seed: int = 0  # sampling seed of every validation


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class ConfigError(ValueError):
    """A setting that cannot work; the message names the key and the fix."""


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None, **sections: Any) -> Config:
    """A validated `Config` from a YAML file, dotted `key=value` overrides and/or keyword sections (dicts)."""
    merged = OmegaConf.structured(Config)
    try:
        if path is not None:
            merged = OmegaConf.merge(merged, _read_yaml(path))
        if sections:
            merged = OmegaConf.merge(merged, OmegaConf.create(sections))
        if overrides:
            bad = [item for item in overrides if "=" not in item]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not of the form key=value (e.g. objective.method=opd)")
            for item in overrides:
                try:
                    parsed = OmegaConf.from_dotlist([item])
                except Exception as error:  # yaml's parse errors: a value such as {prompt} needs quotes
                    raise ConfigError(
                        f"override {item!r} could not be parsed ({type(error).__name__}); quote a value that starts "
                        """with '{' or '[' as a string, e.g. data.teacher_template='"{prompt} {privileged_context}"'"""
                    ) from None
                merged = OmegaConf.merge(merged, parsed)
        config: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        first = str(error).splitlines()[0]
        raise ConfigError(f"config key {key}: {first}" if key else first) from None
    resolve(config)
    validate(config)
    return config


def _read_yaml(path) -> Any:
    """The YAML file as an OmegaConf mapping; a missing file, a file that is not YAML or not a mapping of sections is
    one clear error."""
    import yaml

    if not os.path.exists(path):
        raise ConfigError(f"--config {path} does not exist")
    try:
        with open(path) as handle:
            loaded = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigError(f"--config {path} is not valid YAML{where}: {problem}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"--config {path} holds a {type(loaded).__name__}, not a mapping of sections (model:, data:, ...)"
        )
    return OmegaConf.create(loaded)


def resolve(config: Config) -> Config:
    """Fill the settings whose default depends on other settings, in place (they are saved with the run):
    `train.mixed_precision` read by YAML as false is `no`; a served teacher gives its top-K only, so
    `objective.teacher_full` unset becomes `topk_bucket` (with model.teachers, when any teacher is served).
    Returns the config."""
    if config.train.mixed_precision in ("False", "false"):  # YAML reads a bare `no` as false
        config.train.mixed_precision = "no"
    served = config.model.teacher_server.url or any(
        isinstance(entry, dict) and entry.get("server_url") for entry in config.model.teachers.values()
    )
    if served and config.objective.teacher_full is None:  # any served teacher: one objective for all
        config.objective.teacher_full = "topk_bucket"
    return config


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def flat_dict(config: Config) -> dict:
    """`{"section.key": value}` with values a tracker can show (lists and nested settings as text)."""
    flat = {}
    for section, values in to_dict(config).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def validate(config: Config) -> None:
    """Check every setting that can be checked without loading a model, changing none (`resolve` fills the
    defaults that depend on other settings). The objective's options are checked by building it; the trainer
    builds its own."""
    try:
        objective = build_objective(config.objective)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    m, d, r, o, t, lg, ck = (
        config.model,
        config.data,
        config.rollout,
        config.optim,
        config.train,
        config.logging,
        config.checkpoint,
    )
    if not m.student:
        raise ConfigError("model.student is required: a local path or a hub name of the student model")
    if m.teachers:
        _check_teachers(config, objective)
    elif m.teacher_server.url:
        _check_teacher_server(config, objective)
    elif objective.needs_teacher_model and not m.teacher:
        raise ConfigError(f"model.teacher is required by method {config.objective.method!r}: a path or a hub name")
    if m.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype = {m.dtype!r} is unknown; use float32, bfloat16 or float16")
    if not d.path:
        raise ConfigError("data.path is required: a JSONL/Parquet file, a save_to_disk directory or a hub name")
    for key in ("teacher_template", "self_template"):
        try:
            check_template(getattr(d, key), f"data.{key}")
        except ValueError as error:
            raise ConfigError(str(error)) from None
    _positive(d.max_prompt_length, "data.max_prompt_length")
    _check_images(config)
    _check_lora(m.lora)
    _check_rollout_backend(config)
    if objective.has_reward and r.num_generations < 2:
        raise ConfigError(
            f"objective.reward needs rollout.num_generations >= 2 (it is {r.num_generations}): the advantage is each "
            "reward against the other rollouts of its prompt, and one rollout's is always 0"
        )
    if objective.rollout_model == "teacher" and r.backend != "hf":
        raise ConfigError(
            f"objective.method = {config.objective.method!r} samples from the teacher, which rollout.backend = "
            f"{r.backend} does not serve (its engine holds the student); use rollout.backend=hf"
        )
    if r.top_k < 0:
        raise ConfigError(f"rollout.top_k = {r.top_k} must be >= 0 (0: off)")
    if t.mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"train.mixed_precision = {t.mixed_precision!r} is unknown; use no, bf16 or fp16")
    _positive(r.num_generations, "rollout.num_generations")
    _positive(r.max_new_tokens, "rollout.max_new_tokens")
    _positive(r.batch_size, "rollout.batch_size")
    if r.temperature < 0:
        raise ConfigError(f"rollout.temperature = {r.temperature} must be >= 0 (0: greedy)")
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.top_p = {r.top_p} must be in (0, 1]")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr = {o.lr} must be positive")
    if o.schedule not in ("cosine", "constant"):
        raise ConfigError(f"optim.schedule = {o.schedule!r} is unknown; use cosine or constant")
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas = {o.betas} must have two values, e.g. [0.9, 0.999]")
    if o.warmup_steps < 0 or o.warmup_steps > t.steps:
        raise ConfigError(f"optim.warmup_steps = {o.warmup_steps} must be between 0 and train.steps = {t.steps}")
    _positive(t.steps, "train.steps")
    _positive(t.prompts_per_step, "train.prompts_per_step")
    _positive(t.micro_batch_size, "train.micro_batch_size")
    if t.max_tokens_per_micro_batch < 0:
        raise ConfigError(f"train.max_tokens_per_micro_batch = {t.max_tokens_per_micro_batch} must be >= 0 (0: off)")
    if t.loss_form not in ("chunked", "plain"):
        raise ConfigError(f"train.loss_form = {t.loss_form!r} is unknown; use chunked or plain")
    if t.chunk_size == 0:
        raise ConfigError("train.chunk_size = 0 no longer selects the plain form; set train.loss_form=plain instead")
    if t.chunk_size is not None and t.chunk_size < 0:
        raise ConfigError(f"train.chunk_size = {t.chunk_size} must be positive (null: automatic)")
    if not lg.output_dir:
        raise ConfigError("logging.output_dir is required: the run directory")
    for tracker in lg.report_to:
        if tracker not in ("tensorboard", "wandb"):
            raise ConfigError(f"logging.report_to has {tracker!r}; known: tensorboard, wandb")
    _positive(lg.log_every, "logging.log_every")
    if lg.answer_pattern is not None:
        try:
            re.compile(lg.answer_pattern)
        except re.error as error:
            raise ConfigError(
                f"logging.answer_pattern = {lg.answer_pattern!r} is not a regular expression: {error}"
            ) from None
    for key, value in (
        ("logging.sample_every", lg.sample_every),
        ("logging.num_samples", lg.num_samples),
        ("checkpoint.save_every", ck.save_every),
    ):
        if value < 0:
            raise ConfigError(f"{key} = {value} must be >= 0 (0: never)")
    if ck.resume and lg.overwrite:
        raise ConfigError("checkpoint.resume and logging.overwrite are both true; choose one")
    _positive(ck.keep_last, "checkpoint.keep_last")
    _check_eval(config)


def _check_eval(config: Config) -> None:
    """The validation settings alone; the data set's columns are checked when the trainer reads it, before any
    model loads (`validation.Validation.prepare`)."""
    e = config.eval
    if e.every < 0:
        raise ConfigError(f"eval.every = {e.every} must be >= 0 (0: no validation)")
    if config.checkpoint.keep_best and not e.every:
        raise ConfigError("checkpoint.keep_best needs validation: set eval.every and eval.path")
    if not e.every:
        return
    if not e.path:
        raise ConfigError("eval.every is set but eval.path is not: give the held-out data set (a file or a hub name)")
    if is_image_text(config):
        raise ConfigError(
            "eval.every: validation reads text prompts and an image-text run has images; set eval.every=0 and score "
            "the checkpoints with `dopd bench --benchmarks mmmu` (docs/evaluation.md)"
        )
    for key, value in (("eval.samples", e.samples), ("eval.max_new_tokens", e.max_new_tokens)):
        _positive(value, key)
    _positive(e.batch_size, "eval.batch_size")
    if e.max_prompts is not None:
        _positive(e.max_prompts, "eval.max_prompts")
    if e.temperature < 0 or not 0 < e.top_p <= 1 or e.top_k < 0:
        raise ConfigError("eval.temperature must be >= 0, eval.top_p in (0, 1] and eval.top_k >= 0")
    if e.temperature == 0 and e.samples > 1:
        raise ConfigError(
            f"eval.samples = {e.samples} with eval.temperature = 0 gives identical greedy answers; set "
            "eval.temperature (e.g. 0.6) or eval.samples=1"
        )
    if e.checker not in ("math", "exact") and not (e.checker.startswith("lab:") and len(e.checker) > 4):
        raise ConfigError(f"eval.checker = {e.checker!r} is unknown; use math, exact or lab:TASK (e.g. lab:arith)")


def _check_teacher_server(config: Config, objective: Objective) -> None:
    """A served teacher gives the sampled token's log-prob and a top-K: check that the objective can live on that
    (`resolve` sets `objective.teacher_full=topk_bucket` when it is unset)."""
    m, ts, o = config.model, config.model.teacher_server, config.objective
    if objective.rollout_model == "teacher":
        raise ConfigError(
            f"model.teacher_server.url is set but method {o.method!r} samples from the teacher, which needs the "
            "teacher's weights in the trainer; unset model.teacher_server.url"
        )
    if not objective.needs_teacher:
        raise ConfigError(
            f"model.teacher_server.url is set but method {o.method!r} reads no teacher; unset it or pick a method "
            "with a teacher"
        )
    if not (ts.model or m.teacher):
        raise ConfigError("model.teacher_server.url needs the served model's name: set model.teacher_server.model")
    if o.teacher_full == "full":
        raise ConfigError(
            "objective.teacher_full = full needs the teacher's full distribution, which a served teacher does not "
            "give (only its top-K); set objective.teacher_full=topk_bucket or serve no teacher"
        )
    if o.teacher_full is None:
        raise ConfigError(
            "objective.teacher_full is unset with a served teacher; load the config with load_config "
            "(config.resolve sets it to topk_bucket)"
        )
    teacher_topk = any(term.target == "teacher" and term.granularity == "topk" for term in objective.terms)
    if teacher_topk and o.topk_support != "target":
        raise ConfigError(
            f"objective.topk_support = {o.topk_support!r} needs the teacher's log-probs on the student's top tokens, "
            "which a served teacher does not give; use objective.topk_support=target"
        )
    if teacher_topk and ts.top_k is not None and ts.top_k < o.top_k:
        raise ConfigError(
            f"model.teacher_server.top_k = {ts.top_k} is below objective.top_k = {o.top_k}; raise it (the server "
            "needs --max-logprobs as large) or leave it null"
        )
    if o.temperature != 1.0:
        raise ConfigError(
            f"objective.temperature = {o.temperature}: a served teacher's log-probs are at temperature 1 (vLLM's "
            "raw log-probs); use objective.temperature=1 or a local teacher"
        )
    if config.train.loss_form == "plain":
        raise ConfigError(
            "train.loss_form = plain reads full teacher logits; a served teacher needs the chunked form: "
            "set train.loss_form=chunked"
        )
    if is_image_text(config):
        raise ConfigError("model.teacher_server does not carry images; image-text runs need a local teacher")
    if ts.top_k is not None:
        _positive(ts.top_k, "model.teacher_server.top_k")
    _positive(ts.timeout, "model.teacher_server.timeout")
    _positive(ts.retries, "model.teacher_server.retries")
    _positive(ts.max_sequences_per_request, "model.teacher_server.max_sequences_per_request")
    _positive(ts.max_concurrency, "model.teacher_server.max_concurrency")


# The keys of one entry of model.teachers given as a mapping (a string is its `model`).
TEACHER_KEYS = {
    "model": "the teacher: a local path or a hub name (with a server: the served model's name)",
    "template": "how its prompt inserts the privileged context (default: data.teacher_template)",
    "chat_template": "render its prompts with its own chat template (default: data.teacher_chat_template)",
    "server_url": "a vLLM server that serves it (default: model.teacher_server.url; null there: a local teacher)",
}


def teacher_entry(name: str, entry: Any) -> dict[str, Any]:
    """One entry of model.teachers as a mapping of `TEACHER_KEYS` (a string is its `model`); one line otherwise."""
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict):
        entry = dict(entry) if hasattr(entry, "items") else entry
    where = f"model.teachers.{name}"
    if not isinstance(entry, dict) or not isinstance(entry.get("model"), str) or not entry["model"]:
        raise ConfigError(
            f"{where} must be a path or hub name, or a mapping with model: PATH (and optionally template, "
            "chat_template, server_url)"
        )
    unknown = sorted(set(entry) - set(TEACHER_KEYS))
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {unknown}; known: {', '.join(TEACHER_KEYS)}")
    if entry.get("template") is not None:
        try:
            check_template(entry["template"], f"{where}.template")
        except ValueError as error:
            raise ConfigError(str(error)) from None
    return entry


SINGLE_TEACHER = None  # the name of the one teacher of model.teacher (teachers.py)


def teacher_views(config: Config) -> dict[str | None, Config]:
    """Each teacher's view of the config, by name (`{SINGLE_TEACHER: config}` without `model.teachers`)."""
    m, d = config.model, config.data
    if not m.teachers:
        return {SINGLE_TEACHER: config}
    views = {}
    for name, raw in m.teachers.items():
        entry = teacher_entry(name, raw)
        server = replace(m.teacher_server, url=entry.get("server_url") or m.teacher_server.url, model=None)
        model = replace(m, teacher=entry["model"], teachers={}, teacher_server=server)
        chat = entry.get("chat_template")
        data = replace(
            d,
            teacher_template=entry.get("template") or d.teacher_template,
            teacher_chat_template=d.teacher_chat_template if chat is None else bool(chat),
        )
        views[name] = replace(config, model=model, data=data)
    return views


def _check_teachers(config: Config, objective: Objective) -> None:
    """model.teachers: names, entries, and what a teacher per row cannot do; each served teacher's view is checked
    as the single served teacher is (`teachers.teacher_views`)."""
    m = config.model
    if m.teacher:
        raise ConfigError(
            "model.teacher and model.teachers are both set; give one teacher with model.teacher or several with "
            "model.teachers (name -> path), not both"
        )
    bad = [name for name in m.teachers if not isinstance(name, str) or not name.strip() or "/" in name]
    if bad:
        raise ConfigError(f"model.teachers has the name {bad[0]!r}; a teacher's name is a non-empty word without '/'")
    if m.teacher_server.model:
        raise ConfigError(
            "model.teacher_server.model is set with model.teachers; name each teacher's served model as its "
            "model.teachers.NAME (or .model)"
        )
    for view in teacher_views(config).values():
        if view.model.teacher_server.url:
            _check_teacher_server(view, objective)
        if not objective.needs_teacher_model:
            break


def _check_lora(lora: LoraConfig) -> None:
    if not lora.enabled:
        return
    _positive(lora.r, "model.lora.r")
    _positive(lora.alpha, "model.lora.alpha")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"model.lora.dropout = {lora.dropout} must be in [0, 1)")
    if not lora.target_modules:
        raise ConfigError("model.lora.target_modules is empty; name the modules to adapt, e.g. [q_proj, v_proj]")
    if "lm_head" in lora.target_modules:
        raise ConfigError(
            "model.lora.target_modules has lm_head: the loss reads the output head outside the forward, so an "
            "adapter on it would never train; leave lm_head out (the head stays frozen under LoRA)"
        )


def is_image_text(config: Config) -> bool:
    """The vision-language path: `model.kind = image_text`, or `auto` with an image column."""
    return config.model.kind == "image_text" or (config.model.kind == "auto" and bool(config.data.image_column))


def _check_images(config: Config) -> None:
    m, d = config.model, config.data
    if m.kind not in ("auto", "causal_lm", "image_text"):
        raise ConfigError(f"model.kind = {m.kind!r} is unknown; use auto, causal_lm or image_text")
    if m.kind == "image_text" and not d.image_column:
        raise ConfigError("model.kind = image_text needs data.image_column: the column that holds each row's image")
    if m.kind == "causal_lm" and d.image_column:
        raise ConfigError(
            f"data.image_column = {d.image_column!r} needs an image-text model; set model.kind=image_text (or auto)"
        )
    if (d.box_column or d.draw_box) and not d.image_column:
        raise ConfigError("data.box_column and data.draw_box need data.image_column: boxes belong to images")
    if d.draw_box and not d.box_column:
        raise ConfigError("data.draw_box needs data.box_column: the column with each row's pixel boxes to draw")
    if is_image_text(config) and config.rollout.backend == "vllm":
        raise ConfigError(
            "rollout.backend = vllm does not carry images yet; image-text runs sample with rollout.backend=hf"
        )


def _check_rollout_backend(config: Config) -> None:
    r, v = config.rollout, config.rollout.vllm
    if r.backend not in ("hf", "vllm"):
        raise ConfigError(f"rollout.backend = {r.backend!r} is unknown; use hf or vllm")
    if r.backend != "vllm":
        return
    if v.mode not in ("colocate", "server"):
        raise ConfigError(f"rollout.vllm.mode = {v.mode!r} is unknown; use colocate or server")
    if not 0 < v.gpu_memory_utilization <= 1:
        raise ConfigError(f"rollout.vllm.gpu_memory_utilization = {v.gpu_memory_utilization} must be in (0, 1]")
    _positive(v.tensor_parallel_size, "rollout.vllm.tensor_parallel_size")
    _positive(v.server_timeout, "rollout.vllm.server_timeout")
    for key, port in (("rollout.vllm.server_port", v.server_port), ("rollout.vllm.group_port", v.group_port)):
        if not 0 < port < 65536:
            raise ConfigError(f"{key} = {port} is not a port number (1-65535)")
    if v.mode == "server" and v.tensor_parallel_size != 1:
        raise ConfigError(
            "rollout.vllm.tensor_parallel_size applies to mode=colocate; a server's parallelism is set when it is "
            "started (vllm serve --tensor-parallel-size N)"
        )
    if v.mode == "server" and r.temperature == 0 and r.num_generations > 1:
        raise ConfigError(
            f"rollout.temperature = 0 with rollout.num_generations = {r.num_generations} in rollout.vllm.mode = "
            "server: the server is asked for n > 1 samples of each prompt, which vLLM refuses for greedy decoding; "
            "set rollout.num_generations=1 (greedy completions of one prompt are all the same) or a temperature > 0"
        )
    needed = config.data.max_prompt_length + r.max_new_tokens
    if v.max_model_len is not None and v.max_model_len < needed:
        raise ConfigError(
            f"rollout.vllm.max_model_len = {v.max_model_len} is shorter than data.max_prompt_length + "
            f"rollout.max_new_tokens = {needed}; raise it or leave it null"
        )


def _positive(value: int | float, key: str) -> None:
    if value <= 0:
        raise ConfigError(f"{key} = {value} must be positive")


# --------------------------------------------------------------------------------------------------- help

_FIELD_LINE = re.compile(r"^\s+(\w+):\s*([^=]+?)\s*=\s*(.+?)\s*#\s*(.+)$")


def field_help(cls: type) -> dict[str, tuple[str, str]]:
    """{field: (type, help)} from the comment after each field in the dataclass's source."""
    found = {}
    for line in inspect.getsource(cls).splitlines():
        match = _FIELD_LINE.match(line)
        if match:
            found[match.group(1)] = (match.group(2), match.group(4))
    return found


def describe_keys(config: Config | None = None) -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every setting."""
    config = config or Config()
    rows = []
    for section in dataclasses.fields(Config):
        rows.extend(_describe(getattr(config, section.name), section.name))
    return rows


def _describe(value: Any, prefix: str) -> list[tuple[str, str, str]]:
    """Rows of one section; a nested section (`model.lora`, `rollout.vllm`) gives dotted rows of its own."""
    rows = []
    helps = field_help(type(value))
    for item in dataclasses.fields(value):
        default = getattr(value, item.name)
        if dataclasses.is_dataclass(default):
            rows.extend(_describe(default, f"{prefix}.{item.name}"))
        else:
            rows.append((f"{prefix}.{item.name}", _show(default), helps.get(item.name, ("", ""))[1]))
    return rows


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value) if value == "" or "\n" in value else value
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def keys_help() -> str:
    rows = describe_keys()
    width = max(len(key) for key, _, _ in rows)
    return "\n".join(f"  {key:<{width}}  {default:<14} {text}" for key, default, text in rows)


def keys_markdown() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, text in describe_keys():
        default, text = default.replace("|", "\\|"), text.replace("|", "\\|")
        lines.append(f"| `{key}` | `{default}` | {text} |")
    return "\n".join(lines)
