#!/usr/bin/env bash
# Fills the wheels folder that benchmarks/gpu.sh installs from on a GPU machine without network:
# the modules the benchmarks import that such a machine's PyTorch image lacks (pytorch-grad-cam and
# its ttach; the image has numpy, pillow, pyyaml, safetensors, pyarrow, pandas, scipy, scikit-image,
# opencv, tqdm, matplotlib), pinned as in constraints.txt, pure-Python wheels only (grad-cam ships
# only a source archive: it is built into a wheel here).
#
#   bash benchmarks/gpu-wheels.sh [DIR]      # DIR default .cache/gpu-wheels (git-ignored)
#
# Then carry DIR with the working tree and run `bash benchmarks/gpu.sh` there (GPU_WHEELS=DIR if not
# the default).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.cache/gpu-wheels}
PY=${PYTHON:-python3}
NAMES="grad-cam ttach"
pins=()
for n in $NAMES; do
  pin=$(grep -i -E "^${n}==" constraints.txt | head -1)
  [ -n "$pin" ] || { echo "gpu-wheels.sh: $n is not pinned in constraints.txt" >&2; exit 2; }
  pins+=("$pin")
done
mkdir -p "$DIR"
"$PY" -m pip wheel -q --no-deps -w "$DIR" "${pins[@]}"
for f in "$DIR"/*.whl; do
  case "$f" in *-py3-none-any.whl|*-py2.py3-none-any.whl) ;; *) echo "gpu-wheels.sh: not pure Python: $f" >&2; exit 1 ;; esac
done
ls -l "$DIR"
