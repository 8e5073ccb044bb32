"""Two LoRA steps under DeepSpeed ZeRO-3 as accelerate sets it up from the launch environment, on the CPU; run by
test_accelerate_configs.test_zero3_run_starts_trains_and_saves with `python -m torch.distributed.run`.

accelerate creates its `HfDeepSpeedConfig` when the Accelerator starts, so `from_pretrained` then loads every model
partitioned (ZeRO-3's empty parameters): the run must read the heads' shapes through that."""

import json
import sys

from accelerate import Accelerator
from tiny import make_config

from dopd.train import Trainer

student, teacher, data, out = sys.argv[1:5]
config = make_config(
    {"student": student, "teacher": teacher, "data": data},
    out,
    *("train.micro_batch_size=8", "rollout.temperature=0", "logging.sample_every=0"),
    *("model.lora.enabled=true", "objective.self_weights=live"),
)
accelerator = Accelerator()
trainer = Trainer(config, accelerator)
partitioned = all(hasattr(p, "ds_id") for p in trainer.teacher.parameters())
trainer.run()
print(json.dumps({"engine": str(accelerator.distributed_type), "teacher_partitioned": partitioned}))
