#!/usr/bin/env bash
# Build the CPU variant of docker/Dockerfile with no registry of images and no Docker engine:
#   1. a Debian base image made by debootstrap from Debian's packages (kept, keyed by what it holds);
#   2. a wheelhouse in docker/wheels/ made by this machine's pip: the CPU build of torch and every
#      package disttrain installs, at the versions constraints.txt pins;
#   3. `buildah bud --isolation chroot` of docker/Dockerfile on that base, installing offline from it.
#
#   bash docker/build_cpu.sh [TAG]          (as root; TAG defaults to localhost/disttrain:cpu)
#   bash docker/build_cpu.sh --prepare      steps 1 and 2 only (CI starts them early, in the background)
#
# Needs debootstrap and buildah (Debian: apt-get install debootstrap buildah), and a pip whose
# `pip download torch==2.13.0` finds the CPU build: a pip.conf find-links to a folder holding it, or
# PIP_INDEX_URL=https://download.pytorch.org/whl/cpu. This script refuses a torch wheel that is not
# `+cpu` rather than put several GB of CUDA libraries into a CPU image.
set -euo pipefail
cd "$(dirname "$0")/.."

prepare_only=false
if [ "${1:-}" = "--prepare" ]; then prepare_only=true; shift; fi
tag=${1:-localhost/disttrain:cpu}
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=python3,python3-venv,python3-pip,ca-certificates
torch_version=$(sed -n 's/^torch==//p' constraints.txt)
key=$(printf '%s %s %s' "$suite" "$mirror" "$packages" | sha256sum | cut -c1-12)
base=localhost/disttrain-base:${suite}-${key}
wheels=docker/wheels

say() { echo "build_cpu: [${SECONDS}s] $*"; }

build_base() {
    say "base image $base: debootstrap --variant=minbase $suite (+ $packages)"
    local root
    root=$(mktemp -d /var/tmp/disttrain-rootfs.XXXXXX)
    debootstrap --variant=minbase --include="$packages" "$suite" "$root/fs" "$mirror" >"$root/debootstrap.log" 2>&1 \
        || { tail -20 "$root/debootstrap.log"; rm -rf "$root"; return 1; }
    rm -rf "$root/fs/var/cache/apt/archives/"*.deb "$root/fs/var/lib/apt/lists/"*
    tar -C "$root/fs" -cf "$root/fs.tar" .
    local ctr
    ctr=$(buildah from scratch)
    buildah add --quiet "$ctr" "$root/fs.tar" / >/dev/null  # ADD of a tar unpacks it
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
    buildah commit --quiet --rm "$ctr" "$base" >/dev/null
    rm -rf "$root"
    say "base image $base: built"
}

# What the wheelhouse is made from: a wheelhouse built from the same pins is reused as it is.
wheels_key=$(cat constraints.txt pyproject.toml | sha256sum | cut -c1-16)

build_wheelhouse() {
    if [ "$(cat "$wheels/.key" 2>/dev/null)" = "$wheels_key" ]; then
        say "wheelhouse $wheels: already built from these pins"
        return 0
    fi
    say "wheelhouse $wheels: torch==$torch_version and disttrain's packages (pip wheel, pinned by constraints.txt)"
    rm -f "$wheels/.key"
    find "$wheels" -name '*.whl' -delete
    python3 -m pip wheel --quiet --wheel-dir "$wheels" --constraint constraints.txt \
        "torch==$torch_version" ".[wandb,tensorboard,s3,plot]" "setuptools>=61" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }  # noise of this pip.conf's indexes
    rm -f "$wheels"/disttrain-*.whl  # the image builds disttrain from its own copy of the source
    local torch_wheel
    torch_wheel=$(find "$wheels" -name "torch-$torch_version*.whl" -printf '%f\n')
    case "$torch_wheel" in
        *+cpu-*) say "wheelhouse: $(find "$wheels" -name '*.whl' | wc -l) wheels, torch: $torch_wheel"
                 echo "$wheels_key" >"$wheels/.key" ;;
        *) say "error: torch wheel '$torch_wheel' is not a CPU build (+cpu); point pip at the CPU wheel" \
               "(PIP_INDEX_URL=https://download.pytorch.org/whl/cpu, or a find-links folder holding it) and retry"
           return 2 ;;
    esac
}

# The base (mostly Debian downloads) and the wheelhouse (mostly pip's cache) are independent: overlap them.
base_pid=""
if buildah inspect --type image "$base" >/dev/null 2>&1; then
    say "base image $base: already built"
else
    build_base & base_pid=$!
fi
build_wheelhouse || { status=$?; [ -z "$base_pid" ] || wait "$base_pid" || true; exit "$status"; }
[ -z "$base_pid" ] || wait "$base_pid"
if $prepare_only; then
    say "prepared: base image $base and the wheelhouse"
    exit 0
fi

say "buildah bud -> $tag"
buildah bud --quiet --isolation chroot --layers=false -f docker/Dockerfile --ignorefile docker/Dockerfile.dockerignore \
    --build-arg BASE_IMAGE="$base" --build-arg PIP_SOURCE="--no-index --find-links /wheels" -t "$tag" .
say "built $tag: $(buildah images --format '{{.Size}}' "$tag")"
