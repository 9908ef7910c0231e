#!/usr/bin/env bash
# ruff (lint + format check) and mypy over the packages.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/mypy
