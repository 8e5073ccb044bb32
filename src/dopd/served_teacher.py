"""A teacher served by vLLM (`model.teacher_server.url`), instead of a teacher loaded in every training process.

The teacher reads `teacher prompt + completion` as one prompt; vLLM's `/v1/completions` with `prompt_logprobs=K`
returns, for every prompt position, the log-probs of that position's token and of the K most likely tokens
(`choices[i].prompt_logprobs`: a list with `None` first, then `{token id: {"logprob", "rank", "decoded_token"}}`;
see vLLM's `CompletionResponseChoice`). From the completion positions this module builds the teacher's
`TargetScores`:

- `token_logprobs`: log π_T(y_t), exact: routing, the sampled-token terms and the gap use it as they would a local
  teacher's.
- `topk_logprobs` / `topk_ids`: the teacher's top-K, exact; DOPD's LH term (Top-K on the teacher's support) is
  unchanged.
- the teacher's full distribution is not available: the full-vocabulary JS of the HT regime runs on the teacher's
  top-K with one tail entry for the rest of the vocabulary (`objective.teacher_full=topk_bucket`, which the config
  sets when a teacher is served and the log says), and `entropy` is that of the top-K plus the tail taken as one
  outcome, a lower bound of the true entropy (metrics, and EOPD's entropy threshold).

The log-probs are vLLM's raw ones (its default `--logprobs-mode raw_logprobs`): temperature 1, no sampling
processors, so `objective.temperature` must be 1. Start the server with the teacher and enough log-probs:

    vllm serve Qwen/Qwen3-8B --max-logprobs 128 --port 8001

`check()` (run before the models load) asks the server for its models, compares its tokenizer with the
student's on a probe text (`/tokenize`) and scores one short sequence, so that a wrong name, another tokenizer
or a `--max-logprobs` below K stops the run at once with the fix.
"""

from __future__ import annotations

import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .chat_client import ChatClient, ServerError
from .config import TeacherServerConfig
from .types import TargetScores

logger = logging.getLogger("dopd")
PROBE_TEXT = "On-policy distillation: 12 + 30 = 42. Ünïcödé, 中文, emoji 🙂, tabs\tand  spaces."


class TeacherServerError(RuntimeError):
    """The served teacher could not be reached or answered something unusable; the message says what to fix."""


