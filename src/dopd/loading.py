"""Loading models, tokenizers and data sources by path or hub name, as users give them, for `dopd train` and `dopd
eval` alike, with one clear error per source that cannot be found and one log line per loaded model.

A name that looks local (absolute, starting with `~` or `.`, with more than one separator, or whose first part
exists here) and does not exist fails at once, naming the key and the path: transformers would take it for a hub
name and spend minutes in retries before a network error that never says the file is missing. A hub name is
probed once with a short timeout: a name the hub does not know, or a hub that cannot be reached, is said so
before any weight loads; `HF_HUB_OFFLINE=1` is honoured (no request at all: the name must be in the local cache).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time

import torch

from .config import Config, ConfigError, is_image_text, teacher_views
from .engines import head_rows

logger = logging.getLogger("dopd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_PROBE_TIMEOUT = 5.0
DATA_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def looks_local(name: str) -> bool:
    """Whether `name` can only be meant as a local path (it need not exist)."""
    expanded = os.path.expanduser(name)
    if os.path.isabs(expanded) or name.startswith(("~", ".")) or "\\" in name or not _HUB_NAME.match(name):
        return True
    if os.path.splitext(name)[1].lower() in DATA_EXTENSIONS:
        return True
    first = name.split("/", 1)[0]
    return "/" in name and os.path.exists(first)  # `models/student` beside a `models` directory


def check_source(name: str, key: str, repo_type: str = "model") -> None:
    """Stop with one line naming `key` unless `name` is an existing local path or a hub name that can be had.
    `repo_type`: model or dataset."""
    if not name or os.path.exists(os.path.expanduser(name)):
        return
    shown = f"{key} {name}" if key.startswith("-") else f"{key} = {name}"
    if looks_local(name):
        raise ConfigError(
            f"{shown} does not exist (no such file or directory: a local path, not a hub name); fix the path"
        )
    if hub_offline():
        if not _in_cache(name, repo_type):
            raise ConfigError(
                f"{shown} is not a local path, and HF_HUB_OFFLINE=1 forbids the hub while the local cache "
                "does not hold it; give a local path, or unset HF_HUB_OFFLINE"
            )
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi().repo_info(name, repo_type=repo_type, timeout=_PROBE_TIMEOUT)
    except RepositoryNotFoundError:
        raise ConfigError(f"{shown} is neither a local path nor a {repo_type} on the hub; fix the name") from None
    except Exception as error:  # no network, DNS, timeout, a proxy: the hub cannot be reached
        if _in_cache(name, repo_type):
            return  # the cached copy loads; transformers falls back to it
        raise ConfigError(
            f"{shown}: the hub cannot be reached ({type(error).__name__}) and the local cache does not hold "
            "it; check the network, give a local path, or set HF_HUB_OFFLINE=1 to use the cache"
        ) from None


def _in_cache(name: str, repo_type: str) -> bool:
    from huggingface_hub import scan_cache_dir

    try:
        return any(repo.repo_id == name and repo.repo_type == repo_type for repo in scan_cache_dir().repos)
    except Exception:  # no cache directory yet
        return False


@contextlib.contextmanager
def quiet_transformers():
    """transformers' and huggingface_hub's progress bars and info lines off: dopd prints one line per model."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def datasets_progress(enabled: bool):
    """`datasets`' own progress bars (reading, converting) off while `enabled` is false, restored after."""
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    if not enabled:
        datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            datasets_logging.enable_progress_bar()


