"""One step with validation before and after it, run under `torch.distributed.run` by
test_validation.test_two_processes_share_the_prompts_and_agree."""

import sys

from accelerate import PartialState
from tiny import make_config

from dopd.train import train

student, teacher, data, held_out, out = sys.argv[1:6]
config = make_config(
    {"student": student, "teacher": teacher, "data": data},
    out,
    *("train.steps=1", "rollout.temperature=0", "optim.lr=1e-4", "logging.sample_every=0", "train.device=cpu"),
    *("eval.every=1", f"eval.path={held_out}", "eval.max_new_tokens=6", "eval.checker=exact"),
)
train(config)
print(f"processes: {PartialState().num_processes}")
