#!/usr/bin/env bash
# `make gpu-wheels`: wheels for `make gpu-check` on a CUDA machine whose own Python 3.12 has torch, torchvision,
# timm, safetensors and tensorboard (and what they pull in: numpy, pillow, pyyaml, huggingface_hub, tqdm, ...) but
# no network. Downloads this project's other dependencies (and pytest) for CPython 3.12 manylinux x86_64 into
# $1 (default .gpu-wheels/, git-ignored); gpu-check unpacks them into a scratch folder there. The packages the
# machine already has are removed again, so the folder stays small: the whole carried tree must stay < 64 MiB.
set -euo pipefail
DEST=${1:-.gpu-wheels}
PIP=${PIP:-.venv/bin/pip}
rm -rf "$DEST" && mkdir -p "$DEST"
"$PIP" download --quiet --dest "$DEST" --python-version 3.12 --implementation cp --abi cp312 \
  --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any \
  'diffusers>=0.35.2' 'zarr>=3.1.6' 'numcodecs>=0.16.1' 'google-crc32c>=1.5' 'crc32c>=2.7' 'webdataset>=0.2.96' \
  'braceexpand>=0.1.7' 'dask[distributed]>=2024.1' 'pycocotools>=2.0.8' 'click>=8.4.2' 'pytest>=8' \
  'numpy>=2.0'
# Provided by torch / torchvision / timm / tensorboard on the GPU machine (gpu-check checks they import).
for pkg in numpy pillow pyyaml huggingface_hub hf_xet filelock fsspec packaging typing_extensions tqdm requests \
           urllib3 idna certifi charset_normalizer jinja2 markupsafe safetensors setuptools; do
  rm -f "$DEST"/"$pkg"-*.whl "$DEST"/"${pkg//_/-}"-*.whl "$DEST"/"$(echo "$pkg" | sed 's/^./\U&/')"-*.whl
done
ls "$DEST" > "$DEST/MANIFEST.txt"
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $(du -sb "$DEST" | cut -f1) bytes in $DEST"
