"""A teacher served by vLLM: the client against a local HTTP server that answers in vLLM's format, the scores it
gives against a local teacher's, the checks before training, and the trainer end to end with a served teacher."""

from __future__ import annotations

import json
import os

import pytest
import tiny
import torch
from tiny import make_config

from dopd.config import ConfigError, TeacherServerConfig
from dopd.kernels import score_target
from dopd.kernels import scores as chunked_module
from dopd.scoring import frozen_pass, pass_inputs
from dopd.served_teacher import ServedTeacher, TeacherServerError
from dopd.train import Trainer
from dopd.types import Completions


class FakeVLLM:
    """`vllm serve` as far as a served teacher needs it: /v1/models, /tokenize, and /v1/completions with
    `prompt_logprobs` (the JSON of vLLM's `CompletionResponseChoice.prompt_logprobs`: None for the first token, then
    {token id: {"logprob", "rank", "decoded_token"}} with the top-k by rank and the prompt's own token)."""

    def __init__(self, model_path: str, name: str = "teacher", max_logprobs: int = 20, tokenizer=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
        self.name, self.max_logprobs, self.requests, self.max_model_len = name, max_logprobs, [], 2048
        self.busy = 0  # POST requests still to answer with 503
        self.server, self.url = tiny.serve_json(self.get, self.post)

    def get(self, path: str) -> tuple[int, dict]:
        if path == "/v1/models":
            card = {"id": self.name, "object": "model", "max_model_len": self.max_model_len}
            return 200, {"object": "list", "data": [card]}
        return 404, {"object": "error", "message": f"no route {path}", "code": 404}

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        self.requests.append((path, body))
        if self.busy:  # a server still loading the model (newer vLLM's error body)
            self.busy -= 1
            return 503, {"error": {"message": "Service is loading", "code": 503}}
        if body.get("model") != self.name:
            message = f"The model `{body.get('model')}` does not exist."
            return 404, {"object": "error", "message": message, "type": "NotFoundError", "code": 404}
        if path == "/tokenize":
            ids = self.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
            return 200, {"tokens": ids["input_ids"], "count": len(ids["input_ids"])}
        if path == "/v1/completions":
            k = body.get("prompt_logprobs")
            if k is not None and k > self.max_logprobs:
                message = f"Requested prompt logprobs of {k}, which is greater than max allowed: {self.max_logprobs}"
                return 400, {"object": "error", "message": message, "type": "BadRequestError", "code": 400}
            prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
            choices = [
                {
                    "index": i,
                    "text": "",
                    "logprobs": None,
                    "finish_reason": "length",
                    "prompt_logprobs": self.prompt_logprobs(p, k),
                }
                for i, p in enumerate(prompts)
            ]
            return 200, {"object": "text_completion", "model": self.name, "choices": choices}
        return 404, {"object": "error", "message": f"no route {path}", "code": 404}

    @torch.no_grad()
    def prompt_logprobs(self, ids: list[int], k: int) -> list:
        logprobs = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].double(), -1)
        out: list = [None]
        for position in range(1, len(ids)):
            row = logprobs[position - 1]
            ranks = {int(i): r + 1 for r, i in enumerate(row.argsort(descending=True).tolist())}
            entry = {}
            for token in [*row.topk(k).indices.tolist(), ids[position]]:
                entry[str(token)] = {
                    "logprob": float(row[token]),
                    "rank": ranks[token],
                    "decoded_token": self.tokenizer.decode([token]),
                }
            out.append(entry)
        return out

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def server(pair):
    fake = FakeVLLM(pair["teacher"], max_logprobs=64)
    yield fake
    fake.close()


def client(url: str, vocab_size: int, top_k: int = 8, name: str = "teacher", retries: int = 1, per_request: int = 32):
    server = TeacherServerConfig(url=url, timeout=30, retries=retries, max_sequences_per_request=per_request)
    return ServedTeacher(server, name, top_k, vocab_size)


def batch(tokenizer):
    """Two prompts and right-padded completions of different lengths."""
    prompts = [tokenizer(text)["input_ids"] for text in ("what is 3 plus 4 ?", "hint : add 4 then 5 . what is 9 ?")]
    completions = Completions.from_lists([tokenizer("7 . answer 7")["input_ids"], tokenizer("9")["input_ids"]], 0)
    return prompts, completions


