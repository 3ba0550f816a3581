#!/usr/bin/env bash
# The GPU figures of benchmarks/README.md in one or two commands on a lent H100 / H200. Sized for the device tool:
# 10 minutes per command (each benchmark has its own timeout, so one that hangs does not cost the others), at most
# 8 files back from $OUT. From the repository root:
#
#   bash benchmarks/gpu_suite.sh dit             small DiT, bf16: eager, then torch.compile             (~3 min)
#   bash benchmarks/gpu_suite.sh amp             small DiT, fp32 weights under bf16 autocast (the scripts'
#                                                mixed precision), eager                                 (~1 min)
#   bash benchmarks/gpu_suite.sh flux            FLUX.1 (random 11.9 B weights, 512 px, LoRA r32, gradient
#                                                checkpointing): LoRA step, RATS step (teacher copy and adapter),
#                                                GRPO step of otca.py                                    (~6 min)
#   SMOKE=1 bash benchmarks/gpu_suite.sh dit flux   the same code paths at tiny sizes on a CPU (tests/test_bench.py)
#
# Writes $OUT/gpu.jsonl (one JSON line per benchmark), $OUT/gpu_log.txt (each command and its output) and
# $OUT/gpu.md (the table for benchmarks/README.md, beside the RATS paper's efficiency table). OUT defaults to
# runs/gpu. The device image has torch but not diffusers: run benchmarks/gpu_wheels.sh here first and carry .whl;
# this script installs what it finds there. PY picks the interpreter (default python3).
set -u
OUT=${OUT:-runs/gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

bench() {   # bench <timeout s> <script> <flags...>: one JSON line appended to gpu.jsonl, everything to the log
    local limit=$1; shift
    local json; json=$(mktemp)
    echo "\$ $PY $*" >> "$OUT/gpu_log.txt"
    timeout "$limit" "$PY" "$@" --out "$json" >> "$OUT/gpu_log.txt" 2>&1
    local rc=$?
    if [ $rc -eq 0 ] && [ -s "$json" ]; then
        printf '%s\n' "$(cat "$json")" >> "$OUT/gpu.jsonl"     # one line each, whatever the file ends with
    else
        printf '{"benchmark": "%s", "argv": "%s", "error": "exit status %s (see gpu_log.txt)"}\n' "$1" "$*" "$rc" \
            >> "$OUT/gpu.jsonl"
    fi
    rm -f "$json"
    echo "$* -> exit $rc"
}

if [ "${SMOKE:-0}" = 1 ]; then   # tiny sizes on a CPU: proves the commands, measures nothing
    DIT=(--preset tiny --batch 2 --warmup 0 --steps 1 --device cpu); AMP=(--preset tiny --batch 2 --warmup 0
    --steps 1 --device cpu --dtype fp32 --amp)
    FLUX=(--tiny --device cpu --steps 1 --warmup 0)
    RATS=(--teacher-nfe 4); GRPO=(--nfe 3 --group-size 2 --micro-batch 1)
else
    DIT=(--preset small --dtype bf16); AMP=(--preset small --dtype fp32 --amp); FLUX=(); RATS=(); GRPO=()
fi
[ $# -eq 0 ] && set -- dit flux
for part in "$@"; do
    case $part in
        dit)
            bench 240 benchmarks/dit_throughput.py "${DIT[@]}"
            bench 330 benchmarks/dit_throughput.py "${DIT[@]}" --compile ;;
        amp)
            bench 300 benchmarks/dit_throughput.py "${AMP[@]}" ;;
        flux)
            bench 150 benchmarks/flux_lora_step.py "${FLUX[@]}"
            bench 150 benchmarks/flux_method_step.py --method rats "${FLUX[@]}" "${RATS[@]}"
            bench 150 benchmarks/flux_method_step.py --method rats --teacher-copy adapter "${FLUX[@]}" "${RATS[@]}"
            bench 240 benchmarks/flux_method_step.py --method grpo "${FLUX[@]}" "${GRPO[@]}" ;;
        *) echo "error: unknown part '$part' (dit | amp | flux)" >&2; exit 2 ;;
    esac
done
"$PY" -m benchmarks.gpu_table "$OUT/gpu.jsonl" > "$OUT/gpu.md" && cat "$OUT/gpu.md"
