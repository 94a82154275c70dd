"""Who may do what once the templates are deployed, and every request a training run makes, derived from the
deployed pipeline definition, checked by an independent IAM simulator on AWS's current authorization data.

Sources for the requests (each is what the named AWS service does on the named principal's behalf):
- CreateTrainingJob and its condition keys: Service Authorization Reference, "Actions, resources, and
  condition keys for Amazon SageMaker AI" (CreateTrainingJob: sagemaker:InstanceTypes, VpcSubnets,
  VpcSecurityGroupIds, NetworkIsolation, InterContainerTrafficEncryption, OutputKmsKeyArn, VolumeKmsKeyArn,
  MaxRuntimeInSeconds); the SDK leaves false flags out of the request, so a key is set only when the argument is.
- iam:PassRole with iam:PassedToService: IAM user guide, "Granting a user permissions to pass a role".
- The execution role's calls during a job: SageMaker developer guide, "How to use SageMaker AI execution
  roles" (s3:ListBucket on each input channel's S3Uri prefix, s3:GetObject, s3:PutObject for output and
  checkpoints, ECR pull, CloudWatch Logs under /aws/sagemaker/TrainingJobs, cloudwatch:PutMetricData) and
  "Give SageMaker AI Training Jobs Access to Resources in Your Amazon VPC" (the ec2 ENI and Describe calls);
  checkpoint deletions: "Use checkpoints in Amazon SageMaker AI" (a file deleted locally is deleted in S3).
- CreateProcessingJob (the data preparation step): the same Service Authorization Reference lists the same
  sagemaker:* keys for it; its execution role reads each ProcessingInput's S3Uri and writes each
  ProcessingOutput's, logs under /aws/sagemaker/ProcessingJobs and makes the VPC ENI calls (developer guide,
  "Give SageMaker Processing Jobs Access to Resources in Your Amazon VPC").
- KMS through S3 (kms:ViaService = s3.<region>.amazonaws.com): AWS KMS developer guide, "kms:ViaService".
- A VPC Lambda's ENI calls: Lambda developer guide, "Giving Lambda functions access to resources in an Amazon
  VPC" (the rights of AWSLambdaVPCAccessExecutionRole).
- AWS services calling our resources (service_requests), each authorized by the resource's own policy alone:
  CloudWatch alarm actions publish to SNS as cloudwatch.amazonaws.com with aws:SourceArn = the alarm and
  aws:SourceAccount (CloudWatch user guide, "Confused deputy prevention"); EventBridge delivers to SNS, SQS
  (dead letters) and Lambda as events.amazonaws.com with aws:SourceArn = the rule (EventBridge user guide,
  "Using resource-based policies for Amazon EventBridge"); on a KMS-encrypted topic or queue the publishing
  service itself calls kms:GenerateDataKey and kms:Decrypt (SNS developer guide, "Enable compatibility between
  event sources from AWS services and encrypted topics"); CloudWatch Logs encrypts a log group with its key as
  logs.<region>.amazonaws.com with kms:EncryptionContext:aws:logs:arn = the log group (CloudWatch Logs user
  guide, "Encrypt log data in CloudWatch Logs using AWS KMS").
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

from spot_training.definition.rules import EXECUTION_ID_STAND_IN, resolve
from tests.iam.cloudformation import ACCOUNT, PARTITION, Deployment

ROOT = Path(__file__).resolve().parents[2]
NODE = ROOT / "node_modules" / ".bin" / "node"
SIMULATOR = Path(__file__).resolve().parent / "simulator.mjs"
AWS_MANAGED_PREFIX = f"arn:{PARTITION}:iam::aws:policy/"
SECURE = {"aws:SecureTransport": "true"}


def run_simulator(payload: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([str(NODE), str(SIMULATOR)], input=json.dumps(payload), capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"iam simulator failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


@dataclasses.dataclass
class Request:
    """One authorization request: `principal` (a role ARN) calls `action` on `resource`."""

    id: str
    principal: str
    action: str
    resource: str
    context: dict[str, Any] = dataclasses.field(default_factory=dict)
    resource_policy: dict[str, Any] | None = None


class Authorization:
    """The deployed IAM: each role's identity policies (inline, customer managed, AWS managed) and the
    resource policies of buckets and keys."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment, self.region = deployment, deployment.region
        self.roles: dict[str, list[dict[str, Any]]] = {}  # role name -> identity policies
        self.role_arns: dict[str, str] = {}
        managed: dict[str, list[str]] = {}  # role name -> managed policy ARNs
        for stack, logical, props in deployment.resources("AWS::IAM::Role"):
            name = deployment.ref(stack, logical)
            self.role_arns[name] = deployment.get_att(stack, logical, "Arn")
            self.roles[name] = [{"name": f"{name}/{p['PolicyName']}", "policy": p["PolicyDocument"]}
                                for p in props.get("Policies", [])]
            managed[name] = list(props.get("ManagedPolicyArns", []))
        customer_managed = {}
        for stack, logical, props in deployment.resources("AWS::IAM::ManagedPolicy"):
            arn = deployment.ref(stack, logical)
            customer_managed[arn] = props["PolicyDocument"]
            for role in props.get("Roles", []):
                managed.setdefault(role, []).append(arn)
        for stack, logical, props in deployment.resources("AWS::IAM::Policy"):
            for role in props.get("Roles", []):
                self.roles.setdefault(role, []).append({"name": deployment.ref(stack, logical),
                                                        "policy": props["PolicyDocument"]})
        aws_managed = sorted({arn.removeprefix(AWS_MANAGED_PREFIX).rsplit("/", 1)[-1]
                              for arns in managed.values() for arn in arns if arn.startswith(AWS_MANAGED_PREFIX)})
        documents = run_simulator({"managedPolicies": aws_managed})["managedPolicies"] if aws_managed else {}
        for role, arns in managed.items():
            for arn in arns:
                if arn.startswith(AWS_MANAGED_PREFIX):
                    document = documents[arn.rsplit("/", 1)[-1]]
                else:
                    document = customer_managed[arn]
                self.roles.setdefault(role, []).append({"name": arn, "policy": document})
        self.bucket_policies = {props["Bucket"]: props["PolicyDocument"]
                                for _, _, props in deployment.resources("AWS::S3::BucketPolicy")}
        self.key_policies = {deployment.get_att(stack, logical, "Arn"): props["KeyPolicy"]
                             for stack, logical, props in deployment.resources("AWS::KMS::Key")}
        self.bucket_keys = {}
        for stack, logical, props in deployment.resources("AWS::S3::Bucket"):
            for rule in props.get("BucketEncryption", {}).get("ServerSideEncryptionConfiguration", []):
                key = rule["ServerSideEncryptionByDefault"].get("KMSMasterKeyID")
                if key:
                    self.bucket_keys[deployment.ref(stack, logical)] = key

    def role_name(self, role_arn: str) -> str:
        return role_arn.rsplit("/", 1)[-1]

    def simulation(self, request: Request) -> dict[str, Any]:
        return {"id": request.id, "principal": request.principal, "action": request.action,
                "resource": request.resource, "accountId": ACCOUNT, "context": request.context,
                "identityPolicies": self.roles.get(self.role_name(request.principal), []),
                "resourcePolicy": request.resource_policy}

    def evaluate(self, requests: list[Request]) -> dict[str, str]:
        """Request id -> the simulator's verdict (Allowed, ImplicitlyDenied, ExplicitlyDenied, Error)."""
        output = run_simulator({"simulations": [self.simulation(r) for r in requests]})
        return {s["id"]: s["result"] if s["result"] != "Error" else f"Error: {s['errors']}"
                for s in output["simulations"]}

    # ---- resources as the requests name them ------------------------------------------------------
    def s3_requests(self, principal: str, prefix: str, uri: str, actions: list[str], example: str) -> list[Request]:
        """`actions` on an object under `uri` (an S3 prefix or object), plus the KMS calls S3 makes for a
        bucket encrypted with a customer key, plus ListBucket on the prefix when asked."""
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        policy = self.bucket_policies.get(bucket)
        out = []
        for action in actions:
            if action == "s3:ListBucket":
                out.append(Request(f"{prefix} s3:ListBucket {bucket} prefix={key}", principal, action,
                                   f"arn:{PARTITION}:s3:::{bucket}", {**SECURE, "s3:prefix": key}, policy))
            else:
                target = key + example if key.endswith("/") or not key else key
                out.append(Request(f"{prefix} {action} s3://{bucket}/{target}", principal, action,
                                   f"arn:{PARTITION}:s3:::{bucket}/{target}", dict(SECURE), policy))
        key_arn = self.bucket_keys.get(bucket)
        if key_arn:
            via = {"kms:ViaService": f"s3.{self.region}.amazonaws.com", "kms:CallerAccount": ACCOUNT}
            kms_actions = {"kms:Decrypt"} if set(actions) <= {"s3:GetObject", "s3:ListBucket"} else \
                {"kms:Decrypt", "kms:GenerateDataKey"}
            out += [Request(f"{prefix} {a} through S3 on {bucket}", principal, a, key_arn, via,
                            self.key_policies.get(key_arn)) for a in sorted(kms_actions)]
        return out


