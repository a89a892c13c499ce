#!/usr/bin/env bash
# Fill ./wheels/ (git-ignored) with what the lent GPU machine lacks, for scripts/gpu_check.sh there.
#
# That machine (see the device tool's KINDS.md) has Python 3.12 with torch 2.11, triton 3.6, numpy,
# jinja2, tokenizers, httpx, prometheus-client, pytest and more, and no network. Our other
# dependencies travel as wheels: the project's requirements (pyproject.toml, base + [test]) minus
# torch/triton/numpy, downloaded with their whole dependency closure at the versions installed in
# .venv here (so the GPU runs the code the tests ran here), for the GPU's Python (PY_VERSIONS,
# default 3.12 as KINDS.md reports; set e.g. PY_VERSIONS="3.11 3.12 3.13" if unsure: pip there
# picks the matching files). wheels/requirements.txt keeps pyproject's ranges, so pip there
# installs only what is missing or too old:
#     python3 -m pip install --no-index --find-links wheels/ -r wheels/requirements.txt
#
# Models: a GGUF file is 98-491 MB and a device call carries at most 64 MiB, so by default this
# also writes wheels/models/NAME.head (the file's header: metadata, tokenizer, tensor table, up to
# the data offset; 2-7 MB) and NAME.json (size, sha256). gpu_check.sh turns each into a stand-in
# file of the same size with random blocks of each tensor's type (scripts/gpu_standin.py): same
# shapes, quant types and bytes read per token, so speed is measured truly and logits can be
# compared with the CPU reference, while the text is meaningless. --no-models skips this.
#
# Last, the size of what a device call would carry (the working tree that travels plus DEST) is
# checked against the tool's 64 MiB: over it, the script fails.
#
# Usage: scripts/prepare_gpu_wheels.sh [--no-models] [--dest DIR]   (then carry ["wheels"])
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DEST=wheels
MODELS=1
PY_VERSIONS=${PY_VERSIONS:-3.12}
VENV_PY=${VENV_PY:-.venv/bin/python}
LLAMATRON_HOME=${LLAMATRON_HOME:-$HOME/.cache/llamatron}
MODEL_NAMES=(smollm2-135m-instruct gemma-3-270m qwen2.5-coder-0.5b-instruct)

while [ $# -gt 0 ]; do
    case "$1" in
        --no-models) MODELS=0 ;;
        --dest) DEST=$2; shift ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
[ -x "$VENV_PY" ] || { echo "no $VENV_PY: run 'make install' first" >&2; exit 1; }
mkdir -p "$DEST"

# requirements.txt: pyproject's ranges; pins.txt: the same names at .venv's versions, closure included.
"$VENV_PY" - "$DEST" <<'EOF'
import importlib.metadata as md, re, sys, tomllib
dest = sys.argv[1]
never = {"torch", "triton", "numpy"}  # the GPU machine's own builds; never carried
# Present there (KINDS.md) and big: tokenizers pulls 8 MB of hub client with it. Still in requirements.txt.
present = {"tokenizers", "huggingface-hub", "hf-xet"}
proj = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = [r for r in proj["dependencies"] + proj["optional-dependencies"]["test"]
        if re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0].lower() not in never]
open(f"{dest}/requirements.txt", "w").write("\n".join(reqs) + "\n")
pins, seen, todo = [], set(), [re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0] for r in reqs]
while todo:  # the closure as installed here (markers for other Pythons are skipped by pip later)
    name = todo.pop().lower().replace("_", "-")
    if name in seen or name in never or name in present:
        continue
    seen.add(name)
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        continue  # a dependency only some platforms need
    pins.append(f"{name}=={dist.version}")
    for r in dist.requires or []:
        if "extra ==" not in r:
            todo.append(re.split(r"[<>=!~ \[;(]", r, maxsplit=1)[0].strip())
open(f"{dest}/pins.txt", "w").write("\n".join(sorted(pins)) + "\n")
print(f"{len(reqs)} requirements, {len(pins)} pinned packages")
EOF

PLATFORMS=()
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
         manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${p}_x86_64")
done
for v in $PY_VERSIONS; do
    # --no-deps over the explicit closure: pip's resolver for a foreign platform would pull numpy back in.
    "$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$v" --implementation cp \
        --abi "cp${v/./}" --abi abi3 --abi none "${PLATFORMS[@]}" -d "$DEST" -r "$DEST/pins.txt" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
done
rm -f "$DEST"/torch-*.whl "$DEST"/triton-*.whl "$DEST"/numpy-*.whl

if [ "$MODELS" = 1 ]; then
    mkdir -p "$DEST/models"
    for name in "${MODEL_NAMES[@]}"; do
        f="$LLAMATRON_HOME/$name.gguf"
        if [ ! -f "$f" ]; then echo "skip model $name: $f not found"; continue; fi
        "$VENV_PY" - "$f" "$DEST/models/$name" <<'EOF'
import hashlib, json, os, sys
import gguf
src, out = sys.argv[1], sys.argv[2]
offset = gguf.GGUFReader(src).data_offset
h = hashlib.sha256()
with open(src, "rb") as f:
    head = f.read(offset)
    h.update(head)
    for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
open(out + ".head", "wb").write(head)
meta = {"file": os.path.basename(src), "size": os.path.getsize(src), "data_offset": offset, "sha256": h.hexdigest()}
json.dump(meta, open(out + ".json", "w"))
print(f"model {os.path.basename(src)}: header {offset / 1e6:.1f} MB of {meta['size'] / 1e6:.0f} MB")
EOF
    done
fi
# What travels: tracked and untracked-not-ignored files, plus the carried folder.
TREE=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
       | awk '{s += $1} END {print s + 0}')
CARRY=$(du -sb "$DEST" | cut -f1)
TOTAL=$((TREE + CARRY))
echo "carry: working tree $((TREE >> 20)) MiB + $DEST $((CARRY >> 20)) MiB = $((TOTAL >> 20)) MiB of 64 MiB"
if [ "$TOTAL" -gt $((64 << 20)) ]; then
    echo "over the device tool's 64 MiB: carry less (--no-models drops the model headers)" >&2
    exit 1
fi
echo "carry [\"$DEST\"] in the device call: run(command=\"bash scripts/gpu_check.sh\", carry=[\"$DEST\"], timeout_s=480)"
