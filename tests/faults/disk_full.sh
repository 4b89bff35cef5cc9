#!/usr/bin/env bash
# A full disk, for real (issue 28 §6): tiny trainings into a 20 MB tmpfs, filled up to a few
# hundred kB or MB free before each case. Checks that
#   - a run whose checkpoint and final/ clearly cannot fit is refused before it starts;
#   - a checkpoint write that fills the disk is one line naming the directory, leaves no
#     .tmp_step_*, keeps the earlier checkpoint, and the run resumes once space is freed;
#   - a final/ that cannot be written leaves the step in a checkpoint (and says to export it),
#     or says that nothing survived;
#   - an export onto a full disk is one line and leaves nothing;
#   - a killed save's stale .tmp_step_* is removed on the next start.
# Needs root (mount) on Linux. Not part of `make test`:
#   sudo tests/faults/disk_full.sh            # PYTHON=... for another interpreter
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python}
export PYTHONPATH="$ROOT/src:$ROOT/tests" SFTUNE_CACHE_DIR
WORK=$(mktemp -d)
SFTUNE_CACHE_DIR=$WORK/cache
FS=$WORK/fs
mkdir "$FS"
mount -t tmpfs -o size=20m tmpfs "$FS"
trap 'umount "$FS"; rm -rf "$WORK"' EXIT

"$PY" - "$WORK" <<'PYEOF'
import json, random, sys
from pathlib import Path
from tiny import byte_tokenizer, tiny_model_dir
work = Path(sys.argv[1])
tiny_model_dir(work / "model", byte_tokenizer())
rng = random.Random(0)
with open(work / "train.jsonl", "w") as f:
    for _ in range(160):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        f.write(json.dumps({"prompt": f"Add {a} and {b}.", "response": f"The answer is {a + b}."}) + "\n")
PYEOF

fails=0
check() {  # check NAME CONDITION...: prints ok/FAIL
    local name=$1; shift
    if "$@"; then echo "ok   $name"; else echo "FAIL $name"; fails=$((fails + 1)); fi
}
leave_free() {  # leave_free BYTES: a filler file takes the rest of the tmpfs
    rm -f "$FS/filler"
    local avail
    avail=$(df --output=avail -B1 "$FS" | tail -1)
    head -c $((avail - $1)) /dev/zero > "$FS/filler"
}
sftune() {  # sftune ARGS: runs it, keeping rc in $rc and stderr's error line in $err
    set +e
    "$PY" -m sftune "$@" > "$WORK/out.log" 2> "$WORK/err.log"
    rc=$?
    set -e
    err=$(grep -a "sftune: error:" "$WORK/err.log" || true)
    echo "     rc $rc: ${err:-(no error line)}"
}
one_line() { [ "$(grep -ac 'sftune: error:' "$WORK/err.log")" = 1 ] && ! grep -aq Traceback "$WORK/err.log"; }
no_temps() { [ -z "$(find "$FS" -name '.tmp_*' -o -name '.final.*' -o -name '.exp.*')" ]; }
train() {  # train OUT ARGS
    local out=$1; shift
    sftune train --model "$WORK/model" --train-data "$WORK/train.jsonl" --seq-length 32 \
        --batch-size 8 --num-samples 0 --log-every 1 --output-dir "$FS/$out" "$@"
}

echo "== a disk that cannot hold the run"
leave_free 200000
train refused --max-steps 2
check "refused in one line" [ "$rc" = 2 ]
check "says how much is needed and free" grep -aq "not enough disk space" "$WORK/err.log"
check "one line, no traceback" one_line
check "nothing written" [ ! -e "$FS/refused" ]

echo "== a checkpoint that fills the disk"
leave_free 2600000
train ckpt --max-steps 4 --save-every 1
check "stops in one line" [ "$rc" = 2 ]
check "says the disk is full, names the directory" grep -aq "tmp_step_.*no space left on device" "$WORK/err.log"
check "one line, no traceback" one_line
check "no .tmp_step_ left" no_temps
check "the earlier checkpoint is kept" [ -d "$FS/ckpt/checkpoints/step_00000001" ]
mkdir -p "$FS/ckpt/checkpoints/.tmp_step_00000009/model_optim"  # as a killed save leaves it
rm -f "$FS/filler"
train ckpt --max-steps 4 --save-every 1 --resume latest
check "resumes once there is space" [ "$rc" = 0 ]
check "the stale .tmp_step_ is removed" no_temps
check "final/ written" [ -f "$FS/ckpt/final/model.safetensors" ]
rm -rf "$FS/ckpt"

echo "== final/ on a full disk, after a checkpoint of the last step"
leave_free 1900000
train last --max-steps 2 --save-every 2
check "one line" one_line
check "final/ not written, the step kept" grep -aq "holds step 2: .sftune export" "$WORK/err.log"
check "no temporary final/" no_temps
rm -f "$FS/filler"
sftune export "$FS/last/checkpoints/step_00000002" --out "$FS/exported"
check "the kept checkpoint exports" [ "$rc" = 0 ] && [ -f "$FS/exported/model.safetensors" ]
rm -rf "$FS/last" "$FS/exported"

echo "== final/ on a full disk, no checkpoints (--save-every 0)"
leave_free 560000
train none --max-steps 2
check "one line" one_line
check "says that nothing survived" grep -aq "no checkpoint survived" "$WORK/err.log"
check "no temporary final/, no half checkpoint" no_temps
rm -rf "$FS/none"

echo "== export onto a full disk"
rm -f "$FS/filler"
train src --max-steps 1 --save-every 1
leave_free 100000
sftune export "$FS/src/checkpoints/step_00000001" --out "$FS/exp"
check "one line naming --out" grep -aq "exp: cannot write: no space left on device" "$WORK/err.log"
check "one line, no traceback" one_line
check "nothing left" [ ! -e "$FS/exp" ]
check "no temporaries" no_temps

echo "$fails failed"
[ "$fails" = 0 ]
