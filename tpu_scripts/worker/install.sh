#!/usr/bin/env bash
# Runs on each TPU VM worker (tpu.sh install copies the source there first): a virtual environment with the
# project and its tpu extra (jax[tpu], libtpu), from the unpacked source in the current directory's megadoc-jax.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: install.sh [--python PYTHON] [--venv DIR] [--source DIR]
  --python PYTHON  interpreter of the venv (default python3.11; installed with apt-get when missing,
                   since the project needs Python >= 3.11 and Ubuntu 22.04's python3 is 3.10)
  --venv DIR       the virtual environment, created when missing (default megadoc-venv)
  --source DIR     the unpacked project (default megadoc-jax)
USAGE
}

python=python3.11
venv=megadoc-venv
source_dir=megadoc-jax
while (($#)); do
    case $1 in
        --python) python=${2:?--python needs a value}; shift 2 ;;
        --venv) venv=${2:?--venv needs a value}; shift 2 ;;
        --source) source_dir=${2:?--source needs a value}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "install.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done

if ! command -v "$python" >/dev/null; then
    if [[ $python =~ ^python3\.[0-9]+$ ]] && command -v apt-get >/dev/null; then
        sudo apt-get update -qq
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$python" "$python-venv"
    else
        echo "install.sh: $python is not installed on $(hostname)" >&2
        exit 1
    fi
fi
if [[ ! -x $venv/bin/python ]]; then
    "$python" -m venv "$venv"
fi
venv=$(cd "$venv" && pwd)
"$venv/bin/python" -m pip install -q --upgrade pip
# A reinstall of the same version must still take the new source.
"$venv/bin/python" -m pip uninstall -q -y megadoc-jax 2>/dev/null || true
(cd "$source_dir" && "$venv/bin/python" -m pip install -q ".[tpu,gcs]")  # gcs: orbax checkpoints on gs:// (docs/cloud.md)
"$venv/bin/python" -c 'import megadoc_jax, jax; print("megadoc-jax installed with jax", jax.__version__)'
