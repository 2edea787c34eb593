#!/bin/sh
# wheelhouse-install.sh TORCH_REQUIREMENT PIP_ARGS...: installs torch first (pinned: an unpinned
# torch from PyPI is a multi-GB CUDA build), then the rest, into the active environment. From
# /wheels alone when the build put wheels there (integration/airgap_images.py makes them: the
# air-gapped build, no index, no certificate needed), else from the package index with torch
# from $TORCH_INDEX_URL.
set -eu
torch="$1"
shift
if ls /wheels/*.whl >/dev/null 2>&1; then
    echo "installing from the wheelhouse (/wheels), no index"
    pip install --no-index --find-links /wheels "$torch"
    pip install --no-index --find-links /wheels "$@"
else
    echo "no wheels in the wheelhouse: installing from the index"
    pip install "$torch" --index-url "$TORCH_INDEX_URL"
    pip install "$@"
fi
