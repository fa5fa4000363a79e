#!/usr/bin/env bash
# Check the declared dependency floors: install the minimum version of every install_requires entry of setup.cfg
# (each `name>=X` installed as `name==X`; what those need is resolved by pip as usual) into a scratch venv, then run
# the tests that exercise those libraries (bank io and codecs, config, images, CLI errors, a tiny encode with dask,
# teachers, student and fine-tuning backbones, the SLURM cluster builder).
#
#   scripts/check_floors.sh            # or: make test-floors
#
# Environment:
#   PYTHON        interpreter of the floor venv (default python3.11: the oldest Python that setup.cfg admits)
#   FLOORS_VENV   where the scratch venv goes (default ${TMPDIR:-/tmp}/dreamteacher-floors; recreated every run)
#   FLOORS_TORCH  "floor" (default) installs the declared torch/torchvision floors together (torch 2.4 needs
#                 torchvision 0.19); any other value is passed to pip instead of them, e.g.
#                 FLOORS_TORCH="torch==2.14.1 torchvision==0.29.1" where the torch floor cannot be downloaded.
#   FLOORS_TESTS  pytest arguments (default: the test files below)
#   FLOORS_REV    a git revision (e.g. HEAD) to check instead of the working tree: its setup.cfg and its tests,
#                 exported into a temporary folder (uncommitted edits do not count)
# Slow (a few GB of wheels on the first run, cached by pip afterwards), so it is not part of `make test`.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [[ -n "${FLOORS_REV:-}" ]]; then
  SRC=$(mktemp -d "${TMPDIR:-/tmp}/dreamteacher-floors-src.XXXXXX")
  trap 'rm -rf "$SRC"' EXIT
  git -C "$ROOT" archive "$FLOORS_REV" | tar -x -C "$SRC"
  echo "checking $FLOORS_REV ($(git -C "$ROOT" rev-parse --short "$FLOORS_REV")) in $SRC"
  ROOT=$SRC
fi
PYTHON=${PYTHON:-python3.11}
VENV=${FLOORS_VENV:-${TMPDIR:-/tmp}/dreamteacher-floors}
FLOORS_TORCH=${FLOORS_TORCH:-floor}
FLOORS_TESTS=${FLOORS_TESTS:-tests/test_bank_io.py tests/test_bank_codecs.py tests/test_bank_reader.py tests/test_config.py \
  tests/test_images.py tests/test_cli.py tests/test_encode.py tests/test_teachers.py tests/test_distill_models.py \
  tests/test_finetune_models.py tests/test_slurm.py}

# install_requires + every extra (dev, slurm), `>=` turned into `==`; a requirement without a floor is an error (unchecked).
mapfile -t PINS < <("$PYTHON" - "$ROOT/setup.cfg" "$FLOORS_TORCH" <<'PY'
import configparser, re, sys
cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
torch_override = sys.argv[2] != "floor"
extras = cfg["options.extras_require"]
lines = cfg["options"]["install_requires"].split("\n") + [x for name in extras for x in extras[name].split("\n")]
for line in filter(None, (x.split("#")[0].strip() for x in lines)):
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+(?:\[[A-Za-z0-9_,\-]+\])?)\s*>=\s*([0-9][0-9A-Za-z.]*)(?:\s*,.*)?", line)
    if not match:
        sys.exit(f"setup.cfg: requirement {line!r} has no `>=` floor to check")
    name, floor = match.groups()
    if torch_override and name in ("torch", "torchvision"):
        continue
    print(f"{name}=={floor}")
PY
)
if [[ "$FLOORS_TORCH" != floor ]]; then read -r -a EXTRA <<<"$FLOORS_TORCH"; PINS+=("${EXTRA[@]}"); fi

start=$(date +%s)
echo "floor venv: $VENV ($("$PYTHON" --version))"
printf '  %s\n' "${PINS[@]}"
"$PYTHON" -m venv --clear "$VENV"
# (grep: this machine's pip.conf names local wheel folders that may be absent; pip warns once per package)
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
installed=$(date +%s)
echo "installed in $((installed - start)) s; versions:"
"$VENV/bin/python" -m pip list --disable-pip-version-check --format=freeze | grep -iE \
  "^(torch|torchvision|timm|diffusers|zarr|numcodecs|google-crc32c|webdataset|dask|dask-jobqueue|distributed|click|tqdm|pyyaml|safetensors|pillow|pycocotools|tensorboard|matplotlib|numpy|braceexpand|pytest|huggingface.hub)==" \
  | sed 's/^/  /'
# The project itself from the checkout (no install, so nothing is written into the tree but the tests' tmp files).
cd "$ROOT"
PYTHONPATH="$ROOT" "$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not gpu" $FLOORS_TESTS
echo "floors OK: install $((installed - start)) s, tests $(($(date +%s) - installed)) s"
