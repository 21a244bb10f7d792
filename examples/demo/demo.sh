#!/usr/bin/env bash
# The whole MeMo loop on the demo corpus, as `make demo` runs it: every step is a `memo` command a
# platform team would type (or submit with `ray job submit --working-dir . -- python jobs/X.py ...`).
#
# The corpus: 12 invented documents about a fictional cooperative (36 sentences), so no model can know
# the answers beforehand. On 2 CPU cores and no GPU the whole story takes ~17 minutes, mostly training.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH"
export MEMO_HOME="${MEMO_HOME:-$PWD/.memo}"
PORT="${MEMO_DEMO_PORT:-8000}"
t0=$SECONDS
stage() { echo; echo "== $1 =="; }

# 1. Synthesize + train + register. The offline `rules` generator turns the corpus into ~170
#    question/answer reflections (direct, indirect, entity, consolidated, cross-document, abstain) in
#    ~15 s (Ray Data); then SmolLM2-135M-Instruct learns them (Ray Train; 6 epochs at lr 3e-4, the
#    size-based recipe, see memo.training.recipe), 5% of the paraphrases held out, and the export gets
#    a GGUF for llama.cpp. The result is version N of memo-demo in the MLflow registry, alias `candidate`. Reflections land in a
#    folder named by the corpus and the settings, so a re-run synthesizes nothing.
stage "1/4 synthesize + train + register: memo train --domain demo --corpus examples/demo/corpus.jsonl"
memo train --domain demo --corpus examples/demo/corpus.jsonl
t_train=$SECONDS

# 2. Promote candidate -> champion through the gate: both versions answer the held-out paraphrases;
#    a candidate worse than the champion by more than the margin is refused (exit 3) and the champion
#    keeps serving.
stage "2/4 promote: memo promote --domain demo --to champion"
memo promote --domain demo --to champion --reason "make demo" \
  || echo "the gate refused the candidate: the current champion keeps serving"

# 3. Serve: the OpenAI-compatible router on 127.0.0.1 (Ray Serve). The router follows the alias, so
#    it answers with whatever version `champion` points at, and says which in every response.
stage "3/4 serve: memo serve --domains demo --port $PORT"
memo serve --domains demo --port "$PORT" &
server=$!
# TERM, not INT: a background job of a non-interactive shell starts with SIGINT ignored, so an INT
# would never reach it and `wait` would hang; memo serve shuts Serve down cleanly on TERM.
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/v1/models', timeout=2)" 2>/dev/null && break
  kill -0 $server 2>/dev/null || { echo "memo serve exited early"; exit 1; }
  sleep 1
done
t_serve=$SECONDS

# 4. The check questions (reworded, never the training questions; seven need two documents): the
#    executive closed-book, the memory's own answer, and MeMo (the executive decomposing the question and
#    questioning the served memory). The executive is Qwen2.5-Coder-1.5B-Instruct on llama.cpp (one
#    thread; `--executive-local qwen2.5-coder-0.5b` for the smaller one, `--executive-url` for any
#    OpenAI-compatible endpoint); the memory answers from its GGUF on llama.cpp inside the Serve replica.
#    Details go to $MEMO_HOME/demo_results.json.
stage "4/4 check questions: memo check --domain demo --url http://127.0.0.1:$PORT"
memo check --domain demo --questions examples/demo/questions.jsonl --url "http://127.0.0.1:$PORT"

stage "summary"
memo status --domain demo | head -4
echo "timings: train_s=$((t_train - t0)) serve_start_s=$((t_serve - t_train)) questions_s=$((SECONDS - t_serve)) total_s=$((SECONDS - t0))"
