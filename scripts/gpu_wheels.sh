#!/usr/bin/env bash
# Downloads the wheels scripts/gpu_check.sh installs on the GPU machine (Python 3.12, manylinux x86-64, no network
# there): exactly the pins `python3 scripts/gpu_check.py --list-wheels` prints, without their dependencies (that
# machine has them). A package published only as an sdist is built into a wheel here. Prints the folder's wheels
# and size; fails if the folder is over 64 MiB (what travels to the GPU machine with the repository).
#
#   bash scripts/gpu_wheels.sh              # into .whl/ (added to .git/info/exclude so it is never committed)
#   bash scripts/gpu_wheels.sh DIR
#   PINS="name==1.0 other==2.0" bash scripts/gpu_wheels.sh DIR   # other pins
set -euo pipefail
usage="usage: bash scripts/gpu_wheels.sh [DIR]   (DIR: the wheel folder, default .whl; PINS=\"name==1.0 ...\" for other pins)"
case "${1:-}" in
  -h|--help) echo "$usage"; exit 0 ;;
  -*) echo "gpu_wheels: error: unknown option $1; $usage" >&2; exit 2 ;;
esac
if (( $# > 1 )); then
  echo "gpu_wheels: error: one folder at most, got $#; $usage" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
dir=${1:-.whl}
python=${PYTHON:-$(command -v python3 || command -v python)}
limit_mib=64
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
read -r -a pins <<< "${PINS:-$("$python" scripts/gpu_check.py --list-wheels | tr '\n' ' ')}"

mkdir -p "$dir"
if [[ "$dir" == ".whl" ]] && exclude=$(git rev-parse --git-path info/exclude 2>/dev/null); then
  mkdir -p "$(dirname "$exclude")"
  grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
fi
for pin in "${pins[@]}"; do
  name=${pin%%==*}
  # One version of each: pip stops the whole install when a folder holds two.
  find "$dir" -maxdepth 1 -iname "$(tr -- '-.' '__' <<< "$name")-*.whl" -delete
  if "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]}" -d "$dir" "$pin" 2>/dev/null; then
    continue
  fi
  echo "gpu_wheels: no wheel of $pin for Python 3.12 manylinux x86-64; building one from its sdist" >&2
  sdist=$(mktemp -d)
  "$python" -m pip download -q --no-deps --no-binary=:all: -d "$sdist" "$pin"
  "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "$sdist"/*
  rm -rf "$sdist"
done

shopt -s nullglob
wheels=("$dir"/*.whl)
bytes=0
for wheel in "${wheels[@]}"; do
  size=$(stat -c %s "$wheel")
  bytes=$((bytes + size))
  printf '%10d  %s\n' "$size" "$(basename "$wheel")"
done
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "gpu_wheels: $dir holds ${#wheels[@]} wheels, $mib MiB"
if (( bytes > limit_mib * 1048576 )); then
  echo "gpu_wheels: $dir is over $limit_mib MiB: it cannot travel to the GPU machine" >&2
  exit 1
fi
