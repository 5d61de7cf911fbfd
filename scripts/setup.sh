#!/usr/bin/env bash
# Creates .venv and installs crystallm with its test extras. torch comes first, pinned to the local CPU
# wheel (any other torch spec would pull several GB of CUDA wheels); everything else honours constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,ray]"
