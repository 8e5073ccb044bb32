"""The settings of `dopd lab` (`LabConfig`, its `--quick` and `--full` sizes) and of `dopd lab pretrain`
(`PretrainConfig`), with the methods the lab runs by default and the seeds its data are drawn with.

The comment after each field, or the `#:` lines just above it, is the help of its option (`dopd lab --help`,
`dopd lab pretrain --help`): every option is defined here once, with its default. This module imports nothing of
the lab's, so that the lab's modules can all read the settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_METHODS = ["sft", "opd", "opd-priv", "opsd", "dopd"]
FULL_ABLATIONS = [
    "dopd[self_weights=live]", "dopd[self_weights=ema]", "dopd[self_weights=lagged]", "opsd[self_weights=live]",
    "dopd[regimes=LH+HT]",
]  # fmt: skip
# The seeds the methods' training rows, the validation and the test prompts are drawn with (each from its own prompt
# split: tasks.prompt_split).
TRAIN_SEED, VALIDATION_SEED, TEST_SEED = 101, 202, 303


@dataclass
class LabConfig:
    #: lab task: order, add, arith, lookup or chain (add-swapped), module:Class, or a mixture in equal shares such
    #: as order+arith
    #: (its first task's pair gives the student and the teacher)
    task: str = "order"
    #: with a mixture task: score each row with its own task's pair teacher (model.teachers), not the first task's
    #: teacher for all
    teacher_per_task: bool = False
    #: share of the methods' training, validation and test problems whose answer only the privileged input
    #: determines, 0 to 1 (default: the task's own mix; the pair stays the task's own)
    undetermined_share: float | None = None
    #: privileged kinds, comma-separated: hints, solution, answer (one comparison each)
    privilege: list[str] = field(default_factory=lambda: ["hints"])
    #: methods, comma-separated, each with optional objective overrides in brackets (dopd[self_weights=ema],
    #: dopd[regimes=LH+HT]); sft and opd are always added as references
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # seeds, comma-separated
    steps: int = 40  # optimizer steps per run
    prompts_per_step: int = 32  # prompts per optimizer step
    num_generations: int = 4  # completions sampled per prompt
    #: learning rates every method runs at, comma-separated (warm-up then cosine decay, as in pretraining)
    lr_grid: list[float] = field(default_factory=lambda: [1e-4, 3e-4])
    warmup_steps: int = 4  # linear warm-up steps of every run
    eval_every: int = 10  # steps between validation accuracies of the curves
    n_train: int = 4000  # training prompts of the methods
    n_validation: int = 300  # validation prompts (the rates, the curves)
    n_test: int = 1200  # held-out test prompts (a binomial standard error of at most 1.44 points)
    top_k: int = 16  # objective.top_k of every run
    #: training prompts each run's attribution is measured on, before and after training (shares of tokens, loss
    #: and gradient per regime, part and plan tokens: lab/attribution.py); 0: not measured
    attribution_prompts: int = 16
    out: str = ""  # output directory (default: a new directory under runs/)
    cache_dir: str | None = None  # where built lab pairs are cached (default: $DOPD_CACHE/lab or ~/.cache/dopd/lab)
    threads: int = 1  # torch threads per worker: tiny models gain nothing from more
    workers: int = 2  # runs in parallel processes
    #: change the pair's pretraining (a LabPairConfig field, KEY=VALUE; repeatable), e.g. --pair teacher_steps=2000;
    #: another pair is built once and cached
    pair: list[str] = field(default_factory=list)
    allow_weak_pair: bool = False  # compare methods on a pair that fails a required property (the results say so)

    @staticmethod
    def quick(**overrides) -> LabConfig:
        """The same pipeline at the size of a first look (and CI): one seed, one rate, a few steps."""
        values = {
            "seeds": [0],
            "steps": 6,
            "lr_grid": [3e-4],
            "warmup_steps": 1,
            "eval_every": 3,
            "n_train": 400,
            "n_validation": 100,
            "n_test": 200,
            "prompts_per_step": 8,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return LabConfig(**values)

    @staticmethod
    def full(**overrides) -> LabConfig:
        """Five seeds and the ablations of the privileged self's weights and of the regimes."""
        values = {"seeds": [0, 1, 2, 3, 4], "methods": DEFAULT_METHODS + FULL_ABLATIONS}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return LabConfig(**values)


@dataclass
class PretrainConfig:
    """`dopd lab pretrain` (and `scripts/pretrain_lab.py`): pretrain a lab pair and measure its properties."""

    task: str = "order"  # lab task: order, add, arith, lookup or chain (add-swapped), or module:Class
    out: str | None = None  # output directory (default: the cache directory of the pair's config)
    #: change the pair's pretraining (a LabPairConfig field, KEY=VALUE; repeatable), e.g. --pair teacher_steps=2000
    pair: list[str] = field(default_factory=list)
    like_shipped: bool = False  # start from the config of the pair shipped for the task instead of today's defaults
    n_eval: int = 300  # validation prompts the pair's properties are measured on
    threads: int = 1  # torch threads
