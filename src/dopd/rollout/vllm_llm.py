"""`dopd eval --backend vllm`: completions from a vLLM engine (`vllm.LLM`) over a checkpoint on disk, with tensor
parallelism, behind the rollout interface (`generate(prompt_ids, num_generations)` returning `Rollouts`), so that
`evaluate.sample_completions` reads them as it reads transformers' (the report is the same).

The trainer's own vLLM engine (`vllm.py`) holds the live student; this one loads a saved model by path. vLLM is
imported only when the engine is built; `tests/test_evaluate.py` runs it against the tests' fake `LLM`.
"""

from __future__ import annotations

import importlib.util

from ..config import ConfigError
from . import Rollouts, end_of_sequence_ids, trim_completion

INSTALL = 'pip install "dopd[vllm]"'


def require_vllm_llm() -> None:
    """One line when vLLM is not installed (checked before the data set or any model is read)."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            f"--backend vllm needs vLLM, which is not installed: {INSTALL} on a GPU machine, or use --backend hf"
        )


def sampling_settings(sampling, eos_ids: set[int], seed: int) -> dict:
    """`vllm.SamplingParams` keyword arguments from `dopd eval`'s sampling settings: the same decoding as the hf
    backend (greedy at temperature 0, top-k 0 meaning off, ending at every end-of-sequence id), one completion per
    request (each prompt is sent `num_generations` times, each request seeded on its own)."""
    greedy = sampling.temperature == 0
    return dict(
        n=1,
        temperature=0.0 if greedy else sampling.temperature,
        top_p=1.0 if greedy else sampling.top_p,
        top_k=-1 if greedy or not sampling.top_k else sampling.top_k,
        max_tokens=sampling.max_new_tokens,
        stop_token_ids=sorted(eos_ids),
        skip_special_tokens=False,
        seed=seed,
    )


class VLLMEngine:
    """A `vllm.LLM` and `dopd eval`'s sampling settings; `generate` gives `Rollouts` (prompt 0's completions
    first)."""

    def __init__(self, llm, sampling, eos_ids: set[int], seed: int, sampling_params=None):
        self.llm, self.sampling, self.eos_ids, self.seed = llm, sampling, eos_ids, seed
        self.sampling_params = sampling_params  # vllm.SamplingParams (a stand-in in the tests)

    @classmethod
    def create(cls, spec, tokenizer) -> VLLMEngine:
        require_vllm_llm()
        import vllm

        dtype = "auto" if spec.dtype == "auto" else spec.dtype
        llm = vllm.LLM(
            model=spec.model,
            tokenizer=spec.tokenizer or spec.model,
            tensor_parallel_size=spec.tensor_parallel_size,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            max_model_len=spec.max_model_len,
            dtype=dtype,
            seed=spec.seed,
            trust_remote_code=bool(spec.trust_remote_code),
        )
        from transformers import GenerationConfig

        try:
            generation = GenerationConfig.from_pretrained(spec.model)
        except OSError:  # a checkpoint without generation_config.json: the tokenizer's end-of-sequence id only
            generation = None

        class _Model:  # end_of_sequence_ids reads `generation_config`
            generation_config = generation

        return cls(llm, spec.sampling, end_of_sequence_ids(tokenizer, _Model), spec.seed, vllm.SamplingParams)

    def generate(self, prompt_ids: list[list[int]], num_generations: int, images: list | None = None) -> Rollouts:
        if images is not None:
            raise ValueError("--backend vllm does not carry images in `dopd eval`; use --backend hf")
        requests, params = [], []
        for row, ids in enumerate(prompt_ids):
            for sample in range(num_generations):
                requests.append({"prompt_token_ids": list(ids)})
                # A seed per request: the same prompt's samples differ, and a rerun gives the same completions.
                seed = self.seed * 1_000_003 + row * 1009 + sample
                params.append(self.sampling_params(**sampling_settings(self.sampling, self.eos_ids, seed)))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
        index, completions, finished = [], [], []
        for number, output in enumerate(outputs):
            ids, done = trim_completion(list(output.outputs[0].token_ids), self.eos_ids)
            index.append(number // num_generations)
            completions.append(ids)
            finished.append(done)
        return Rollouts(index, completions, finished)
