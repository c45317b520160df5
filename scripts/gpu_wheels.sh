#!/bin/bash
# For a GPU machine without internet that has torch (and peft, pandas, matplotlib, seaborn, safetensors, tqdm,
# pyyaml, requests) but not the rest: fill .whl/ (git-ignored) with the wheels it lacks, for Python 3.12 on x86_64
# Linux: diffusers for every stage, and papermill with a Jupyter kernel for `flg notebooks run`. The versions are
# this checkout's .venv's, so the GPU machine runs what the tests ran. Without imageio-ffmpeg there, sample videos
# come as gif and png.
#
#   bash scripts/gpu_wheels.sh      # here; copy the checkout with .whl/ to the GPU machine: gpu_teacher.sh and
#                                   # gpu_notebooks.sh install the wheels first when diffusers is missing
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NAMES="diffusers importlib-metadata lazy-importer
papermill nbclient nbformat fastjsonschema jsonschema jsonschema-specifications referencing rpds-py
entrypoints tenacity jupyter-client jupyter-core platformdirs traitlets pyzmq tornado
ipykernel comm debugpy ipython ipython-pygments-lexers jedi parso matplotlib-inline nest-asyncio2 pexpect
ptyprocess prompt-toolkit wcwidth stack-data asttokens executing pure-eval"
mkdir -p .whl
for n in $NAMES; do
  v=$($PY -c "import importlib.metadata as m; print(m.version('$n'))")
  ls .whl/"$(echo "$n" | tr - _)"-"$v"-*.whl >/dev/null 2>&1 && continue
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$n==$v"
done
du -sh .whl
