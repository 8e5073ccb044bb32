"""Shared test setup: one torch thread, the tiny teacher/student pair with its prompts and a tiny model that
answers known questions (each built once)."""

import pytest
import tiny
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors and tiny models: one intra-op thread. On a busy 2-core machine OpenMP's barrier makes a
    [2, 4] log_softmax take milliseconds instead of microseconds, and a tiny model's step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    """A tiny Qwen3 student and teacher (and a teacher with padded embeddings) saved by path, and 24 prompts."""
    directory = tmp_path_factory.mktemp("pair")
    student, teacher = tiny.write_pair(str(directory))
    padded = tiny.write_pair(str(directory / "padded"), teacher_vocab_pad=8)[1]
    data = tiny.write_prompts(str(directory / "prompts.jsonl"), count=24)
    return {"student": student, "teacher": teacher, "padded_teacher": padded, "data": data, "dir": directory}


@pytest.fixture(scope="session")
def answering_model(tmp_path_factory):
    """A tiny Qwen3 that answers each of `tiny.FACTS` with "answer : N" (greedy), saved by path."""
    return tiny.write_answering_model(str(tmp_path_factory.mktemp("answering") / "model"))