@pytest.mark.parametrize("top_k", [8, None])
def test_served_scores_equal_a_local_teachers(pair, server, top_k, monkeypatch):
    monkeypatch.setattr(chunked_module, "_KEEP_ELEMENTS", 0)  # the local reference computes its top-K
    tokenizer, model = server.tokenizer, server.model
    prompts, completions = batch(tokenizer)
    head = frozen_pass(model, pass_inputs(prompts, completions, 0), len(tokenizer))
    local = score_target(head, completions.ids, completions.mask, top_k)
    served = client(server.url, len(tokenizer), per_request=1).score(prompts, completions.ids, completions.mask, top_k)
    valid = completions.mask.bool()
    torch.testing.assert_close(served.token_logprobs, local.token_logprobs.float(), rtol=0, atol=1e-5)
    assert (served.token_logprobs[~valid] == 0).all() and (served.entropy[~valid] == 0).all()
    if top_k:
        assert torch.equal(served.topk_ids[valid], local.topk_ids[valid])
        torch.testing.assert_close(served.topk_logprobs[valid], local.topk_logprobs[valid].float(), rtol=0, atol=1e-5)
    else:
        assert served.topk_ids is None and served.topk_logprobs is None
    # The entropy of the top-K plus one tail outcome is a lower bound of the true entropy.
    assert (served.entropy[valid] <= local.entropy[valid].float() + 1e-5).all()
    assert (served.entropy[valid] > 0).all()


def test_the_whole_vocabulary_served_gives_the_exact_entropy(pair, tmp_path):
    fake = FakeVLLM(pair["teacher"], max_logprobs=64)
    try:
        tokenizer = fake.tokenizer
        prompts, completions = batch(tokenizer)
        V = len(tokenizer)
        head = frozen_pass(fake.model, pass_inputs(prompts, completions, 0), V)
        local = score_target(head, completions.ids, completions.mask, None)
        served = client(fake.url, V, top_k=V).score(prompts, completions.ids, completions.mask, V)
        torch.testing.assert_close(served.entropy, local.entropy.float(), rtol=0, atol=1e-5)
        assert len(fake.requests) == 1 and fake.requests[0][1]["prompt_logprobs"] == V  # one request, every row
    finally:
        fake.close()


def test_ids_past_the_tokenizer_are_left_out_of_the_support(pair):
    """A teacher whose head has 8 rows past the tokenizer: its top-K may hold them; they are dropped (their mass
    goes to the tail), and asking for too few log-probs to keep K inside the vocabulary is one clear error."""
    fake = FakeVLLM(pair["padded_teacher"], max_logprobs=64)
    try:
        V = len(fake.tokenizer)
        prompts, completions = batch(fake.tokenizer)
        scores = client(fake.url, V, top_k=16).score(prompts, completions.ids, completions.mask, 8)
        assert int(scores.topk_ids.max()) < V
        full = torch.log_softmax(fake.model(torch.tensor([prompts[0] + completions.ids[0].tolist()])).logits[0], -1)
        in_vocab = full[len(prompts[0]) - 1, :V].topk(8)
        assert torch.equal(scores.topk_ids[0, 0], in_vocab.indices)  # the top-8 inside the vocabulary
        with pytest.raises(TeacherServerError, match="raise model.teacher_server.top_k"):
            client(fake.url, V, top_k=8).score(prompts, completions.ids, completions.mask, 8)
    finally:
        fake.close()


def test_server_problems_are_one_clear_error(pair, server):
    tokenizer = server.tokenizer
    V = len(tokenizer)
    client(server.url, V).check(tokenizer)  # the served teacher passes
    with pytest.raises(TeacherServerError, match="--max-logprobs 100"):
        client(server.url, V, top_k=100).check(tokenizer)
    with pytest.raises(TeacherServerError, match="serves \\['teacher'\\], not 'other'"):
        client(server.url, V, name="other").check(tokenizer)
    other = tiny.build_tokenizer(extra_words=["distillation"])  # the probe text holds this word
    with pytest.raises(TeacherServerError, match="share one tokenizer"):
        client(server.url, V).check(other)
    short = client(server.url, V)
    short.max_length = 3000
    with pytest.raises(TeacherServerError, match="max_model_len is 2048.*restart it with --max-model-len 3000"):
        short.check(tokenizer)
    server.busy = 1  # a 503 is retried; with no attempt left it is one clear error with the server's message
    prompts, completions = batch(tokenizer)
    client(server.url, V, retries=2).score(prompts, completions.ids, completions.mask, 8)
    server.busy = 1
    with pytest.raises(TeacherServerError, match="HTTP 503: Service is loading"):
        client(server.url, V, retries=1).score(prompts, completions.ids, completions.mask, 8)
    with pytest.raises(TeacherServerError, match="did not answer /v1/models after 1 attempt"):
        client("http://127.0.0.1:9", V).check(tokenizer)  # nothing listens on the discard port


