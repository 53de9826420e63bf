#!/usr/bin/env bash
# Offline demo, CPU, about 4 minutes on 2 cores, no network:
#   1. train a teacher (SegFormer-b0 from a config, random init) on the synthetic preset, with --distill none;
#   2. train the student (a 0.46 M-parameter SegFormer) alone: the baseline;
#   3. distil the same student from the teacher of step 1 with AICSD;
#   4. print the three results side by side.
#
#   bash demo.sh                       # everything
#   TEACHER=outputs/demo/teacher bash demo.sh   # reuse a trained teacher (any folder or Hub id works)
#   STEPS=600 TEACHER_STEPS=600 bash demo.sh    # longer runs
set -euo pipefail
cd "$(dirname "$0")"

OUT=${OUT:-outputs/demo}
STEPS=${STEPS:-300}
TEACHER_STEPS=${TEACHER_STEPS:-200}
WORKERS=${WORKERS:-1}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

launch=(accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no train_icsd.py)
# --overwrite_output_dir: a second `bash demo.sh` replaces the first one's runs (each folder belongs to one run).
common=(--dataset synthetic --per_device_train_batch_size 8 --learning_rate 1e-3 --num_warmup_steps 10
        --dataloader_num_workers "$WORKERS" --seed 0 --logging_steps 25 --overwrite_output_dir)

if [ -z "${TEACHER:-}" ]; then
  echo "== 1/3 teacher: config:segformer-b0, $TEACHER_STEPS steps"
  "${launch[@]}" "${common[@]}" --distill none --student_model_name_or_path config:segformer-b0 \
    --max_train_steps "$TEACHER_STEPS" --output_dir "$OUT/teacher"
  TEACHER="$OUT/teacher"
fi

echo "== 2/3 baseline student: config:segformer-tiny alone, $STEPS steps"
"${launch[@]}" "${common[@]}" --distill none --student_model_name_or_path config:segformer-tiny \
  --max_train_steps "$STEPS" --output_dir "$OUT/baseline"

echo "== 3/3 AICSD student: config:segformer-tiny taught by $TEACHER, $STEPS steps"
"${launch[@]}" "${common[@]}" --distill aicsd --alw_granularity step --student_model_name_or_path config:segformer-tiny \
  --teacher_model_name_or_path "$TEACHER" --eval_teacher --max_train_steps "$STEPS" --output_dir "$OUT/aicsd"

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
aicsd = json.loads((out / "aicsd" / "all_results.json").read_text())
base = json.loads((out / "baseline" / "all_results.json").read_text())
rows = [("teacher", "teacher_eval_", aicsd), ("student alone", "eval_", base), ("student + AICSD", "eval_", aicsd)]
print("\n| model | mIoU (%) | mean acc (%) | pixel acc (%) |\n|---|---|---|---|")
for name, prefix, res in rows:
    cells = [f"{100 * res[prefix + k]:.2f}" for k in ("mean_iou", "mean_accuracy", "overall_accuracy")]
    print(f"| {name} | " + " | ".join(cells) + " |")
print(f"\n(synthetic validation set, 64 scenes; outputs in {out}/)")
PY
