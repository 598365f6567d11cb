#!/usr/bin/env bash
# The whole tiny-family recipe, one command: runs every stage in order, each resumable. Re-run it after an
# interruption and it continues where it stopped (finished stages are skipped). Then exports the shipped models.
#   FLUXKIT_RUNS=/path/to/runs scripts/train_tiny_family.sh [--tools]
# (default runs dir: ./runs; ~2.5 h on 2 AVX2 CPU cores in fp32, less with AVX512-BF16; --tools adds fill/canny/kontext;
# lengthen the stages in configs/tiny-*.toml where compute allows: --resume continues a finished run to more steps)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${FLUXKIT_RUNS:-runs}
# The shipped autoencoder (62 min to train) is adopted rather than retrained; delete it to retrain it.
if [[ -f fluxkit/weights/ae.safetensors && ! -f "$runs/tiny-ae/done.json" ]]; then
    .venv/bin/fluxkit train configs/tiny-ae.toml --threads "${THREADS:-2}" --runs-dir "$runs" \
        --from-weights fluxkit/weights/ae.safetensors
fi
for stage in ae cache base dev schnell; do
    [[ -f "$runs/tiny-$stage/done.json" ]] && continue
    .venv/bin/fluxkit train "configs/tiny-$stage.toml" --threads "${THREADS:-2}" --runs-dir "$runs" --resume
    [[ -f "$runs/tiny-$stage/done.json" ]] || { echo "stage $stage stopped before finishing; re-run to continue" >&2; exit 1; }
done
for model in dev schnell; do
    .venv/bin/fluxkit train --export "$runs/tiny-$model" --out "fluxkit/weights/tiny-$model" --ae-path ../ae.safetensors
done
# The FLUX.1 tools variants (issue #6), fine-tuned from tiny-dev as control LoRAs (~1.2 MB each): only with --tools.
if [[ "${1:-}" == "--tools" ]]; then
    for stage in fill canny kontext; do
        [[ -f "$runs/tiny-$stage/done.json" ]] || \
        .venv/bin/fluxkit train "configs/tiny-$stage.toml" --threads "${THREADS:-2}" --runs-dir "$runs" --resume
        [[ -f "$runs/tiny-$stage/done.json" ]] || { echo "stage $stage stopped before finishing; re-run" >&2; exit 1; }
        .venv/bin/fluxkit train --export "$runs/tiny-$stage" --out "fluxkit/weights/tiny-$stage" --base ../tiny-dev
    done
fi