def config_for(pair, out, url, *extra):
    """test_train's tiny run with the teacher served by `url` under the name `teacher`."""
    return make_config(pair, out, "model.teacher=teacher", f"model.teacher_server.url={url}", *extra)


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective.teacher_full=full", "objective.teacher_full=topk_bucket"),
        ("objective.topk_support=union", "objective.topk_support=target"),
        ("objective.temperature=2", "objective.temperature=1"),
        ("train.loss_form=plain", "set train.loss_form=chunked"),
        ("model.teacher_server.top_k=4", "model.teacher_server.top_k = 4 is below objective.top_k = 8"),
        ("objective.method=opsd", "reads no teacher"),
    ],
)
def test_settings_a_served_teacher_cannot_meet_fail_at_load(pair, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        config_for(pair, tmp_path / "run", "http://127.0.0.1:9", override)


def test_config_resolves_the_full_vocabulary_fallback(pair, tmp_path):
    config = config_for(pair, tmp_path / "run", "http://127.0.0.1:9")
    assert config.objective.teacher_full == "topk_bucket"
    local = make_config(pair, tmp_path / "local")
    assert local.objective.teacher_full is None  # a local teacher keeps the full-vocabulary JS


@pytest.mark.parametrize("method", ["dopd", "opd-priv"])
def test_training_with_a_served_teacher(pair, server, tmp_path, method, caplog):
    from safetensors.torch import load_file

    config = config_for(pair, tmp_path / "run", server.url, f"objective.method={method}")
    before = len(server.requests)
    with caplog.at_level("WARNING", logger="dopd"):
        trainer = Trainer(config)
    assert trainer.teacher is None and trainer.teacher_head_weights is None  # nothing of the teacher is loaded here
    if method == "dopd":
        assert "HT run on its top-8 with a tail bucket (objective.teacher_full=topk_bucket)" in caplog.text
    result = trainer.run()
    scored = [body for path, body in server.requests[before:] if path == "/v1/completions"]
    assert len(scored) >= 1 + 2 * 2  # the check, then every micro-batch of both steps
    assert all(body["prompt_logprobs"] == (8 if method == "dopd" else 1) for body in scored)
    assert "teacher_full: topk_bucket" in open(tmp_path / "run" / "config.yaml").read()
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in lines)
    after, start = (
        load_file(os.path.join(result.final_dir, "model.safetensors")),
        load_file(os.path.join(pair["student"], "model.safetensors")),
    )
    assert any(not torch.equal(after[k], start[k]) for k in start)
    if method == "dopd":
        assert sum(lines[-1][f"frac/{r}"] for r in ("LH", "LL", "HT", "HS")) == pytest.approx(1.0)
        assert lines[-1]["frac/HT"] >= 0


def test_a_served_teacher_gives_the_local_teachers_first_step(pair, server, tmp_path):
    """The same rollouts scored by the served teacher and by the same teacher loaded here: routing and the Top-K
    terms agree; the loss differs only by HT's fallback, which vanishes when K covers the vocabulary."""
    V = len(server.tokenizer)
    losses = {}
    for name, extra in (
        ("served", [f"model.teacher_server.url={server.url}", f"model.teacher_server.top_k={V}"]),
        ("local", [f"model.teacher={pair['teacher']}", "model.teacher_server.url=null"]),
    ):
        config = config_for(
            pair,
            tmp_path / name,
            server.url,
            f"objective.top_k={V}",
            "rollout.temperature=0",
            "objective.teacher_full=topk_bucket",
            *extra,
        )
        trainer = Trainer(config)
        losses[name] = trainer.step(0)
    for key in ("loss", "frac/LH", "frac/LL", "frac/HT", "frac/HS", "gap/mean"):
        assert losses["served"][key] == pytest.approx(losses["local"][key], rel=1e-4, abs=1e-6), key