class ServedTeacher:
    """Scores completions with a vLLM server. `score` returns the same `TargetScores` a local teacher's pass gives,
    with `topk_*` filled and no full log-probs.

    `server` holds the run's `model.teacher_server` settings; the rest is what the run resolves: the served
    model's name, the log-probs to request per position (`top_k`), the vocabulary (ids at or beyond `vocab_size`,
    embedding rows padded past the tokenizer, are not part of the support) and the longest teacher prompt +
    completion + 1 a run sends (`max_length`, checked against the server's context)."""

    def __init__(
        self, server: TeacherServerConfig, model: str, top_k: int, vocab_size: int, max_length: int | None = None
    ):
        self.server, self.model, self.top_k, self.vocab_size, self.max_length = (
            server,
            model,
            top_k,
            vocab_size,
            max_length,
        )
        self.base = server.url.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[: -len("/v1")]  # /tokenize sits at the root, the OpenAI routes under /v1
        # The project's JSON-over-HTTP client (retries with backoff, Retry-After, no proxy for a local server).
        self.client = ChatClient(
            self.base,
            model,
            server.api_key or os.environ.get("VLLM_API_KEY"),
            timeout=server.timeout,
            retries=max(1, server.retries) - 1,
        )

    # ------------------------------------------------------------------------------------------------ HTTP

    def _request(self, route: str, body: dict | None = None) -> dict:
        """GET (`body` None) or POST `route`; a failure is one `TeacherServerError` that says what to fix."""
        try:
            return self.client.request(route, body)
        except ServerError as error:
            if error.status is not None:
                raise TeacherServerError(self._explain(route, error.status, error.body or str(error))) from None
            raise TeacherServerError(
                f"the teacher server at {self.base} did not answer {route} after {self.client.retries + 1} "
                f"attempt(s) ({error}); start it (vllm serve TEACHER --max-logprobs {self.top_k}) or fix "
                "model.teacher_server.url"
            ) from None

    def _explain(self, route: str, status: int, text: str) -> str:
        try:
            body = json.loads(text)
            error = body.get("error")  # newer servers: {"error": {"message": ...}}
            message = body.get("message") or (error.get("message") if isinstance(error, dict) else error) or text
        except (json.JSONDecodeError, AttributeError):
            message = text
        hint = ""
        if "logprobs" in str(message).lower() and "max" in str(message).lower():
            hint = f"; restart the server with --max-logprobs {self.top_k} or more"
        elif status == 404 and "model" in str(message).lower():
            hint = "; set model.teacher_server.model to a model the server serves"
        return f"the teacher server answered {route} with HTTP {status}: {str(message).strip()[:500]}{hint}"

    # ------------------------------------------------------------------------------------------------ checks

    def check(self, tokenizer) -> None:
        """Stop before training when the server is down, serves another model or tokenizer, or caps log-probs."""
        cards = {entry.get("id"): entry for entry in self._request("/v1/models").get("data", [])}
        if self.model not in cards:
            raise TeacherServerError(
                f"the teacher server at {self.base} serves {list(cards)}, not {self.model!r}; set "
                "model.teacher_server.model to one of them"
            )
        length = cards[self.model].get("max_model_len")
        if self.max_length and isinstance(length, int) and length < self.max_length:
            raise TeacherServerError(
                f"the served teacher's max_model_len is {length}, but a run sends up to data.max_prompt_length + "
                f"rollout.max_new_tokens + 1 = {self.max_length} tokens; restart it with --max-model-len "
                f"{self.max_length}"
            )
        probe = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        probe_body = {"model": self.model, "prompt": PROBE_TEXT, "add_special_tokens": False}
        answer = self._request("/tokenize", probe_body)
        served = list(answer.get("tokens", []))
        if served != list(probe):
            raise TeacherServerError(
                f"the served teacher {self.model!r} tokenizes a probe text into {len(served)} ids and "
                f"the student's tokenizer into {len(probe)} ids (or other ids); on-policy distillation scores the "
                "student's tokens with the teacher, so both must share one tokenizer"
            )
        self._score_rows([probe[:4]], [probe[4:8]])  # a request at the full K: surfaces a --max-logprobs cap

    # ------------------------------------------------------------------------------------------------ scoring

    def score(
        self,
        prompts: list[list[int]],
        completion_ids: torch.Tensor,
        mask: torch.Tensor,
        top_k: int | None = None,
        device=None,
    ) -> TargetScores:
        """The teacher's scores of a micro-batch: `prompts` (its prompt ids per row), completions [B, T] with
        their mask; `top_k`: K of the top-K to keep (None: none). Zeros at padding, as `score_target` gives."""
        lengths = mask.sum(-1).tolist()
        completions = [row[:n] for row, n in zip(completion_ids.tolist(), lengths)]
        rows = self._score_rows(prompts, completions)
        B, T = completion_ids.shape
        width = self.top_k
        token = torch.zeros(B, T, dtype=torch.float64)
        values = torch.full((B, T, width), -math.inf, dtype=torch.float64)
        ids = torch.zeros(B, T, width, dtype=torch.long)
        kept = torch.zeros(B, T, dtype=torch.long)  # entries inside the vocabulary, per position
        for b, (token_lps, row_ids, row_values, counts) in enumerate(rows):
            n = len(token_lps)
            if n:
                token[b, :n] = torch.tensor(token_lps, dtype=torch.float64)
                ids[b, :n] = torch.tensor(row_ids, dtype=torch.long)
                values[b, :n] = torch.tensor(row_values, dtype=torch.float64)
                kept[b, :n] = torch.tensor(counts, dtype=torch.long)
        top_k, valid = top_k or 0, mask.bool()
        kept = kept[valid]
        fewest = int(kept.min()) if kept.numel() else width
        if top_k and fewest < top_k:
            raise TeacherServerError(
                f"the served teacher gave {fewest} log-probs inside the vocabulary at a "
                f"completion token, fewer than objective.top_k = {top_k}; raise model.teacher_server.top_k (and the "
                "server's --max-logprobs) or lower objective.top_k"
            )
        probs = values.exp()  # exp(-inf) = 0 at the padding entries
        tail = (1.0 - probs.sum(-1)).clamp(min=0.0)
        plogp = torch.where(probs > 0, probs * values, torch.zeros_like(probs)).sum(-1)
        entropy = -plogp - torch.where(tail > 0, tail * tail.log(), torch.zeros_like(tail))
        return TargetScores(
            token_logprobs=token.float().to(device),  # zeros at padding: only completion positions were written
            entropy=entropy.masked_fill(~valid, 0.0).float().to(device),
            topk_logprobs=values[..., :top_k].masked_fill(~valid[..., None], 0.0).float().to(device) if top_k else None,
            topk_ids=ids[..., :top_k].to(device) if top_k else None,
        )

    def _score_rows(self, prompts: list[list[int]], completions: list[list[int]]) -> list[tuple]:
        """`_parse` of every row, in order, from requests of `max_sequences_per_request` rows."""
        s = self.server
        size = max(1, s.max_sequences_per_request)
        groups = [list(range(i, min(i + size, len(prompts)))) for i in range(0, len(prompts), size)]

        def request(group: list[int]) -> list:
            body = {
                "model": self.model,
                "prompt": [prompts[i] + completions[i] for i in group],
                "max_tokens": 1,
                "temperature": 0.0,
                "prompt_logprobs": self.top_k,
            }
            choices = sorted(self._request("/v1/completions", body).get("choices", []), key=lambda c: c.get("index", 0))
            if len(choices) != len(group):
                raise TeacherServerError(f"the teacher server returned {len(choices)} choices for {len(group)} prompts")
            return [self._parse(choice, prompts[i], completions[i]) for choice, i in zip(choices, group)]

        if len(groups) == 1:
            return request(groups[0])
        with ThreadPoolExecutor(max_workers=max(1, min(s.max_concurrency, len(groups)))) as pool:
            return [row for part in pool.map(request, groups) for row in part]

    def _parse(self, choice: dict, prompt: list[int], completion: list[int]) -> tuple:
        """One sequence's completion positions: (token log-probs, top ids [T, W], their log-probs [T, W], entries
        inside the vocabulary per position); W = the requested K, rows padded with id 0 and log-prob −inf."""
        entries = choice.get("prompt_logprobs")
        if entries is None or len(entries) != len(prompt) + len(completion):
            got = "none" if entries is None else len(entries)
            raise TeacherServerError(
                f"the teacher server returned {got} prompt log-probs for a sequence of {len(prompt) + len(completion)} "
                "tokens; it must be a vLLM server that supports prompt_logprobs on /v1/completions"
            )
        k, vocab = self.top_k, self.vocab_size
        token_lps, all_ids, all_values, counts = [], [], [], []
        for t, token_id in enumerate(completion):
            entry = entries[len(prompt) + t]
            own = entry.get(str(token_id)) if entry else None
            if own is None:
                raise TeacherServerError(f"the teacher server gave no log-prob for completion token {token_id}")
            token_lps.append(float(own["logprob"]))
            # The top-K by rank (the sampled token rides along when it ranks below K). Ids past the tokenizer
            # (padded embedding rows) are left out of the support: their mass joins the tail.
            ranked = [(value.get("rank") or 0, int(key), float(value["logprob"])) for key, value in entry.items()]
            ranked = sorted(r for r in ranked if r[0] <= k and r[1] < vocab)
            padding = k - len(ranked)
            all_ids.append([r[1] for r in ranked] + [0] * padding)
            all_values.append([r[2] for r in ranked] + [-math.inf] * padding)
            counts.append(len(ranked))
        return token_lps, all_ids, all_values, counts


