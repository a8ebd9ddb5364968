#!/usr/bin/env bash
# Prepare bench/offline/ for bench/bench_qlora_gpu.py on a GPU machine that cannot reach a package registry.
#
# Run here, from the repository root, on a machine with PyPI and ../shared beside the checkout:
#     bash bench/prepare_gpu_bench.sh
# It downloads, for CPython 3.12 on x86-64 Linux, the wheels the GPU image lacks (bitsandbytes for the 4-bit
# base, TRL and datasets for the TRL baseline, and the two packages datasets needs that the image lacks), without
# their dependencies (the image has torch, transformers, peft, accelerate, pyarrow, ...), and copies the
# Llama-3.1 tokenizer (128,256 tokens) the benchmark uses. bench/offline/ is ignored by git; about 55 MB.
# docs/training.md gives the command that installs them there (pip install --no-index) and runs the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=bench/offline
mkdir -p "$dest/wheels" "$dest/llama3_1"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$dest/wheels" \
    bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
cp ../shared/tokenizers/llama3_1/tokenizer.json ../shared/tokenizers/llama3_1/tokenizer_config.json "$dest/llama3_1/"
du -sh "$dest"
ls "$dest/wheels"