def pipelines(deployment: Deployment) -> list[dict[str, Any]]:
    """Each deployed pipeline: its name, role and resolved definition (one execution, default parameters)."""
    found = []
    for _, _, props in deployment.resources("AWS::SageMaker::Pipeline"):
        body = props["PipelineDefinition"]["PipelineDefinitionBody"]
        found.append({"name": props["PipelineName"], "role_arn": props["RoleArn"],
                      "definition": json.loads(body), "resolved": resolve(json.loads(body))})
    return found


def training_arguments(pipeline: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    step = next(s for s in _steps(pipeline["resolved"]["Steps"]) if s["Type"] == "Training")
    return step["Name"], step["Arguments"]


def _steps(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for step in steps:
        out.append(step)
        for branch in ("IfSteps", "ElseSteps"):
            out += _steps(step.get("Arguments", {}).get(branch, []))
    return out


def job_arn(region: str, step_name: str) -> str:
    # Pipelines name the jobs pipelines-<execution id>-<step name>-<random>; training job ARNs are lower case.
    return f"arn:{PARTITION}:sagemaker:{region}:{ACCOUNT}:training-job/pipelines-{EXECUTION_ID_STAND_IN}-{step_name}-a1b2c3d4e5".lower()


def job_context(*, instance_type: str, max_runtime: Any, vpc: dict[str, Any] | None, flags: dict[str, Any],
                output_key: str | None, volume_key: str | None) -> dict[str, Any]:
    """The condition keys SageMaker sets on CreateTrainingJob / CreateProcessingJob from the request's fields."""
    context: dict[str, Any] = {"sagemaker:InstanceTypes": [instance_type],
                               "sagemaker:MaxRuntimeInSeconds": str(max_runtime)}
    if vpc:
        context["sagemaker:VpcSubnets"] = list(vpc["Subnets"])
        context["sagemaker:VpcSecurityGroupIds"] = list(vpc["SecurityGroupIds"])
    for field, key in (("EnableNetworkIsolation", "sagemaker:NetworkIsolation"),
                       ("EnableInterContainerTrafficEncryption", "sagemaker:InterContainerTrafficEncryption")):
        if field in flags:
            context[key] = str(bool(flags[field])).lower()
    if output_key:
        context["sagemaker:OutputKmsKeyArn"] = output_key
    if volume_key:
        context["sagemaker:VolumeKmsKeyArn"] = volume_key
    return context


def create_training_job_context(args: dict[str, Any]) -> dict[str, Any]:
    resources = args["ResourceConfig"]
    return job_context(instance_type=resources["InstanceType"], max_runtime=args["StoppingCondition"]["MaxRuntimeInSeconds"],
                       vpc=args.get("VpcConfig"), flags=args, output_key=args.get("OutputDataConfig", {}).get("KmsKeyId"),
                       volume_key=resources.get("VolumeKmsKeyId"))


def pipeline_role_requests(auth: Authorization, pipeline: dict[str, Any]) -> list[Request]:
    step_name, args = training_arguments(pipeline)
    role, job = pipeline["role_arn"], job_arn(auth.region, step_name)
    name = pipeline["name"]
    out = [Request(f"{name}: pipeline role sagemaker:CreateTrainingJob", role, "sagemaker:CreateTrainingJob", job,
                   create_training_job_context(args))]
    out += [Request(f"{name}: pipeline role {a}", role, a, job)
            for a in ("sagemaker:DescribeTrainingJob", "sagemaker:StopTrainingJob", "sagemaker:AddTags")]
    out.append(Request(f"{name}: pipeline role iam:PassRole", role, "iam:PassRole", args["RoleArn"],
                       {"iam:PassedToService": "sagemaker.amazonaws.com"}))
    # Pipelines invoke a Lambda step's function as the pipeline role (the ResolveRun step).
    out += [Request(f"{name}: pipeline role lambda:InvokeFunction ({s['Name']})", role, "lambda:InvokeFunction",
                    s["FunctionArn"]) for s in _steps(pipeline["resolved"]["Steps"]) if s["Type"] == "Lambda"]
    volume_key = args["ResourceConfig"].get("VolumeKmsKeyId")
    if volume_key:
        out += [Request(f"{name}: pipeline role {a} for volumes", role, a, volume_key,
                        {"kms:GrantIsForAWSResource": "true"} if a == "kms:CreateGrant" else {},
                        auth.key_policies.get(volume_key)) for a in ("kms:CreateGrant", "kms:DescribeKey")]
    return out


def execution_role_requests(auth: Authorization, pipeline: dict[str, Any]) -> list[Request]:
    step_name, args = training_arguments(pipeline)
    role, name, region = args["RoleArn"], pipeline["name"], auth.region
    job_name = job_arn(region, step_name).rsplit("/", 1)[-1]
    out = []
    for channel in args["InputDataConfig"]:
        uri = channel["DataSource"]["S3DataSource"]["S3Uri"]
        out += auth.s3_requests(role, f"{name}: execution role channel {channel['ChannelName']}", uri,
                                ["s3:ListBucket", "s3:GetObject"], "part-000.jsonl")
    checkpoints = args["CheckpointConfig"]["S3Uri"]
    out += auth.s3_requests(role, f"{name}: execution role checkpoints", checkpoints,
                            ["s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"], "step-4/__0_0.distcp")
    output = args["OutputDataConfig"]["S3OutputPath"].rstrip("/") + f"/{job_name}/output/"
    out += auth.s3_requests(role, f"{name}: execution role model upload", output, ["s3:PutObject"],
                            "model/model-00001-of-00002.safetensors")
    image = args["AlgorithmSpecification"]["TrainingImage"]
    registry, repository = image.split("/", 1)
    image_account, image_region = registry.split(".")[0], registry.split(".")[3]
    repository_arn = f"arn:{PARTITION}:ecr:{image_region}:{image_account}:repository/{repository.split(':')[0].split('@')[0]}"
    out += [Request(f"{name}: execution role {a}", role, a, repository_arn)
            for a in ("ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability")]
    out.append(Request(f"{name}: execution role ecr:GetAuthorizationToken", role, "ecr:GetAuthorizationToken", "*"))
    log_group = f"arn:{PARTITION}:logs:{region}:{ACCOUNT}:log-group:/aws/sagemaker/TrainingJobs"
    stream = f"{log_group}:log-stream:{job_name}/algo-1-1700000000"
    out += [Request(f"{name}: execution role logs:CreateLogGroup", role, "logs:CreateLogGroup", log_group),
            Request(f"{name}: execution role logs:DescribeLogStreams", role, "logs:DescribeLogStreams", log_group),
            Request(f"{name}: execution role logs:CreateLogStream", role, "logs:CreateLogStream", stream),
            Request(f"{name}: execution role logs:PutLogEvents", role, "logs:PutLogEvents", stream),
            Request(f"{name}: execution role cloudwatch:PutMetricData", role, "cloudwatch:PutMetricData", "*",
                    {"cloudwatch:namespace": "/aws/sagemaker/TrainingJobs"})]
    if "VpcConfig" in args:
        out += job_eni_requests(f"{name}: execution role", role, region, args["VpcConfig"])
    return out


def job_eni_requests(prefix: str, role: str, region: str, vpc: dict[str, Any]) -> list[Request]:
    """A SageMaker job's ENI calls in VPC mode ("Give SageMaker AI Training Jobs Access to Resources in Your
    Amazon VPC"; processing jobs the same)."""
    return eni_requests(prefix, role, region, vpc["Subnets"], vpc["SecurityGroupIds"],
                        ["ec2:CreateNetworkInterfacePermission", "ec2:DeleteNetworkInterface",
                         "ec2:DeleteNetworkInterfacePermission"],
                        ["ec2:DescribeNetworkInterfaces", "ec2:DescribeVpcs", "ec2:DescribeDhcpOptions",
                         "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups"])


def eni_requests(prefix: str, role: str, region: str, subnets: list[str], groups: list[str],
                 on_interface: list[str], describe: list[str]) -> list[Request]:
    """CreateNetworkInterface is authorized on the new interface, its subnet and its security groups."""
    ec2 = f"arn:{PARTITION}:ec2:{region}:{ACCOUNT}"
    out = [Request(f"{prefix} ec2:CreateNetworkInterface on {r}", role, "ec2:CreateNetworkInterface", f"{ec2}:{r}")
           for r in ["network-interface/eni-0123456789abcdef0", *[f"subnet/{s}" for s in subnets],
                     *[f"security-group/{g}" for g in groups]]]
    out += [Request(f"{prefix} {a}", role, a, f"{ec2}:network-interface/eni-0123456789abcdef0") for a in on_interface]
    out += [Request(f"{prefix} {a}", role, a, "*") for a in describe]
    return out


def platform_requests(auth: Authorization) -> list[Request]:
    """The calls of the platform's own functions and services: the alarm monitor, the custom resources
    (default security group lockdown, S3 prefix list lookup) and the VPC flow log delivery."""
    d, region, out = auth.deployment, auth.region, []
    for stack, logical, props in d.resources("AWS::Lambda::Function"):
        role, function = props["Role"], d.ref(stack, logical)
        log_group = props.get("LoggingConfig", {}).get("LogGroup", f"/aws/lambda/{function}")
        group_arn = f"arn:{PARTITION}:logs:{region}:{ACCOUNT}:log-group:{log_group}"
        prefix = f"function {function}:"
        out += [Request(f"{prefix} logs:CreateLogStream", role, "logs:CreateLogStream", f"{group_arn}:log-stream:s1"),
                Request(f"{prefix} logs:PutLogEvents", role, "logs:PutLogEvents", f"{group_arn}:log-stream:s1")]
        environment = props.get("Environment", {}).get("Variables", {})
        if "PIPELINE_NAME" in environment:  # the alarm monitor (spot_training/cdk/monitor/execution_age.py)
            pipeline = f"arn:{PARTITION}:sagemaker:{region}:{ACCOUNT}:pipeline/{environment['PIPELINE_NAME'].lower()}"
            out += [Request(f"{prefix} sagemaker:ListPipelineExecutions", role, "sagemaker:ListPipelineExecutions",
                            pipeline),
                    Request(f"{prefix} cloudwatch:PutMetricData", role, "cloudwatch:PutMetricData", "*",
                            {"cloudwatch:namespace": environment["METRIC_NAMESPACE"]})]
        if "LADDER" in environment:  # the capacity controller (spot_training/cdk/monitor/capacity_ladder.py)
            out += controller_requests(prefix, role, region, environment, auth)
        if "VpcConfig" in props:
            out += eni_requests(prefix, role, region, props["VpcConfig"]["SubnetIds"],
                                props["VpcConfig"]["SecurityGroupIds"],
                                ["ec2:DeleteNetworkInterface", "ec2:AssignPrivateIpAddresses",
                                 "ec2:UnassignPrivateIpAddresses"],
                                ["ec2:DescribeNetworkInterfaces", "ec2:DescribeSubnets"])
        if "DeadLetterConfig" in props:
            queue = props["DeadLetterConfig"]["TargetArn"]
            out.append(Request(f"{prefix} sqs:SendMessage (dead letters)", role, "sqs:SendMessage", queue))
            queue_key = next((p.get("KmsMasterKeyId") for s, q, p in d.resources("AWS::SQS::Queue")
                              if d.get_att(s, q, "Arn") == queue), None)
            if queue_key:
                out.append(Request(f"{prefix} kms:GenerateDataKey for the dead-letter queue", role,
                                   "kms:GenerateDataKey", queue_key,
                                   {"kms:ViaService": f"sqs.{region}.amazonaws.com", "kms:CallerAccount": ACCOUNT},
                                   auth.key_policies.get(queue_key)))
        if "KmsKeyArn" in props:
            out.append(Request(f"{prefix} kms:Decrypt of its environment", role, "kms:Decrypt", props["KmsKeyArn"],
                               {"kms:CallerAccount": ACCOUNT}, auth.key_policies.get(props["KmsKeyArn"])))
    handlers = {d.get_att(s, l, "Arn"): p["Role"] for s, l, p in d.resources("AWS::Lambda::Function")}
    for _, logical, props in d.resources("Custom::VpcRestrictDefaultSG"):
        role = handlers[props["ServiceToken"]]
        group = f"arn:{PARTITION}:ec2:{region}:{ACCOUNT}:security-group/{props['DefaultSecurityGroupId']}"
        out += [Request(f"custom resource {logical}: {a}", role, a, group)
                for a in ("ec2:AuthorizeSecurityGroupIngress", "ec2:AuthorizeSecurityGroupEgress",
                          "ec2:RevokeSecurityGroupIngress", "ec2:RevokeSecurityGroupEgress")]
    for _, logical, props in d.resources("Custom::AWS"):
        role = handlers[props["ServiceToken"]]
        for phase in ("Create", "Update"):
            call = json.loads(props[phase]) if phase in props else None
            if call:
                action = f"{call['service'].lower()}:{call['action'][0].upper()}{call['action'][1:]}"
                out.append(Request(f"custom resource {logical} ({phase}): {action}", role, action, "*"))
    for _, logical, props in d.resources("AWS::EC2::FlowLog"):
        role, group = props["DeliverLogsPermissionArn"], props["LogGroupName"]
        group_arn = f"arn:{PARTITION}:logs:{region}:{ACCOUNT}:log-group:{group}"
        out += [Request(f"flow log {logical}: {a}", role, a, f"{group_arn}:log-stream:eni-0123456789abcdef0-all")
                for a in ("logs:CreateLogStream", "logs:PutLogEvents")]
        out.append(Request(f"flow log {logical}: logs:DescribeLogStreams", role, "logs:DescribeLogStreams",
                           group_arn))
    return out


def controller_requests(prefix: str, role: str, region: str, environment: dict[str, Any],
                        auth: Authorization) -> list[Request]:
    """What the capacity controller calls after an execution of either pipeline ends: read it and the run's other
    executions, the training job, start the next rung's execution, and publish to the alarm topic."""
    out = []
    plan = json.loads(environment["LADDER"])
    for pipeline in sorted(set(plan["pipelines"].values())):
        arn = f"arn:{PARTITION}:sagemaker:{region}:{ACCOUNT}:pipeline/{pipeline.lower()}"
        out += [Request(f"{prefix} {a} on {pipeline}", role, a, arn)
                for a in ("sagemaker:ListPipelineExecutions", "sagemaker:StartPipelineExecution")]
        out += [Request(f"{prefix} {a} on an execution of {pipeline}", role, a, f"{arn}/execution/abc123def456")
                for a in ("sagemaker:DescribePipelineExecution", "sagemaker:ListPipelineExecutionSteps",
                          "sagemaker:ListPipelineParametersForExecution")]
    out.append(Request(f"{prefix} sagemaker:DescribeTrainingJob", role, "sagemaker:DescribeTrainingJob",
                       job_arn(region, "Train")))
    topic = environment.get("TOPIC_ARN")
    if topic:
        out.append(Request(f"{prefix} sns:Publish", role, "sns:Publish", topic))
        d = auth.deployment
        key = next((p.get("KmsMasterKeyId") for s, t, p in d.resources("AWS::SNS::Topic") if d.ref(s, t) == topic), None)
        if key:
            out += [Request(f"{prefix} {a} for the topic", role, a, key, {"kms:CallerAccount": ACCOUNT},
                            auth.key_policies.get(key)) for a in ("kms:GenerateDataKey", "kms:Decrypt")]
    return out


def service_requests(auth: Authorization) -> list[Request]:
    """What AWS services do to our resources for the stacks to work: alarm actions, rule targets, log
    encryption (see the module docstring). The principal is the service; only resource policies apply."""
    d, region, out = auth.deployment, auth.region, []
    topics = {d.ref(s, l): p for s, l, p in d.resources("AWS::SNS::Topic")}
    topic_policies = {topic: p["PolicyDocument"] for _, _, p in d.resources("AWS::SNS::TopicPolicy")
                      for topic in p["Topics"]}
    queues = {d.get_att(s, l, "Arn"): (d.ref(s, l), p) for s, l, p in d.resources("AWS::SQS::Queue")}
    queue_policies = {url: p["PolicyDocument"] for _, _, p in d.resources("AWS::SQS::QueuePolicy") for url in p["Queues"]}
    functions = {d.get_att(s, l, "Arn") for s, l, _ in d.resources("AWS::Lambda::Function")}
    permissions: dict[str, list[dict[str, Any]]] = {}
    for _, logical, p in d.resources("AWS::Lambda::Permission"):
        condition = {"ArnLike": {"AWS:SourceArn": p["SourceArn"]}} if "SourceArn" in p else {}
        permissions.setdefault(p["FunctionName"], []).append({
            "Sid": logical, "Effect": "Allow", "Principal": {"Service": p["Principal"]}, "Action": p["Action"],
            "Resource": p["FunctionName"], **({"Condition": condition} if condition else {})})

    def encrypted(prefix: str, service: str, key: str | None, context: dict[str, Any]) -> list[Request]:
        if not key:
            return []
        key_arn = key if key.startswith("arn:") else f"arn:{PARTITION}:kms:{region}:{ACCOUNT}:key/{key}"
        return [Request(f"{prefix} {a}", service, a, key_arn, context, auth.key_policies.get(key_arn))
                for a in ("kms:GenerateDataKey", "kms:Decrypt")]

    def deliver(prefix: str, service: str, target: str, source_arn: str) -> list[Request]:
        context = {"aws:SourceArn": source_arn, "aws:SourceAccount": ACCOUNT}
        if target in topics:
            return [Request(f"{prefix} sns:Publish", service, "sns:Publish", target, context,
                            topic_policies.get(target))] + encrypted(prefix, service, topics[target].get("KmsMasterKeyId"),
                                                                     context)
        if target in queues:
            url, props = queues[target]
            return [Request(f"{prefix} sqs:SendMessage", service, "sqs:SendMessage", target, context,
                            queue_policies.get(url))] + encrypted(prefix, service, props.get("KmsMasterKeyId"), context)
        if target in functions:
            policy = {"Version": "2012-10-17", "Statement": permissions.get(target, [])}
            return [Request(f"{prefix} lambda:InvokeFunction", service, "lambda:InvokeFunction", target, context,
                            policy)]
        raise AssertionError(f"{prefix}: a target of unknown type {target}")

    for stack, logical, props in d.resources("AWS::CloudWatch::Alarm"):
        alarm = d.get_att(stack, logical, "Arn")
        for action in props.get("AlarmActions", []) + props.get("OKActions", []):
            out += deliver(f"alarm {logical} -> {action.rsplit(':', 1)[-1]}:", "cloudwatch.amazonaws.com", action, alarm)
    for stack, logical, props in d.resources("AWS::Events::Rule"):
        rule = d.get_att(stack, logical, "Arn")
        for target in props.get("Targets", []):
            out += deliver(f"rule {logical} -> {target['Id']}:", "events.amazonaws.com", target["Arn"], rule)
            if "DeadLetterConfig" in target:
                out += deliver(f"rule {logical} -> {target['Id']} dead letters:", "events.amazonaws.com",
                               target["DeadLetterConfig"]["Arn"], rule)
    logs = f"logs.{region}.amazonaws.com"
    for stack, logical, props in d.resources("AWS::Logs::LogGroup"):
        if "KmsKeyId" not in props:
            continue
        group = d.get_att(stack, logical, "Arn").removesuffix(":*")
        context = {"kms:EncryptionContext:aws:logs:arn": group, "aws:SourceAccount": ACCOUNT}
        out += [Request(f"log group {logical}: {a}", logs, a, props["KmsKeyId"],
                        context if a != "kms:DescribeKey" else {"aws:SourceAccount": ACCOUNT},
                        auth.key_policies.get(props["KmsKeyId"]))
                for a in ("kms:Encrypt", "kms:Decrypt", "kms:ReEncryptFrom", "kms:GenerateDataKey", "kms:DescribeKey")]
    return out


def processing_arguments(pipeline: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(s["Name"], s["Arguments"]) for s in _steps(pipeline["resolved"]["Steps"]) if s["Type"] == "Processing"]


def processing_job_arn(region: str, step_name: str) -> str:
    return job_arn(region, step_name).replace(":training-job/", ":processing-job/")


def create_processing_job_context(args: dict[str, Any]) -> dict[str, Any]:
    cluster, network = args["ProcessingResources"]["ClusterConfig"], args.get("NetworkConfig", {})
    return job_context(instance_type=cluster["InstanceType"], max_runtime=args["StoppingCondition"]["MaxRuntimeInSeconds"],
                       vpc=network.get("VpcConfig"), flags=network,
                       output_key=args.get("ProcessingOutputConfig", {}).get("KmsKeyId"),
                       volume_key=cluster.get("VolumeKmsKeyId"))


def processing_requests(auth: Authorization, pipeline: dict[str, Any]) -> list[Request]:
    """What the pipeline role and the execution role do for each processing (preparation) step."""
    out = []
    for step_name, args in processing_arguments(pipeline):
        name, region, pipeline_role, role = pipeline["name"], auth.region, pipeline["role_arn"], args["RoleArn"]
        job = processing_job_arn(region, step_name)
        out.append(Request(f"{name}: pipeline role sagemaker:CreateProcessingJob for {step_name}", pipeline_role,
                           "sagemaker:CreateProcessingJob", job, create_processing_job_context(args)))
        out += [Request(f"{name}: pipeline role {a} on {step_name}", pipeline_role, a, job)
                for a in ("sagemaker:DescribeProcessingJob", "sagemaker:StopProcessingJob", "sagemaker:AddTags")]
        out.append(Request(f"{name}: pipeline role iam:PassRole for {step_name}", pipeline_role, "iam:PassRole", role,
                           {"iam:PassedToService": "sagemaker.amazonaws.com"}))
        volume_key = args["ProcessingResources"]["ClusterConfig"].get("VolumeKmsKeyId")
        if volume_key:
            out += [Request(f"{name}: pipeline role {a} for {step_name} volumes", pipeline_role, a, volume_key,
                            {"kms:GrantIsForAWSResource": "true"} if a == "kms:CreateGrant" else {},
                            auth.key_policies.get(volume_key)) for a in ("kms:CreateGrant", "kms:DescribeKey")]
        for item in args["ProcessingInputs"]:
            out += auth.s3_requests(role, f"{name}: {step_name} input {item['InputName']}", item["S3Input"]["S3Uri"],
                                    ["s3:ListBucket", "s3:GetObject"], "part-000.jsonl")
        for item in args["ProcessingOutputConfig"]["Outputs"]:
            out += auth.s3_requests(role, f"{name}: {step_name} output {item['OutputName']}",
                                    item["S3Output"]["S3Uri"].rstrip("/") + "/", ["s3:PutObject"],
                                    "train/shard-00000.npy")
        log_group = f"arn:{PARTITION}:logs:{region}:{ACCOUNT}:log-group:/aws/sagemaker/ProcessingJobs"
        stream = f"{log_group}:log-stream:{job.rsplit('/', 1)[-1]}/algo-1-1700000000"
        out += [Request(f"{name}: {step_name} logs:CreateLogGroup", role, "logs:CreateLogGroup", log_group),
                Request(f"{name}: {step_name} logs:CreateLogStream", role, "logs:CreateLogStream", stream),
                Request(f"{name}: {step_name} logs:PutLogEvents", role, "logs:PutLogEvents", stream)]
        network = args.get("NetworkConfig", {})
        if "VpcConfig" in network:
            out += job_eni_requests(f"{name}: {step_name}", role, region, network["VpcConfig"])
    return out


def registration_arguments(pipeline: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(s["Name"], s["Arguments"]) for s in _steps(pipeline["resolved"]["Steps"]) if s["Type"] == "RegisterModel"]


def model_package_arn(region: str, group: str, version: int = 1) -> str:
    # Versioned packages: model-package/<group>/<version>, names in lower case as in every SageMaker ARN.
    return f"arn:{PARTITION}:sagemaker:{region}:{ACCOUNT}:model-package/{group.lower()}/{version}"


def create_model_package_context(args: dict[str, Any]) -> dict[str, Any]:
    """The condition keys SageMaker sets on CreateModelPackage from the request (Service Authorization Reference
    for SageMaker AI: sagemaker:ModelApprovalStatus, sagemaker:CustomerMetadataProperties/${MetadataKey})."""
    context = {f"sagemaker:CustomerMetadataProperties/{k}": v for k, v in args.get("CustomerMetadataProperties", {}).items()}
    if "ModelApprovalStatus" in args:
        context["sagemaker:ModelApprovalStatus"] = args["ModelApprovalStatus"]
    return context


def registration_requests(auth: Authorization, pipeline: dict[str, Any]) -> list[Request]:
    """The gate's read of the evaluation report (Pipelines reads a property file as the pipeline role) and the
    registration of the model (CreateModelPackage, then DescribeModelPackage)."""
    out, name, role = [], pipeline["name"], pipeline["role_arn"]
    reports = {f"Steps.{step}.PropertyFiles.{f['PropertyFileName']}": (step, f)
               for step, args in processing_arguments(pipeline)
               for f in next(s for s in _steps(pipeline["resolved"]["Steps"]) if s["Name"] == step).get("PropertyFiles", [])}
    for step, report in reports.values():
        args = next(a for n, a in processing_arguments(pipeline) if n == step)
        output = next(o for o in args["ProcessingOutputConfig"]["Outputs"] if o["OutputName"] == report["OutputName"])
        out += auth.s3_requests(role, f"{name}: pipeline role reads the property file {report['PropertyFileName']}",
                                output["S3Output"]["S3Uri"].rstrip("/") + "/", ["s3:GetObject"], report["FilePath"])
    for step, args in registration_arguments(pipeline):
        package = model_package_arn(auth.region, args["ModelPackageGroupName"])
        out += [Request(f"{name}: pipeline role sagemaker:CreateModelPackage ({step})", role,
                        "sagemaker:CreateModelPackage", package, create_model_package_context(args)),
                Request(f"{name}: pipeline role sagemaker:DescribeModelPackage ({step})", role,
                        "sagemaker:DescribeModelPackage", package)]
    return out


def all_run_requests(auth: Authorization) -> list[Request]:
    out = []
    for pipeline in pipelines(auth.deployment):
        out += pipeline_role_requests(auth, pipeline) + execution_role_requests(auth, pipeline)
        out += processing_requests(auth, pipeline) + registration_requests(auth, pipeline)
    return out + platform_requests(auth) + service_requests(auth)


def policy_key_checks(auth: Authorization) -> tuple[list[dict[str, str]], list[str]]:
    """Every (action, resource, condition key) of every Allow/Deny statement in every identity policy, and
    every action named: what the dead-key test checks against the simulator's data."""
    checks, actions = [], set()
    documents = [p["policy"] for policies in auth.roles.values() for p in policies]
    documents += list(auth.bucket_policies.values()) + list(auth.key_policies.values())
    for document in documents:
        for statement in document["Statement"]:
            names = statement.get("Action", [])
            names = [names] if isinstance(names, str) else names
            resources = statement.get("Resource", ["*"])
            resources = [resources] if isinstance(resources, str) else resources
            for name in names:
                if "*" in name:
                    continue
                actions.add(name)
                for operator in statement.get("Condition", {}).values():
                    for key in operator:
                        for resource in resources[:1]:
                            checks.append({"action": name, "resource": resource, "key": key})
    unique = {json.dumps(c, sort_keys=True): c for c in checks}
    return list(unique.values()), sorted(actions)
