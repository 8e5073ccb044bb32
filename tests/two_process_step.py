"""Three training steps, run under `torch.distributed.run` by test_train.test_two_processes_match_one."""

import sys

from accelerate import PartialState

from dopd.config import load_config
from dopd.train import train

student, teacher, data, out = sys.argv[1:5]
config = load_config(
    overrides=[
        f"model.student={student}",
        f"model.teacher={teacher}",
        f"data.path={data}",
        f"logging.output_dir={out}",
        "train.steps=3",
        "optim.warmup_steps=1",
        "optim.lr=1e-2",
        "train.prompts_per_step=4",
        "train.micro_batch_size=2",
        "rollout.num_generations=2",
        "rollout.max_new_tokens=6",
        "rollout.temperature=0",
        "objective.top_k=8",
        "logging.progress_bar=false",
        "logging.sample_every=0",
        "checkpoint.save_every=0",
        "train.device=cpu",
    ]
)
train(config)
print(f"processes: {PartialState().num_processes}")
