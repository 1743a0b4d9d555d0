#!/usr/bin/env bash
# The main job: build, then run one realistic decode step in both cache formats
# (on the GPU when a Hopper GPU is present, else on the CPU reference backend).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/build.sh" >/dev/null
exec "$root/build/snapmla" demo "$@"