def load_tokenizer(name: str, key: str, trust_remote_code: bool = False):
    """A tokenizer with a pad token (its end-of-sequence token when it has none)."""
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise ConfigError(f"the tokenizer {name} could not be loaded ({key}): {_first_line(error)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_pretrained(
    path: str,
    key: str,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    image_text: bool = False,
):
    """A causal LM (or an image-text model) from a path or hub name, logged in one line."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    model_class = AutoModelForImageTextToText if image_text else AutoModelForCausalLM
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    start = time.time()
    try:
        with quiet_transformers():
            model = model_class.from_pretrained(path, **kwargs)
    except Exception as error:
        raise ConfigError(f"the model {path} could not be loaded ({key}): {_first_line(error)}") from None
    count = sum(p.numel() for p in model.parameters())
    logger.info(
        "loaded %s: %s, %.3gM parameters, %s, %.1f s",
        key,
        path,
        count / 1e6,
        str(dtype).replace("torch.", ""),
        time.time() - start,
    )
    return model


def load_model(path: str, config: Config, role: str):
    """The student always in fp32 (AdamW on half-precision weights rounds small updates away; mixed precision is
    `train.mixed_precision`, which autocasts its passes); the frozen teacher in `model.dtype`."""
    dtype = DTYPES[config.model.dtype] if role == "teacher" else torch.float32
    m = config.model
    return load_pretrained(
        path, f"model.{role}", dtype, m.trust_remote_code, m.attn_implementation, is_image_text(config)
    )


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def check_sources(config: Config) -> None:
    """Every model, tokenizer and data source of a run, before any of them loads."""
    m = config.model
    check_source(m.student, "model.student")
    if m.teacher and not m.teacher_server.url:
        check_source(m.teacher, "model.teacher")
    for name, view in teacher_views(config).items() if m.teachers else ():
        if not view.model.teacher_server.url:
            check_source(view.model.teacher, f"model.teachers.{name}")
    if m.tokenizer:
        check_source(m.tokenizer, "model.tokenizer")
    check_source(config.data.path, "data.path", "dataset")


def tokenizer_or_none(path: str, trust_remote_code: bool):
    """The tokenizer saved with a model, or None when its directory holds no tokenizer files (transformers would
    return a near-empty tokenizer or fail there)."""
    from transformers import AutoTokenizer

    if not has_tokenizer_files(path):
        return None
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception:
        return None


def common_vocab_size(student, teacher, tokenizer) -> int:
    """Rows of the output heads both models share; embeddings padded beyond the tokenizer are tolerated."""
    sizes = [head_rows(student)]
    if teacher is not None:
        sizes.append(head_rows(teacher))
    size = min(sizes)
    if size < len(tokenizer):
        raise ConfigError(
            f"an output head has {size} rows but the tokenizer has {len(tokenizer)} tokens (student "
            f"{sizes[0]}{', teacher ' + str(sizes[1]) if len(sizes) > 1 else ''}); the models and the tokenizer "
            "must match"
        )
    return size


def load_student(config: Config, resume_dir: str | None, image_text: bool):
    """The student from its path or the newest checkpoint; with LoRA, the base from its path and the adapter fresh
    or from the checkpoint. An image-text student's vision tower stays frozen (`model.freeze_vision`) and never
    gets adapters."""
    from .lora import add_adapters, load_adapters

    lora = config.model.lora.enabled
    saved = os.path.join(resume_dir, "model") if resume_dir else None
    student = load_model(saved if saved and not lora else config.model.student, config, "student")
    exclude = None
    if image_text:
        from .multimodal import EXCLUDE_VISION, freeze_vision

        exclude = EXCLUDE_VISION
        if config.model.freeze_vision:
            freeze_vision(student)
    if config.model.gradient_checkpointing:
        student.gradient_checkpointing_enable()
        if lora:  # the frozen embeddings must pass gradients on to the checkpointed layers' adapters
            student.enable_input_require_grads()
    if lora:
        student = load_adapters(student, saved) if saved else add_adapters(student, config.model.lora, exclude)
    return student


def load_processing(config: Config):
    """(tokenizer, processor): an image-text model's processor and its tokenizer, or a tokenizer and None."""
    name = config.model.tokenizer or config.model.student
    if is_image_text(config):
        from .multimodal import load_processor

        processor = load_processor(name, config.model.trust_remote_code)
        return processor.tokenizer, processor
    key = "model.tokenizer" if config.model.tokenizer else "model.student"
    m = config.model
    if not m.tokenizer and m.teacher and not has_tokenizer_files(m.student) and has_tokenizer_files(m.teacher):
        logger.warning(
            "model.student %s has no tokenizer files: both models read the teacher's tokenizer (%s)",
            m.student,
            m.teacher,
        )
        name, key = m.teacher, "model.teacher"
    return load_tokenizer(name, key, m.trust_remote_code), None


def has_tokenizer_files(path: str) -> bool:
    """False only for a local directory without any tokenizer file (a hub name is assumed to have them)."""
    if not os.path.isdir(os.path.expanduser(path)):
        return True
    return any(os.path.exists(os.path.join(os.path.expanduser(path), name)) for name in TOKENIZER_FILES)
