"""Three training steps, run under `torch.distributed.run` by test_train.test_two_processes_match_one."""

import sys

from accelerate import PartialState
from tiny import make_config

from dopd.train import train

student, teacher, data, out = sys.argv[1:5]
# Greedy rollouts and two micro-batches a step: the same sequences in one process and in two.
config = make_config(
    {"student": student, "teacher": teacher, "data": data},
    out,
    *("train.steps=3", "optim.warmup_steps=1", "train.micro_batch_size=2", "rollout.temperature=0"),
    *("logging.sample_every=0", "train.device=cpu"),
)
train(config)
print(f"processes: {PartialState().num_processes}")
