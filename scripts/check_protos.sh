#!/usr/bin/env bash
# buf lint, buf breaking against the previous state of main, and the generated-code drift check.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=.tools/node_modules/.bin/buf

"$BUF" lint
echo "buf lint: ok"

# Compare with main when on another branch; on main, with the commit before HEAD (if it had protos).
branch=$(git rev-parse --abbrev-ref HEAD 2>/dev/null || echo "")
against=""
if [ -n "${DEML_PROTO_BASE:-}" ]; then
    against="$DEML_PROTO_BASE"
elif [ "$branch" != "main" ] && git rev-parse -q --verify main >/dev/null; then
    against=main
elif git rev-parse -q --verify HEAD~1 >/dev/null && git cat-file -e HEAD~1:buf.yaml 2>/dev/null; then
    against=HEAD~1
fi
if [ -n "$against" ]; then
    "$BUF" breaking --against ".git#ref=$(git rev-parse "$against")"
    echo "buf breaking against $against: ok"
else
    echo "buf breaking: no earlier contract to compare with"
fi

python scripts/gen_protos.py --check
