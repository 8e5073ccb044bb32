#!/usr/bin/env bash
# A few DOPD steps with the vLLM rollout backend on a small Qwen3 pair, on a GPU machine; prints step times.
#
#   bash scripts/gpu_smoke.sh                      # Qwen3-0.6B student, Qwen3-1.7B teacher, 3 steps, 1 GPU
#   NPROC=2 bash scripts/gpu_smoke.sh              # two processes (DDP, configs/accelerate/ddp.yaml)
#   STUDENT=Qwen/Qwen3-1.7B TEACHER=Qwen/Qwen3-8B MODE=colocate LORA=true bash scripts/gpu_smoke.sh
#   TEACHER_SERVER=http://localhost:8001 bash scripts/gpu_smoke.sh   # the teacher served by
#       `CUDA_VISIBLE_DEVICES=1 vllm serve Qwen/Qwen3-1.7B --max-logprobs 128 --port 8001` (model.teacher_server)
#
# It installs nothing: when a package is missing it says which command to run and stops. The models come from the
# Hugging Face hub by name (or a local path) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

STUDENT=${STUDENT:-Qwen/Qwen3-0.6B}
TEACHER=${TEACHER:-Qwen/Qwen3-1.7B}
STEPS=${STEPS:-3}
PROMPTS=${PROMPTS:-8}              # prompts per step, over all processes
GENERATIONS=${GENERATIONS:-4}      # rollouts per prompt
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-512}
MODE=${MODE:-colocate}             # colocate | server (then start `vllm serve` first, see the README)
GPU_MEMORY=${GPU_MEMORY:-0.3}      # colocate: share of each GPU vLLM may take
NPROC=${NPROC:-1}
LORA=${LORA:-false}
OUT=${OUT:-runs/gpu-smoke}
TEACHER_SERVER=${TEACHER_SERVER:-}  # a vLLM server with the teacher (empty: the teacher loads in each process)

python - <<'PY' || exit 1
import importlib.util, sys
missing = [name for name in ("dopd", "vllm", "trl") if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"missing: {', '.join(missing)}; install with: pip install -e '.[vllm,lora]' (then run this again)")
import torch
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible to torch: this smoke test needs one")
print(f"torch {torch.__version__}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}")
PY

mkdir -p "$OUT"
python - "$OUT/prompts.jsonl" <<'PY'
import json, random, sys
rng = random.Random(0)
with open(sys.argv[1], "w") as handle:
    for _ in range(64):
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(2, 9)
        handle.write(json.dumps({
            "prompt": f"Compute ({a} + {b}) * {c}. Give the final answer after 'Answer:'.",
            "privileged_context": f"Hint: first add {a} and {b}, then multiply the sum by {c}.",
            "answer": str((a + b) * c),
        }) + "\n")
PY

ARGS=(
  "model.student=$STUDENT" "model.teacher=$TEACHER" "model.dtype=bfloat16" "model.gradient_checkpointing=true"
  "model.lora.enabled=$LORA"
  "data.path=$OUT/prompts.jsonl" "data.max_prompt_length=256"
  "rollout.backend=vllm" "rollout.vllm.mode=$MODE" "rollout.vllm.gpu_memory_utilization=$GPU_MEMORY"
  "rollout.num_generations=$GENERATIONS" "rollout.max_new_tokens=$MAX_NEW_TOKENS"
  "objective.method=dopd" "optim.lr=1e-6"
  "train.steps=$STEPS" "train.prompts_per_step=$PROMPTS" "train.max_tokens_per_micro_batch=8192"
  "train.mixed_precision=bf16"
  "logging.output_dir=$OUT/run" "logging.overwrite=true" "logging.progress_bar=false" "logging.sample_every=1"
  "checkpoint.save_every=0"
)
if [ -n "$TEACHER_SERVER" ]; then
  ARGS+=("model.teacher_server.url=$TEACHER_SERVER")
fi
if [ "$NPROC" -gt 1 ]; then
  accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes "$NPROC" -m dopd train "${ARGS[@]}"
else
  dopd train "${ARGS[@]}"
fi

python - "$OUT/run/metrics.jsonl" <<'PY'
import json, sys
lines = [json.loads(line) for line in open(sys.argv[1])]
print(f"{'step':>4} {'step s':>8} {'rollout s':>10} {'scoring s':>10} {'update s':>9} {'tokens/s':>9} {'loss':>9} {'len':>6}")
for m in lines:
    print(f"{m['step']:>4} {m['time/step']:>8.2f} {m['time/rollout']:>10.2f} {m['time/scoring']:>10.2f} "
          f"{m['time/update']:>9.2f} {m['tokens_per_second']:>9.0f} {m['loss']:>9.4f} {m['completion_length/mean']:>6.0f}")
PY
