"""Tiny transformers models, a tokenizer and a prompt data set built on the spot, for trainer tests.

Nothing is downloaded: the tokenizer is a word-level `tokenizers` model over a fixed vocabulary with a small chat
template, and the models are `Qwen3ForCausalLM` from a tiny `Qwen3Config`, saved with `save_pretrained` so the
trainer loads them by path exactly as it loads real checkpoints.
"""

from __future__ import annotations

import json
import os
import random

WORDS = [str(i) for i in range(20)] + ["plus", "is", "hint", "add", "then", "answer", "what", "?", ":", "."]
SPECIAL = ["<pad>", "<eos>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ 'user: ' + m['content'] + ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


def build_tokenizer(extra_words: list[str] | None = None, chat_template: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS + ["user", "assistant"] + (extra_words or []))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(
    vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0, vocab_pad: int = 0, tied: bool = True
):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size + vocab_pad,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return Qwen3ForCausalLM(config)


def write_pair(directory: str, student_hidden: int = 32, teacher_hidden: int = 48, teacher_vocab_pad: int = 0):
    """Save a tokenizer, a student and a teacher under `directory`; returns (student_path, teacher_path)."""
    tokenizer = build_tokenizer()
    paths = []
    for name, hidden, seed, pad in (
        ("student", student_hidden, 0, 0),
        ("teacher", teacher_hidden, 1, teacher_vocab_pad),
    ):
        path = os.path.join(directory, name)
        build_model(len(tokenizer), hidden, seed=seed, vocab_pad=pad).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return tuple(paths)


def write_prompts(path: str, count: int = 32, seed: int = 0, chat: bool = False) -> str:
    """A JSONL file of addition prompts with step-wise hints as privileged context."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            prompt = f"what is {a} plus {b} ?"
            row = {
                "prompt": [{"role": "user", "content": prompt}] if chat else prompt,
                "privileged_context": f"hint : add {a} then {b} .",
                "answer": str(a + b),
            }
            handle.write(json.dumps(row) + "\n")
    return path


# ------------------------------------------------------------------------------------------ a model that answers

FACTS = [("what is 3 plus 4 ?", 7), ("what is 4 plus 5 ?", 9), ("what is 2 plus 4 ?", 6), ("what is 5 plus 7 ?", 12)]


def write_answering_model(path: str) -> str:
    """A tiny Qwen3 trained here until it answers each of FACTS with "answer : N" (greedy), saved at `path` with
    its tokenizer (the `answering_model` fixture)."""
    import torch

    from dopd.prompts import render_prompt

    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), hidden=32, layers=2, seed=0)
    rows = []
    for question, answer in FACTS:
        prompt = tokenizer(render_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
        completion = tokenizer(f"answer : {answer}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt, completion))
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels, mask = torch.full_like(ids, -100), torch.zeros_like(ids)
    for i, (prompt, completion) in enumerate(rows):
        ids[i, : len(prompt) + len(completion)] = torch.tensor(prompt + completion)
        labels[i, len(prompt) : len(prompt) + len(completion)] = torch.tensor(completion)
        mask[i, : len(prompt) + len(completion)] = 1
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(400):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.005:
            break
    assert loss.item() < 0.005, "the tiny model did not learn its answers"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------ a fake vLLM


class FakeLLM:
    """Stands in for `vllm.LLM` inside TRL's `VLLMGeneration` (colocate mode): records what it is given and returns
    fixed completions, `completions[i % len(completions)]` for request i. `loaded` holds the (name, tensor) pairs
    of the last weight sync, as vLLM's `model.load_weights` receives them."""

    completions: list[list[int]] = [[5, 6, 1], [7, 8, 9, 10]]
    instances: list[FakeLLM] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.loaded: dict = {}
        self.syncs = 0
        self.calls: list = []
        self.sleeping = False
        self.llm_engine = _Namespace(
            model_executor=_Namespace(
                driver_worker=_Namespace(model_runner=_Namespace(model=_Namespace(load_weights=self._load_weights)))
            )
        )
        FakeLLM.instances.append(self)

    def _load_weights(self, weights):
        for name, tensor in weights:
            self.loaded[name] = tensor.detach().clone()

    def reset_prefix_cache(self):
        self.syncs += 1

    def sleep(self, level=1):
        self.sleeping = True

    def wake_up(self, tags=None):
        self.sleeping = False

    def generate(self, prompts, sampling_params=None, use_tqdm=False):
        self.calls.append((prompts, sampling_params))
        outputs = []
        for number, prompt in enumerate(prompts):
            ids = self.completions[number % len(self.completions)]
            outputs.append(
                _Namespace(
                    prompt_token_ids=prompt["prompt_token_ids"],
                    outputs=[_Namespace(token_ids=list(ids), logprobs=None)],
                )
            )
        return outputs


class _Namespace:
    def __init__(self, **values):
        self.__dict__.update(values)


def install_fake_vllm(monkeypatch):
    """Make TRL's `VLLMGeneration` build a `FakeLLM` (and dopd believe vLLM is installed); undone by monkeypatch.
    The environment variables vLLM's colocate start-up sets are restored afterwards too."""
    import trl.generation.vllm_generation as generation

    import dopd.rollout.vllm as backend

    FakeLLM.instances = []
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        present = name in os.environ
        monkeypatch.setenv(name, os.environ.get(name, ""))  # records the value (or its absence) to restore
        if not present:
            monkeypatch.delenv(name)
    monkeypatch.setattr(generation, "is_vllm_available", lambda *args, **kwargs: True)
    monkeypatch.setattr(generation, "LLM", FakeLLM, raising=False)
    monkeypatch.setattr(generation, "SamplingParams", lambda **kwargs: dict(kwargs), raising=False)
    monkeypatch.setattr(backend, "require_vllm", lambda device=None: None)
    return FakeLLM


def serve_json(get, post):
    """A local HTTP server on a free port that answers JSON, for fake model servers: `get(path)` and
    `post(path, body)` return (status, payload). A client that hangs up mid-answer (a test's killed request) is not
    reported. Returns the server (stop it with `shutdown()` then `server_close()`) and its root URL."""
    import json
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                super().handle_error(request, client_address)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, answer) -> None:
            status, payload = answer
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.reply(get(self.path))

        def do_POST(self):
            self.reply(post(self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))

    httpd = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


