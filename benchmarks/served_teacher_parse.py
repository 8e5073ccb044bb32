"""What a served teacher costs the trainer's process: the size of vLLM's prompt log-probs on the wire and the time
to turn them into `TargetScores`, per completion token, at the top-K a run asks for.

A synthetic `/v1/completions` answer in vLLM's format (`choices[i].prompt_logprobs`: per position the top-K ids with
their log-probs and ranks) is built for `--sequences` sequences of `--prompt-tokens` + `--completion-tokens`
tokens; the benchmark times `json.loads` of its bytes and `ServedTeacher.score` on the parsed answer (the HTTP
round trip itself is left out: it depends on the network and on the server). Compare the time per token with the
time the trainer spends per token on the rest of a step to judge whether the client keeps up.

    python benchmarks/served_teacher_parse.py                 # K = 128, 8 sequences x (256 + 1024) tokens
    python benchmarks/served_teacher_parse.py --top-k 32

Prints one JSON line: bytes and microseconds per completion token (median of the repetitions).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time


def synthetic_answer(sequences: int, prompt: int, completion: int, k: int, vocab: int, seed: int) -> tuple:
    rng = random.Random(seed)
    choices, prompts, completions = [], [], []
    for index in range(sequences):
        ids = [rng.randrange(vocab) for _ in range(prompt + completion)]
        entries: list = [None]
        for position in range(1, len(ids)):
            top = rng.sample(range(vocab), k)
            logprobs = sorted((-rng.expovariate(0.5) for _ in range(k)), reverse=True)
            entry = {
                str(t): {"logprob": lp, "rank": r + 1, "decoded_token": "tok"}
                for r, (t, lp) in enumerate(zip(top, logprobs))
            }
            if str(ids[position]) not in entry:
                entry[str(ids[position])] = {"logprob": logprobs[-1] - 1.0, "rank": k + 7, "decoded_token": "tok"}
            entries.append(entry)
        choices.append({"index": index, "text": "", "finish_reason": "length", "prompt_logprobs": entries})
        prompts.append(ids[:prompt])
        completions.append(ids[prompt:])
    return json.dumps({"object": "text_completion", "choices": choices}).encode(), prompts, completions


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--completion-tokens", type=int, default=1024)
    parser.add_argument("--top-k", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from dopd.config import TeacherServerConfig
    from dopd.served_teacher import ServedTeacher
    from dopd.types import Completions

    torch.set_num_threads(1)
    body, prompts, completions = synthetic_answer(
        args.sequences, args.prompt_tokens, args.completion_tokens, args.top_k, args.vocab, args.seed
    )
    batch = Completions.from_lists(completions, 0)
    client = ServedTeacher(TeacherServerConfig(url="http://unused"), "teacher", args.top_k, args.vocab)
    decode_s, score_s = [], []
    for _ in range(args.repetitions):
        start = time.perf_counter()
        answer = json.loads(body)
        decode_s.append(time.perf_counter() - start)
        client._request = lambda route, body=None, answer=answer: answer  # the parsed answer, no network
        start = time.perf_counter()
        client.score(prompts, batch.ids, batch.mask, args.top_k)
        score_s.append(time.perf_counter() - start)
    tokens = args.sequences * args.completion_tokens
    positions = args.sequences * (args.prompt_tokens + args.completion_tokens)
    result = {
        "top_k": args.top_k,
        "completion_tokens": tokens,
        "bytes_per_completion_token": round(len(body) / tokens),
        "bytes_per_position": round(len(body) / positions),
        "json_decode_us_per_completion_token": round(statistics.median(decode_s) / tokens * 1e6, 1),
        "score_us_per_completion_token": round(statistics.median(score_s) / tokens * 1e6, 1),
        "repetitions": args.repetitions,
        "note": "the answer holds every prompt position too (vLLM returns prompt log-probs for the whole prompt)",
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
