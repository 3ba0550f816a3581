#!/usr/bin/env bash
# Here (not on the device machine): the wheels that the device image lacks, for its Python 3.12, into .whl/ (in
# .gitignore; the device tool sends it with `carry: [".whl"]`), at this project's pinned versions. The image has torch, torchvision,
# scipy, accelerate, safetensors and huggingface_hub already (/work/.library/device/KINDS.md).
set -eu
PY=${PY:-.venv/bin/python}
# shellcheck disable=SC2046
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    $(grep -E '^(diffusers|peft|transformers|tokenizers)==' requirements.txt)
ls -l .whl