def _client(config, objective, vocab_size: int) -> ServedTeacher:
    """The run's client: its `model.teacher_server` settings, the served model's name, the log-probs to request
    (`model.teacher_server.top_k`, else K when a Top-K term reads the teacher, else 1) and the longest sequence."""
    ts = config.model.teacher_server
    top_k = ts.top_k or (config.objective.top_k if objective.top_k_for("teacher") else 1)
    max_length = config.data.max_prompt_length + config.rollout.max_new_tokens + 1
    return ServedTeacher(ts, ts.model or config.model.teacher, top_k, vocab_size, max_length)


def check_server(config, objective, tokenizer) -> None:
    """Before any model loads: the server at `model.teacher_server.url` answers, serves the model, the student's
    tokenizer and enough log-probs (`ServedTeacher.check`; a `ConfigError` otherwise). Nothing when no teacher is
    served. The probe's scores are read for errors only, so the tokenizer's size stands in for the vocabulary."""
    from .config import ConfigError

    if not config.model.teacher_server.url:
        return
    try:
        _client(config, objective, len(tokenizer)).check(tokenizer)
    except TeacherServerError as error:
        raise ConfigError(str(error)) from None


def connect(config, objective, vocab_size: int, main_process: bool) -> ServedTeacher | None:
    """The client of the teacher served at `model.teacher_server.url` (checked by `check_server` before the models
    loaded), scoring over `vocab_size`, the rows the heads share; None when no teacher is served."""
    ts = config.model.teacher_server
    if not ts.url:
        return None
    client = _client(config, objective, vocab_size)
    if main_process:
        fallback = [t.applies_to for t in objective.terms if t.target == "teacher" and t.tail == "bucket"]
        logger.warning(
            "teacher served by %s (%s, top-%d log-probs per token)%s",
            ts.url,
            client.model,
            client.top_k,
            f"; the teacher's full-vocabulary term(s) {', '.join(fallback)} run on its top-{client.top_k} with a "
            "tail bucket (objective.teacher_full=topk_bucket)"
            if fallback
            else "",
        )
    return client