# ------------------------------------------------------------------------------------------ trainer runs


def make_config(pair: dict, out, *extra: str, **sections):
    """A validated config for a two-step run on the tiny `pair` (the `pair` fixture), with dotted `extra` overrides."""
    from dopd.config import load_config

    overrides = [
        f"model.student={pair['student']}",
        f"model.teacher={pair['teacher']}",
        f"data.path={pair['data']}",
        f"logging.output_dir={out}",
        "train.steps=2",
        "train.prompts_per_step=4",
        "train.micro_batch_size=3",
        "rollout.num_generations=2",
        "rollout.max_new_tokens=6",
        "objective.top_k=8",
        "optim.lr=1e-2",
        "logging.progress_bar=false",
        "logging.sample_every=1",
        "checkpoint.save_every=0",
        *extra,
    ]
    return load_config(overrides=overrides, **sections)


def weights(path) -> dict:
    """The tensors of a saved model directory."""
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def train_stopped_at(config, step: int) -> None:
    """Run `train(config)` and stop it, as a kill would, when it is about to run `step`."""
    import pytest

    from dopd.train import Trainer, train

    class Stop(Exception):
        pass

    original = Trainer.step

    def stopping(self, number):
        if number == step:
            raise Stop
        return original(self, number)

    Trainer.step = stopping
    try:
        with pytest.raises(Stop):
            train(config)
    finally:
        Trainer.step = original


def with_scope(kwargs: dict) -> dict:
    """Keyword arguments of a loss call with the scope's fields (cuts, num_sequences, gather, generator, eos_ids)
    gathered into one `terms.LossScope`."""
    from dopd.terms import LossScope

    fields = ("cuts", "num_sequences", "gather", "generator", "eos_ids")
    scope = {key: kwargs.pop(key) for key in fields if key in kwargs}
    return {**kwargs, "scope": LossScope(**scope)} if scope else kwargs


def write_rows(path, rows: list[dict]) -> str:
    """A JSONL file of the given rows."""
    with open(path, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def first_rollouts(trainer, generations: int = 2):
    """The prompts of a trainer's next step and `generations` completions of each, sampled by its engine."""
    prompts = trainer.local_prompts()
    return prompts, trainer.engine.generate([trainer.prompts.student_ids[p] for p in prompts], generations)


# ------------------------------------------------------------------------------------------ reward functions


def word_count_reward(prompt, completion, row) -> float:
    """A `module:function` reward for tiny runs (`objective.reward=tiny:word_count_reward`): the completion's
    number of words, which varies between a prompt's rollouts."""
    return float(len(completion.split()))


def text_reward(prompt, completion, row):
    """A reward function that returns something other than a number (a bad-input test)."""
    return "yes"


def nan_reward(prompt, completion, row) -> float:
    """A reward function that returns NaN (a bad-input test)."""
    return float("nan")
