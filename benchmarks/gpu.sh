#!/usr/bin/env bash
# The checks that need a GPU (issue 31): tests/test_cuda.py and the scale case of benchmarks/transformers.py (a
# 109.5M-parameter BERT-base-size classifier, every Linear layer, ours and Kronfluence on the device).
#
# A device machine reaches no package index and does not see ../shared, so what it lacks travels in .gpu/ (ignored
# by git through .git/info/exclude, about 3 MB): the Enron1 tarball, MiniLM's tokenizer files (the model is seeded,
# no weights travel) and the wheels of Kronfluence and of its pure-Python needs that its image does not hold.
#
#   bash benchmarks/gpu.sh pack     # here, once: fills .gpu/
#   bash benchmarks/gpu.sh run      # there: the device tool's command, with carry [".gpu"]; logs under $OUT
#
# The run takes about 5 minutes on an H100 (estimate: never run yet); GPU_N_TRAIN / GPU_N_TEST / GPU_BUDGET change
# the case's size and our memory budget.
set -euo pipefail
cd "$(dirname "$0")/.."

pack() {
    mkdir -p .gpu/wheels .gpu/minilm .gpu/enron
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
    cp ../shared/data/enron/enron1.tar.gz .gpu/enron/
    local folder
    folder=$(.venv/bin/python -c "from influencekit_paper.minilm import minilm_folder; print(minilm_folder())")
    for f in config.json vocab.txt tokenizer.json tokenizer_config.json special_tokens_map.json; do
        cp "$folder/$f" .gpu/minilm/
    done
    # the device image's python is 3.12; kronfluence, einconv and opt_einsum are pure Python
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        -d .gpu/wheels kronfluence==1.0.1 einconv opt_einsum
    du -sh .gpu
}

run() {
    : "${OUT:?the device tool sets OUT}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpu/wheels/*.whl
    export PYTHONPATH="$PWD/src:$PWD/tests:/tmp/site" PYTHONUNBUFFERED=1 INFLUENCEKIT_MINILM_FOLDER="$PWD/.gpu/minilm"
    mkdir -p ../shared/data
    [ -e ../shared/data/enron ] || ln -s "$PWD/.gpu/enron" ../shared/data/enron
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
        | tee -a "$OUT/device.txt"
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" || true
    python3 benchmarks/transformers.py --case large --device cuda --threads 16 --cache /tmp/ik-cache \
        --n-train "${GPU_N_TRAIN:-1000}" --n-test "${GPU_N_TEST:-50}" --memory-budget "${GPU_BUDGET:-40GiB}" \
        2>&1 | tee "$OUT/large.log"
}

case "${1:-}" in
pack) pack ;;
run) run ;;
*)
    echo "usage: bash benchmarks/gpu.sh pack|run" >&2
    exit 2
    ;;
esac
