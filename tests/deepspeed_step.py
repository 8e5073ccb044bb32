"""Two LoRA steps under DeepSpeed ZeRO-3 as accelerate sets it up from the launch environment, on the CPU; run by
test_accelerate_configs.test_zero3_run_starts_trains_and_saves with `python -m torch.distributed.run`.

accelerate creates its `HfDeepSpeedConfig` when the Accelerator starts, so `from_pretrained` then loads every model
partitioned (ZeRO-3's empty parameters): the run must read the heads' shapes through that."""

import json
import sys

from accelerate import Accelerator

from dopd.config import load_config
from dopd.train import Trainer

student, teacher, data, out = sys.argv[1:5]
config = load_config(
    overrides=[
        f"model.student={student}",
        f"model.teacher={teacher}",
        f"data.path={data}",
        f"logging.output_dir={out}",
        "train.steps=2",
        "optim.lr=1e-2",
        "train.prompts_per_step=4",
        "train.micro_batch_size=8",
        "rollout.num_generations=2",
        "rollout.max_new_tokens=6",
        "rollout.temperature=0",
        "objective.top_k=8",
        "model.lora.enabled=true",
        "objective.self_weights=live",
        "logging.progress_bar=false",
        "logging.sample_every=0",
        "checkpoint.save_every=0",
    ]
)
accelerator = Accelerator()
trainer = Trainer(config, accelerator)
partitioned = all(hasattr(p, "ds_id") for p in trainer.teacher.parameters())
trainer.run()
print(json.dumps({"engine": str(accelerator.distributed_type), "teacher_partitioned": partitioned}))
