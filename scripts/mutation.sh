#!/usr/bin/env bash
# Mutation testing of the modules that decide the numbers (docs/mutation.md). Not part of .ci/run.
#
#   scripts/mutation.sh            the fast subset: sampling, transforms and views, schedule, heads, evaluation
#   scripts/mutation.sh full       every module listed in [tool.mutmut] only_mutate (pyproject.toml)
#   scripts/mutation.sh MODULE...  mutants of these modules only, e.g. taskres.engine taskres.methods.taskres
#   scripts/mutation.sh NAME...    these mutants only (names as `mutmut results` prints them), e.g. to recheck
#                                  the survivors after adding tests
#
# Needs mutmut (pip install -c constraints.txt -e ".[mutation]"). Results stay in mutants/ (git-ignored); a rerun
# only tests the mutants of functions that changed. `mutmut results` lists the survivors, `mutmut show NAME` a diff.
# MUTMUT_CHILDREN (default 2) is the number of mutants run at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
CHILDREN=${MUTMUT_CHILDREN:-2}

FAST=(taskres.data.sampling taskres.data.images taskres.views taskres.engine taskres.evaluate
      taskres.methods.base taskres.methods._fused taskres.methods.taskres)
FULL=("${FAST[@]}" taskres.text taskres.cache taskres.safe_load taskres.data.benchmarks)

case "${1:-fast}" in
  fast) modules=("${FAST[@]}") ;;
  full) modules=("${FULL[@]}") ;;
  *) modules=("$@") ;;
esac

# Tests that start `python -m taskres` in a subprocess must import the mutated copy, not the installed package. The
# folder must exist before Python starts: a path that is missing at start-up is cached as empty, and the tests would
# then import the installed (unmutated) package and every mutant would be reported as not covered.
mkdir -p mutants/src
# mutmut forks one process per mutant from a process that has already run torch: a forked child that inherits an
# OpenMP thread pool can hang until the CPU limit (a false "timeout"). One thread each keeps the forks safe.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export PYTHONPATH="$PWD/mutants/src${PYTHONPATH:+:$PYTHONPATH}"
patterns=()
for m in "${modules[@]}"; do
  case "$m" in *__mutmut_*) patterns+=("$m") ;; *) patterns+=("$m.*") ;; esac
done
"$PY" -m mutmut run --max-children "$CHILDREN" "${patterns[@]}"
"$PY" -m mutmut export-cicd-stats >/dev/null 2>&1 || true
"$PY" - "${modules[@]}" <<'PYEOF'
"""Per-module counts from mutmut's result files (mutants/**/*.py.meta), with mutmut's own status names."""
import json, sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

rows = {}
for meta in Path("mutants").rglob("*.py.meta"):
    for name, code in json.loads(meta.read_text()).get("exit_code_by_key", {}).items():
        module = name[:name.index(".x")]
        if any(module == m or module.startswith(m + ".") or name == m for m in sys.argv[1:]):
            rows.setdefault(module, Counter())[status_by_exit_code[code]] += 1
total = Counter()
for c in rows.values():
    total.update(c)
cols = ["killed", "timeout", "survived", "no tests", "suspicious", "segfault", "not checked"]
print(f"{'module':32} {'mutants':>7} " + " ".join(f"{c:>11}" for c in cols) + "   score")
for module, c in sorted(rows.items()) + [("TOTAL", total)]:
    n = sum(c.values())
    tested = n - c["not checked"] - c["no tests"] - c["skipped"]
    score = 100.0 * (c["killed"] + c["timeout"]) / tested if tested else float("nan")
    print(f"{module:32} {n:7d} " + " ".join(f"{c[k]:11d}" for k in cols) + f"  {score:5.1f}%")
PYEOF
