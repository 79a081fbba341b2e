#!/usr/bin/env bash
# Run the test suite in the project's environment (created on first use).
source "$(dirname "$0")/env.sh"
exec python -m pytest -q "$@"
