#!/usr/bin/env bash
# Pin every image's requirements: docker/requirements-<image>.in -> docker/requirements-<image>.txt.
#
#   bash docker/lock.sh
#
# Versions are held to those of the project's development environment (.venv), so the images run
# what the tests ran; packages that environment lacks (faiss-gpu) resolve to their newest release.
# faiss is the exception: the .in files pin it (one faiss family for both cluster images, see
# docker/README.md), so the environment's own faiss-cpu is left out of the constraints.
# The locks are universal (any platform, Python >= 3.11): the same file installs in the images and
# in the test venvs of tests/kube/test_docker.py. Every pin carries the sha256 of each of its files
# (wheels and sdist), and the Dockerfiles install with --require-hashes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=${VENV:-.venv}
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$venv/bin/uv" pip freeze --python "$venv/bin/python" | grep -v -i -e '^-e ' -e '^clusterfit' -e '^faiss' >"$constraints"
for in_file in docker/requirements-*.in; do
  "$venv/bin/uv" pip compile --quiet --universal --python-version 3.11 --no-annotate --generate-hashes \
    --custom-compile-command "bash docker/lock.sh" -c "$constraints" "$in_file" -o "${in_file%.in}.txt"
done
