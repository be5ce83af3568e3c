#!/usr/bin/env bash
# Resolves `pip install ".[operator,trainer,dev]"` the way someone installing the package does,
# without constraints.txt, in a throwaway virtualenv: it fails when pip cannot settle within the
# limit (a resolver backtracking through hundreds of releases) or would build any dependency
# from a source distribution. Prints what an unconstrained install gets today.
set -euo pipefail
cd "$(dirname "$0")/.."
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
python3 -m venv "$probe/venv"
"$probe/venv/bin/python" -m pip install --quiet --upgrade pip
started=$(date +%s)
if ! timeout "${RESOLVE_LIMIT_SECONDS:-600}" "$probe/venv/bin/python" -m pip install --quiet \
    --dry-run --ignore-installed --report "$probe/report.json" ".[operator,trainer,dev]"; then
  echo "an unconstrained install of .[operator,trainer,dev] did not resolve within" \
    "${RESOLVE_LIMIT_SECONDS:-600}s: state the bound that stops the backtracking in pyproject.toml" >&2
  exit 1
fi
python3 - "$probe/report.json" "$(( $(date +%s) - started ))" <<'PY'
import json
import sys

report = json.load(open(sys.argv[1]))
installs = report["install"]
# The project itself is a local directory; every dependency must come as a wheel.
sources = [
    f"{i['metadata']['name']} {i['metadata']['version']}"
    for i in installs
    if "dir_info" not in i["download_info"] and not i["download_info"]["url"].endswith(".whl")
]
versions = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in installs}
shown = ("torch", "transformers", "trl", "peft", "accelerate", "kopf", "kubernetes", "botocore", "pandas")
print(f"unconstrained install resolves in {sys.argv[2]}s:",
      ", ".join(f"{name} {versions.get(name, '-')}" for name in shown))
if sources:
    sys.exit(f"these would be built from source distributions: {', '.join(sources)}; "
             "bound them in pyproject.toml to a release with wheels")
PY
