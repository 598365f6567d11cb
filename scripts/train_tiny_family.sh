#!/usr/bin/env bash
# The whole tiny-family recipe, one command: runs every stage in order, each resumable. Re-run it after an
# interruption and it continues where it stopped (finished stages are skipped). Then exports the shipped models.
#   FLUXKIT_RUNS=/path/to/runs scripts/train_tiny_family.sh [--tools]
# (default runs dir: ./runs; --tools adds fill/canny/kontext/regional; lengthen the stages in configs/tiny-*.toml
# where compute allows: --resume continues a finished run to more steps). The shipped lineage (session 25,
# docs/model-card.md): tiny-ae -> caches tiny-cache-v3 + tiny-cache-halves3 -> tiny-base-c1 (7000 steps, centred
# position ids, 3.9 h) -> tiny-dev (2400 steps, 1.8 h) -> tiny-schnell (250 + 500 steps, 21 min), on 2 AVX2 cores in
# fp32; then the tools LoRAs (~25-70 min each). The family shipped before session 25 came from tiny-base ->
# tiny-dev-600 -> tiny-base-cont -> tiny-dev (git history of this script).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${FLUXKIT_RUNS:-runs}
# The shipped autoencoder (62 min to train) is adopted rather than retrained; delete it to retrain it.
if [[ -f fluxkit/weights/ae.safetensors && ! -f "$runs/tiny-ae/done.json" ]]; then
    .venv/bin/fluxkit train configs/tiny-ae.toml --threads "${THREADS:-2}" --runs-dir "$runs" \
        --from-weights fluxkit/weights/ae.safetensors
fi
stage() {  # NAME CONFIG [--set ...]: run (or continue) one stage unless it has finished
    local name=$1 config=$2
    shift 2
    [[ -f "$runs/$name/done.json" ]] && return 0
    .venv/bin/fluxkit train "$config" --threads "${THREADS:-2}" --runs-dir "$runs" --resume "$@"
    [[ -f "$runs/$name/done.json" ]] || { echo "stage $name stopped before finishing; re-run to continue" >&2; exit 1; }
}
stage tiny-ae configs/tiny-ae.toml
stage tiny-cache-v3 configs/tiny-cache-v3.toml
stage tiny-cache-halves3 configs/tiny-cache-halves.toml --set name=tiny-cache-halves3 \
    --set 'data.sizes=[[128, 128], [160, 96], [96, 160]]'
stage tiny-base-c1 configs/tiny-base-c1.toml
stage tiny-dev configs/tiny-dev.toml
stage tiny-schnell configs/tiny-schnell.toml
# The shipped schnell: 250 steps, then continued to 750 (a warm restart of the cosine; a no-op once it has them).
.venv/bin/fluxkit train configs/tiny-schnell.toml --threads "${THREADS:-2}" --runs-dir "$runs" --resume \
    --set train.steps=750
# tiny-dev ships with guidance 5 as its default: the evaluation's best of the two values tried (docs/model-card.md).
.venv/bin/fluxkit train --export "$runs/tiny-dev" --out fluxkit/weights/tiny-dev --ae-path ../ae.safetensors \
    --default-guidance 5
.venv/bin/fluxkit train --export "$runs/tiny-schnell" --out fluxkit/weights/tiny-schnell --ae-path ../ae.safetensors
# tiny-schnell ships as q8_0 (expanded to bf16 on load; the suite scores it as the bf16 file: docs/model-card.md), so
# that the family and its variant LoRAs fit 64 MB. tiny-dev stays bf16: the variant LoRAs are trained on its weights.
.venv/bin/fluxkit convert fluxkit/weights/tiny-schnell fluxkit/weights/tiny-schnell --to gguf --type q8_0
rm fluxkit/weights/tiny-schnell/transformer.safetensors
# The FLUX.1 tools variants (issue #6), fine-tuned from tiny-dev as control LoRAs (~1.2 MB each): only with --tools.
if [[ "${1:-}" == "--tools" ]]; then
    for stage in fill canny kontext regional; do
        [[ -f "$runs/tiny-$stage/done.json" ]] || \
        .venv/bin/fluxkit train "configs/tiny-$stage.toml" --threads "${THREADS:-2}" --runs-dir "$runs" --resume
        [[ -f "$runs/tiny-$stage/done.json" ]] || { echo "stage $stage stopped before finishing; re-run" >&2; exit 1; }
        if [[ $stage == regional ]]; then  # the shipped run: 1200 steps, then continued to 2400 (a warm restart)
            .venv/bin/fluxkit train configs/tiny-regional.toml --threads "${THREADS:-2}" --runs-dir "$runs" --resume \
                --set train.steps=2400 --set train.sample_every=600
        fi
        .venv/bin/fluxkit train --export "$runs/tiny-$stage" --out "fluxkit/weights/tiny-$stage" --base ../tiny-dev
    done
fi
