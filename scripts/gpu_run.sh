#!/usr/bin/env bash
# The GPU node's whole session (issue 22): about 5 minutes, offline, Python 3.12 + torch 2.11 (CUDA 13).
#   usage: scripts/gpu_run.sh [--tiny] [OUT (default gpu_out/)]
# Installs the wheels of scripts/fetch_gpu_wheels.sh (GPU_WHEELS, default gpu_wheels/) into OUT/site with
# `pip install --no-index --no-deps --target` and puts it on PYTHONPATH after the repository, then runs, each part
# under its own `timeout` and none stopping the others:
#   gpu_check  python -m pipeline.tools.gpu_check       every stage at tiny size on the CPU and CUDA, compared
#   bench      python -m pipeline.cli bench --only PAPER,DENS   the paper's runtime claims (spectral norm, log-det)
#   flow       python -m pipeline.tools.gpu_budget flow  configs/mnist's flow for a fixed budget; s/epoch, test bits/dim
#   toy        python -m pipeline.tools.gpu_budget toy   configs/mnist's 2-D toy (Fig. 2 scale) for a fixed number of steps
#   ddp        torchrun --nproc-per-node 1 -m pipeline.tools.gpu_budget ddp   NCCL process group + DDP steps
# Every result is JSON under OUT (<part>.json, <part>.status.json, env.json, run.json); the logs beside them.
# Copy OUT/*.json to reports/gpu/ and run the report stage to show them in reports/README.md.
# --tiny (or GPU_RUN_PROFILE=tiny): the same parts at smoke-test size on the CPU (a few minutes on 2 cores).
set -u
tiny=0
out=gpu_out
for arg in "$@"; do
  case "$arg" in
    --tiny) tiny=1 ;;
    -h|--help) sed -n 2,16p "$0"; exit 0 ;;
    *) out="$arg" ;;
  esac
done
[ "${GPU_RUN_PROFILE:-}" = tiny ] && tiny=1
repo="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$repo"
py="${PYTHON:-python}"
wheels="${GPU_WHEELS:-$repo/gpu_wheels}"
site="${GPU_SITE:-$out/site}"
export IRESNET_TRACKING=0 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
t_start=$(date +%s)
echo "gpu_run: tiny=$tiny out=$out wheels=$wheels"

if [ "$tiny" = 1 ]; then
  device=cpu
  L_CHECK=${L_CHECK:-300}; L_BENCH=${L_BENCH:-120}; L_FLOW=${L_FLOW:-120}; L_TOY=${L_TOY:-90}; L_DDP=${L_DDP:-90}
  FLOW_BUDGET=${FLOW_BUDGET:-3}; TOY_STEPS=${TOY_STEPS:-10}
  check_args=(--device cpu --smoke); bench_args=(--quick); tiny_arg=(--tiny)
else
  device=cuda
  # 5 minutes in all: 90 + 50 + 70 + 40 + 30 s at most, plus the install (~5 s) and env (~5 s)
  L_CHECK=${L_CHECK:-90}; L_BENCH=${L_BENCH:-50}; L_FLOW=${L_FLOW:-70}; L_TOY=${L_TOY:-40}; L_DDP=${L_DDP:-30}
  FLOW_BUDGET=${FLOW_BUDGET:-35}; TOY_STEPS=${TOY_STEPS:-200}
  check_args=(--device cuda); bench_args=(); tiny_arg=()
fi

statuses=()
part() {  # part NAME LIMIT COMMAND...: run under timeout, log, and record its exit status
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > >(tee "$out/$name.log") 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local timed_out=false
  { [ $rc = 124 ] || [ $rc = 137 ]; } && timed_out=true
  printf '{"part": "%s", "rc": %d, "seconds": %d, "limit_s": %d, "timed_out": %s}\n' \
    "$name" "$rc" "$dt" "$limit" "$timed_out" > "$out/$name.status.json"
  statuses+=("$(cat "$out/$name.status.json")")
  echo "== $name: rc $rc in ${dt}s"
}

# The missing packages, from wheels (no index, no dependencies), ahead of anything installed.
if [ -d "$wheels" ] && ls "$wheels"/*.whl > /dev/null 2>&1; then
  part install 60 "$py" -m pip install --no-index --no-deps --disable-pip-version-check --target "$site" \
    "$wheels"/*.whl
else
  echo "gpu_run: no wheels in $wheels (scripts/fetch_gpu_wheels.sh): using what is installed"
fi
export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"

part env 30 "$py" -c "
import json, platform, sys, time, torch
import pydantic, ruamel.yaml, yaml, mlxtend, tabulate
info = {'part': 'env', 'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,
        'cuda_available': torch.cuda.is_available(), 'device': '$device',
        'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        'pydantic_from': pydantic.__file__, 'tiny': $tiny == 1, 'date': time.strftime('%Y-%m-%dT%H:%M:%S')}
json.dump(info, open('$out/env.json', 'w'), indent=1)
print(json.dumps(info, indent=1))
"
part gpu_check "$L_CHECK" "$py" -m pipeline.tools.gpu_check "${check_args[@]}" --json "$out/gpu_check.json"
part bench "$L_BENCH" "$py" -m pipeline.cli --device "$device" bench "${bench_args[@]}" --only PAPER,DENS \
  --json "$out/bench.json"
part flow "$L_FLOW" "$py" -m pipeline.tools.gpu_budget flow --device "$device" --budget "$FLOW_BUDGET" "${tiny_arg[@]}" \
  --json "$out/flow.json"
part toy "$L_TOY" "$py" -m pipeline.tools.gpu_budget toy --device "$device" --steps "$TOY_STEPS" "${tiny_arg[@]}" \
  --json "$out/toy.json"
part ddp "$L_DDP" "$py" -m torch.distributed.run --standalone --nproc-per-node 1 -m pipeline.tools.gpu_budget ddp \
  --device "$device" "${tiny_arg[@]}" --json "$out/ddp.json"

total=$(( $(date +%s) - t_start ))
{ printf '{"part": "run", "tiny": %s, "seconds": %d, "parts": [' "$([ $tiny = 1 ] && echo true || echo false)" "$total"
  (IFS=,; printf '%s' "${statuses[*]}")
  printf ']}\n'; } > "$out/run.json"
echo "gpu_run: done in ${total}s; results in $out:"
cat "$out/run.json"
