#!/usr/bin/env bash
# CI's container stage: build the CPU variant of docker/Dockerfile (docker/build_cpu.sh: a debootstrap
# base, a wheelhouse, buildah) and run in it, as its non-root user, what a user runs first: the default
# training, then `disttrain ckpt verify`. Fails on the first thing that is not as it should be.
#   bash .ci/container.sh [--prepare]   --prepare: the tools, the base image and the wheelhouse only
#                                       (mostly downloads: .ci/run overlaps them with the tests)
set -euo pipefail
cd "$(dirname "$0")/.."

# Idempotent: a machine that has the tools (a developer's, or a CI machine used before) installs nothing.
if ! command -v debootstrap >/dev/null || ! command -v buildah >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap buildah >/dev/null
fi

tag=localhost/disttrain:ci
if [ "${1:-}" = "--prepare" ]; then
    exec bash docker/build_cpu.sh --prepare "$tag"
fi
bash docker/build_cpu.sh "$tag"

ctr=$(buildah from "$tag")
trap 'buildah rm "$ctr" >/dev/null' EXIT
echo "container: default training and ckpt verify as uid 1000 [${SECONDS}s]"
# `buildah run` (chroot isolation) rather than podman run: crun refuses this machine's rlimits and its
# hybrid cgroup mode. The command is the image's entry point, spelled out.
buildah run --isolation chroot --user 1000:1000 "$ctr" -- sh -ec '
    test "$(id -u)" = 1000 && test "$HOME" = /home/disttrain
    python -c "import torch; v = torch.__version__; assert v.endswith(\"+cpu\") and torch.version.cuda is None, v"
    OMP_NUM_THREADS=2 python -m disttrain.main trainer.progress=plain
    disttrain ckpt verify runs/digits
    python -c "
import json
rows = [json.loads(line) for line in open(\"runs/digits/metrics.jsonl\")]
accuracy = [r[\"eval/accuracy\"] for r in rows if \"eval/accuracy\" in r][-1]
assert accuracy > 0.9, accuracy
print(\"container: eval/accuracy\", round(accuracy, 4), \"as uid 1000, checkpoints verified\")
"'
echo "container: done [${SECONDS}s]"
