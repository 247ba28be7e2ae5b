#!/usr/bin/env bash
# PEFT's own LoRA tests against deltakern.patch (tracker issue 21).
#
# Downloads the sdist of the installed peft version, runs the LoRA cases of its tests/test_custom_models.py twice,
# plain and with every LoRA model passed through deltakern.patch (deltakern_patch_plugin.py), and prints the counts
# of both runs, what the patched run patched and fused (deltakern_patch_plugin's summary), and the tests that pass
# plain but fail patched (exit status 1 when there are any). Run it in deltakern's environment:
#   tools/peft_suite/run.sh [WORKDIR]        (default /tmp/deltakern_peft_suite; logs and JUnit XML land there)
# About 4 minutes a run on 2 CPU cores. The 9 tests that download a model from the Hugging Face Hub fail in both
# runs offline (HF_HUB_OFFLINE=1 is the default here, so they fail at once; set HF_HUB_OFFLINE=0 to try them online).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-/tmp/deltakern_peft_suite}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
version="$(python -c 'import peft; print(peft.__version__)')"
mkdir -p "$work" && cd "$work"
if [ ! -d "peft-$version" ]; then
  pip download "peft==$version" --no-binary :all: --no-deps -d . -q
  tar xzf "peft-$version.tar.gz"
fi
cd "peft-$version"
touch tests/__init__.py  # the sdist lacks it, and the test modules import each other relatively

# addopts cleared in every pytest call: PEFT's pyproject asks for pytest-cov, which the tests do not need.
pytest=(python -m pytest -p missing_test_deps -p no:cacheprovider -o addopts="" -q)

# The LoRA cases (about 2860 of the module's ~19500 tests): the ids naming no PEFT config but
# LoraConfig, i.e. the LoraConfig cases and the tests without a config id (mixed batches, DoRA,
# multi-rank, dynamic dispatch, add_weighted_adapter, ...; a few of those build another method's
# model, which the plugin leaves alone). -k cannot say this (it matches case-insensitive
# substrings: "TinyLoraConfig" contains "LoraConfig"), so the ids go to pytest in a file.
PYTHONPATH="$here" "${pytest[@]}" --collect-only tests/test_custom_models.py 2>/dev/null \
  | python -c 'import re, sys
for line in sys.stdin:
    if "::" in line and set(re.findall(r"[A-Za-z0-9]*Config", line)) <= {"LoraConfig"}:
        print(line.strip())' >"$work/selection.txt"

run() {  # run NAME [PYTEST ARGS...]: NAME.log and NAME.xml in $work, and the counts line
  local name=$1
  shift
  PYTHONPATH="$here" nice -n 19 "${pytest[@]}" "@$work/selection.txt" "$@" -rfE --junitxml="$work/$name.xml" \
    >"$work/$name.log" 2>&1 || true
  echo "$name (peft $version): $(tail -n 1 "$work/$name.log")"
}
count=$(wc -l <"$work/selection.txt")
if [ "$count" -eq 0 ]; then  # a collection error; an empty id file would run every test found
  echo "no tests selected; see: ${pytest[*]} --collect-only tests/test_custom_models.py" >&2
  exit 2
fi
echo "selected $count tests of tests/test_custom_models.py"
run plain
run patched -p deltakern_patch_plugin
grep "^deltakern.patch" "$work/patched.log" || true

python - "$work/plain.xml" "$work/patched.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET

def outcomes(path):
    result = {}
    for case in ET.parse(path).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        result[case.get("classname") + "::" + case.get("name")] = kinds[0] if kinds else "passed"
    return result

plain, patched = outcomes(sys.argv[1]), outcomes(sys.argv[2])
regressions = sorted(t for t, o in plain.items() if o == "passed" and patched.get(t) != "passed")
print(f"pass plain, fail patched: {len(regressions)}")
for test in regressions:
    print(f"  {patched.get(test, 'missing')}: {test}")
sys.exit(1 if regressions else 0)
PY
