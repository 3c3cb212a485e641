"""Deploys infra/template.yaml into the AWS emulator with CloudFormation and
prints the stack's outputs as one JSON object (OutputKey -> OutputValue).

Usage: deploy-template.py TEMPLATE STACK_NAME [Key=Value ...]

The function's CodeUri is replaced by an S3 URI, as `sam package` does
before it hands the template to CloudFormation (the function stays off in
the emulator: DeployFunction=false). Emulator=true leaves out what
LocalStack cannot create (infra/README.md).
"""
import json
import os
import sys
import time

import boto3


def main():
    template, stack = sys.argv[1], sys.argv[2]
    params = {"Hostname": "mx2.example.test", "IngestImageUri": "example/backupmx:test",
              "DeployFunction": "false", "Emulator": "true"}
    for kv in sys.argv[3:]:
        k, v = kv.split("=", 1)
        params[k] = v
    with open(template) as f:
        body = f.read().replace("CodeUri: ../", "CodeUri: s3://packaged/retry-fn.zip")
    cf = boto3.client("cloudformation", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    cf.create_stack(
        StackName=stack,
        TemplateBody=body,
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
        Capabilities=["CAPABILITY_IAM", "CAPABILITY_AUTO_EXPAND"],
    )
    for _ in range(240):
        s = cf.describe_stacks(StackName=stack)["Stacks"][0]
        if not s["StackStatus"].endswith("IN_PROGRESS"):
            break
        time.sleep(0.5)
    if s["StackStatus"] != "CREATE_COMPLETE":
        for e in cf.describe_stack_events(StackName=stack)["StackEvents"]:
            if "FAILED" in e["ResourceStatus"]:
                print(f'{e["LogicalResourceId"]}: {e.get("ResourceStatusReason", "")}', file=sys.stderr)
        print(f"deploy-template: stack {stack} is {s['StackStatus']}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({o["OutputKey"]: o["OutputValue"] for o in s.get("Outputs", [])}))


main()
