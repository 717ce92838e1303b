"""`ray up` / `ray down` of cluster/gpu.yaml against moto's EC2 + IAM server on 127.0.0.1.

What cluster/README.md's one-time setup creates (the security group in the default VPC, the
roles and instance profiles ctt-ray-head / ctt-ray-worker) is created in moto, the AMI Ray
picks by default for us-east-1 is registered there, and a copy of gpu.yaml with only the
sg-SET_YOURS placeholders replaced goes through the real launcher:

- `ray up -y --no-config-cache` runs until the head instance is launched and Ray starts
  waiting for SSH (which an offline instance never answers: `ssh` is a stub that records its
  arguments and refuses), then its process group is killed;
- the instance is checked through the EC2 API: type, AMI, key pair, security group, instance
  profile, root volume, zone, Ray's tags; Ray created no security group, role or profile;
- one worker of each GPU type is launched through Ray's AWS NodeProvider with the bootstrap
  config `ray up` prepared for the head's autoscaler, as the autoscaler (v2) launches them
  (and a gpu1 with the file's commented-out spot option: accepted, lifecycle spot);
- `ray down -y` terminates (not stops) every instance although its `docker stop` over SSH
  fails on each node (`ray stop` is skipped: the head never left waiting-for-ssh).

moto is strict here: AMI, key pair and instance type validation are on, and run_instances
refuses an unknown instance profile or security group (the negative cases).

Not covered (needs a real account): SSH, Docker and the setup commands on the instance, the
real AMI (its NVIDIA driver, root snapshot size, availability), IAM policy enforcement on the
head (moto does not evaluate iam:PassRole), capacity, vCPU quotas, spot.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("ray.autoscaler._private.aws.config")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
GPU_YAML = ROOT / "cluster" / "gpu.yaml"
RAY = Path(sys.executable).with_name("ray")
REGION = "us-east-1"
MY_CIDR = "203.0.113.7/32"  # the README's example address
ACCOUNT = "123456789012"  # moto's default account
UP_DEADLINE_S = 120
DOWN_DEADLINE_S = 120

SSH_STUB = """#!/bin/sh
# Offline stand-in for ssh: records what Ray asked for and refuses, like an unreachable host.
printf '%s\\n' "$*" >> "$CTT_SSH_LOG"
echo "ssh: connect to host port 22: Connection refused (offline test stub)" >&2
exit 255
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clear_ray_boto_caches() -> None:
    """Ray caches boto3 resources per (service, region): drop them so they use this moto."""
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.aws import utils as aws_utils

    aws_utils.resource_cache.cache_clear()
    aws_utils.client_cache.cache_clear()
    aws_config._get_subnets_or_die.cache_clear()


class Aws:
    """moto's server plus the environment `ray` runs in (ours and the subprocesses')."""

    def __init__(self, tmp: Path, endpoint: str):
        self.tmp = tmp
        self.endpoint = endpoint
        self.home = tmp / "home"
        self.ssh_log = tmp / "ssh.log"

    def client(self, name: str):
        return boto3.client(name, region_name=REGION, endpoint_url=self.endpoint,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def instances(self, **filters) -> list[dict]:
        flt = [{"Name": "tag:ray-cluster-name", "Values": ["ctt"]}]
        flt += [{"Name": k, "Values": v} for k, v in filters.items()]
        res = self.client("ec2").describe_instances(Filters=flt)["Reservations"]
        return [i for r in res for i in r["Instances"]]

    def ssh_calls(self) -> list[str]:
        return self.ssh_log.read_text().splitlines() if self.ssh_log.exists() else []


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    from moto import settings as moto_settings
    from moto.server import ThreadedMotoServer

    tmp = tmp_path_factory.mktemp("aws")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    a = Aws(tmp, endpoint)
    for d in ("home/.ssh", "home/.aws", "tmp", "bin"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    stub = tmp / "bin" / "ssh"
    stub.write_text(SSH_STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)

    mp = pytest.MonkeyPatch()
    for k in list(os.environ):
        if k.startswith("AWS_"):
            mp.delenv(k)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,  # boto3 >= 1.28: every service, no code change in Ray
        "AWS_CONFIG_FILE": str(tmp / "home/.aws/config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "home/.aws/credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "HOME": str(a.home),  # Ray writes ~/.ssh/ray-autoscaler_us-east-1.pem here
        "TMPDIR": str(tmp / "tmp"),  # the bootstrap config `ray up` writes for the head
        "PATH": f"{tmp / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "CTT_SSH_LOG": str(a.ssh_log),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_UP_enable_autoscaler_v2": "1",  # the default, set to silence its notice
        "MOTO_IAM_LOAD_MANAGED_POLICIES": "true",  # AmazonEC2FullAccess, as on AWS
    }
    for k, v in env.items():
        mp.setenv(k, v)
    mp.setattr(moto_settings, "ENABLE_AMI_VALIDATION", True)
    mp.setattr(moto_settings, "ENABLE_KEYPAIR_VALIDATION", True)
    mp.setattr(moto_settings, "EC2_ENABLE_INSTANCE_TYPE_VALIDATION", True)
    mp.setattr(boto3, "DEFAULT_SESSION", None)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset",
                                                      method="POST"), timeout=10)
        a.sg = _one_time_setup(a)
        a.ami = _register_default_ami(a)
        _clear_ray_boto_caches()
        yield a
    finally:
        _clear_ray_boto_caches()
        server.stop()
        mp.undo()


def _one_time_setup(a: Aws) -> str:
    """cluster/README.md#1-one-time-setup, the same calls through boto3."""
    ec2, iam = a.client("ec2"), a.client("iam")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]
    sg = ec2.create_security_group(VpcId=vpc["VpcId"], GroupName="ctt-ray",
                                   Description="ctt Ray cluster")["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=sg, IpProtocol="tcp", FromPort=22,
                                         ToPort=22, CidrIp=MY_CIDR)
    ec2.authorize_security_group_ingress(
        GroupId=sg, IpPermissions=[{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": sg}]}])
    trust = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
        "Action": "sts:AssumeRole"}]}
    bucket = "YOUR_BUCKET"
    s3 = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}"},
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
         "Resource": f"arn:aws:s3:::{bucket}/*"}]}
    pass_worker = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "iam:PassRole",
        "Resource": "arn:aws:iam::*:role/ctt-ray-worker"}]}
    for r in ("ctt-ray-worker", "ctt-ray-head"):
        iam.create_role(RoleName=r, AssumeRolePolicyDocument=json.dumps(trust))
        iam.put_role_policy(RoleName=r, PolicyName="ctt-s3", PolicyDocument=json.dumps(s3))
        iam.create_instance_profile(InstanceProfileName=r)
        iam.add_role_to_instance_profile(InstanceProfileName=r, RoleName=r)
    iam.attach_role_policy(RoleName="ctt-ray-head",
                           PolicyArn="arn:aws:iam::aws:policy/AmazonEC2FullAccess")
    iam.put_role_policy(RoleName="ctt-ray-head", PolicyName="ctt-pass-worker",
                        PolicyDocument=json.dumps(pass_worker))
    return sg


def _register_default_ami(a: Aws) -> str:
    """The image Ray uses when a node_config has no ImageId, under its real id (moto's
    register_image would pick a random one). Everything else about it is moto's."""
    from moto.backends import get_backend
    from moto.ec2.models.amis import Ami
    from ray.autoscaler._private.aws.config import DEFAULT_AMI, DEFAULT_AMI_NAME

    ami_id = DEFAULT_AMI[REGION]
    backend = get_backend("ec2")[ACCOUNT][REGION]
    backend.amis[ami_id] = Ami(
        backend, ami_id=ami_id, name=DEFAULT_AMI_NAME, owner_alias="amazon", public=True,
        architecture="x86_64", virtualization_type="hvm", root_device_type="ebs",
        root_device_name="/dev/sda1", region_name=f"{REGION}a")
    assert a.client("ec2").describe_images(ImageIds=[ami_id])["Images"][0]["Name"] \
        == DEFAULT_AMI_NAME
    return ami_id


def _copy_of_gpu_yaml(a: Aws, name: str, edit=None) -> Path:
    """gpu.yaml with sg-SET_YOURS replaced by the group created above, nothing else changed
    (a negative case may pass `edit`, applied to the text after that)."""
    text = GPU_YAML.read_text()
    assert text.count("sg-SET_YOURS") == 3
    text = text.replace("sg-SET_YOURS", a.sg)
    if edit:
        text = edit(text)
    assert "SET_YOURS" not in yaml.safe_dump(yaml.safe_load(text))  # comments may keep it
    out = a.tmp / name
    out.write_text(text)
    return out


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(RAY), *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, env=os.environ)


def _run_to_end(args: list[str], log: Path, deadline_s: float) -> subprocess.Popen:
    """``ray <args>`` until it exits or ``deadline_s`` passes; its process group is killed
    either way (a launcher may leave SSH retries behind)."""
    proc = _start(args, log)
    try:
        proc.wait(deadline_s)
    except subprocess.TimeoutExpired:
        pass
    finally:
        _kill_group(proc)
    return proc


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _volumes(a: Aws, instance: dict) -> dict[str, dict]:
    ec2 = a.client("ec2")
    out = {}
    for bdm in instance["BlockDeviceMappings"]:
        vol = ec2.describe_volumes(VolumeIds=[bdm["Ebs"]["VolumeId"]])["Volumes"][0]
        out[bdm["DeviceName"]] = {"Size": vol["Size"], "VolumeType": vol["VolumeType"]}
    return out


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _tags(instance: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def _profile_name(instance: dict) -> str:
    return instance["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]


def test_moto_is_strict(aws):
    """The checks below mean something: moto refuses what AWS would refuse here."""
    import botocore.exceptions

    ec2 = aws.client("ec2")
    good = {"ImageId": aws.ami, "InstanceType": "m5.xlarge", "MinCount": 1, "MaxCount": 1}
    bad = [
        ({"ImageId": "ami-0123456789abcdef0"}, "InvalidAMIID"),
        ({"InstanceType": "m5.huge"}, "InvalidInstanceType"),
        ({"KeyName": "no-such-key"}, "InvalidKeyPair"),
        ({"SecurityGroupIds": ["sg-0123456789abcdef0"]}, "InvalidGroup"),
        ({"IamInstanceProfile": {"Name": "no-such-profile"}}, ""),
    ]
    for change, code in bad:
        with pytest.raises(botocore.exceptions.ClientError) as err:
            ec2.run_instances(**{**good, **change})
        assert code in err.value.response["Error"]["Code"], (change, err.value.response)
    assert not aws.instances()


def test_ray_up_and_down_against_moto(aws):
    from ray.autoscaler._private.aws.config import DEFAULT_AMI
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.util import hash_launch_conf
    from ray.autoscaler.tags import (
        NODE_KIND_WORKER,
        STATUS_UNINITIALIZED,
        TAG_RAY_LAUNCH_CONFIG,
        TAG_RAY_LAUNCH_REQUEST,
        TAG_RAY_NODE_KIND,
        TAG_RAY_NODE_NAME,
        TAG_RAY_NODE_STATUS,
        TAG_RAY_USER_NODE_TYPE,
    )
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    cfg_file = _copy_of_gpu_yaml(aws, "gpu.yaml")
    ec2, iam = aws.client("ec2"), aws.client("iam")
    sgs_before = {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]}

    # ---- ray up: until the head is launched and Ray waits for its SSH --------------------
    up_log = aws.tmp / "ray-up.log"
    ssh0 = len(aws.ssh_calls())
    up = _start(["up", "-y", "--no-config-cache", str(cfg_file)], up_log)
    try:
        deadline = time.monotonic() + UP_DEADLINE_S
        while time.monotonic() < deadline and up.poll() is None and len(aws.ssh_calls()) == ssh0:
            time.sleep(0.5)
        bootstrap_files = sorted((aws.tmp / "tmp").glob("ray-bootstrap-*"))
        remote = json.loads(bootstrap_files[-1].read_text()) if bootstrap_files else None
        still_running = up.poll() is None
    finally:
        _kill_group(up)
    out = _plain(up_log.read_text())
    reached_ssh = still_running and len(aws.ssh_calls()) > ssh0
    assert reached_ssh, f"ray up did not reach SSH:\n{out[-6000:]}"
    assert "Launched a new head node" in out and "Waiting for SSH" in out, out[-6000:]
    assert remote is not None, out[-6000:]
    # Ray's summary of the bootstrapped config: the file's profile and group, its default AMI.
    assert "IAM Profile: ctt-ray-head" in out
    assert f"EC2 Security groups (all available node types): {aws.sg}\n" in out
    assert f"EC2 AMI (all available node types): {aws.ami} [dlami]" in out

    # ---- the head instance ----------------------------------------------------------------
    heads = aws.instances(**{"instance-state-name": ["pending", "running"]})
    assert len(heads) == 1, heads
    head = heads[0]
    tags = _tags(head)
    assert tags["ray-node-type"] == "head" and tags["ray-user-node-type"] == "ray.head.default"
    assert tags["Name"] == "ray-ctt-head" and tags["ray-cluster-name"] == "ctt"
    assert tags[TAG_RAY_LAUNCH_CONFIG] and tags[TAG_RAY_NODE_STATUS] in (
        STATUS_UNINITIALIZED, "waiting-for-ssh")
    assert head["InstanceType"] == "m5.xlarge"
    assert head["ImageId"] == DEFAULT_AMI[REGION] == aws.ami
    assert [g["GroupId"] for g in head["SecurityGroups"]] == [aws.sg]
    assert _profile_name(head) == "ctt-ray-head"
    assert _volumes(aws, head) == {"/dev/sda1": {"Size": 150, "VolumeType": "gp3"}}
    assert head["RootDeviceName"] == "/dev/sda1"  # the mapping resizes the root volume
    # The first zone listed in provider.availability_zone, in the default VPC.
    assert head["Placement"]["AvailabilityZone"] == "us-east-1a"
    subnet = ec2.describe_subnets(SubnetIds=[head["SubnetId"]])["Subnets"][0]
    assert subnet["DefaultForAz"] and subnet["VpcId"] == head["VpcId"]

    # The key pair Ray created: in EC2, its private half in ~/.ssh, used for the SSH it tried.
    key_name = f"ray-autoscaler_{REGION}"
    key_file = aws.home / ".ssh" / f"{key_name}.pem"
    assert head["KeyName"] == key_name
    assert ec2.describe_key_pairs(KeyNames=[key_name])["KeyPairs"]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert "BEGIN" in key_file.read_text()
    first_ssh = aws.ssh_calls()[ssh0]
    assert f"-i {key_file}" in first_ssh and f"ubuntu@{head['PublicIpAddress']}" in first_ssh

    # Ray created no security group (its default one opens SSH to 0.0.0.0/0), no role and no
    # instance profile, and the group's rules are still the README's.
    sgs = ec2.describe_security_groups()["SecurityGroups"]
    assert {g["GroupId"] for g in sgs} == sgs_before
    assert not [g for g in sgs if g["GroupName"].startswith("ray-autoscaler")]
    for g in sgs:
        for perm in g["IpPermissions"]:
            assert not [r for r in perm.get("IpRanges", []) if r["CidrIp"] == "0.0.0.0/0"], g
    (ours,) = [g for g in sgs if g["GroupId"] == aws.sg]
    rules = {(p["IpProtocol"], p.get("FromPort"), p.get("ToPort"),
              tuple(r["CidrIp"] for r in p.get("IpRanges", [])),
              tuple(u["GroupId"] for u in p.get("UserIdGroupPairs", [])))
             for p in ours["IpPermissions"]}
    assert ("tcp", 22, 22, (MY_CIDR,), ()) in rules
    assert any(r[0] == "-1" and r[4] == (aws.sg,) for r in rules), rules
    assert len(rules) == 2, rules
    profiles = {p["InstanceProfileName"]
                for p in iam.list_instance_profiles()["InstanceProfiles"]}
    assert profiles == {"ctt-ray-head", "ctt-ray-worker"}
    assert {r["RoleName"] for r in iam.list_roles()["Roles"]} == profiles

    # ---- workers, as the head's autoscaler would launch them ------------------------------
    # `remote` is ~/ray_bootstrap_config.yaml, the config `ray up` ships to the head for its
    # autoscaler; the launch below is the one of ray.autoscaler.v2's NodeProviderAdapter.
    assert "head_node" not in remote and remote["auth"]["ssh_private_key"] == \
        "~/ray_bootstrap_key.pem"
    # ray up mounts the key there (file_mounts); the launch hash reads it, as on the head.
    (aws.home / "ray_bootstrap_key.pem").write_text(key_file.read_text())
    config = AutoscalingConfig(remote)
    # Every node type may use the default subnets of the three zones, in the file's order.
    for node_type in remote["available_node_types"].values():
        subnets = ec2.describe_subnets(SubnetIds=node_type["node_config"]["SubnetIds"])
        zones = {s["SubnetId"]: s["AvailabilityZone"] for s in subnets["Subnets"]}
        assert [zones[s] for s in node_type["node_config"]["SubnetIds"]] == [
            "us-east-1a", "us-east-1b", "us-east-1c"]
    _clear_ray_boto_caches()
    provider = AWSNodeProvider(remote["provider"], remote["cluster_name"])
    expected = {"gpu1": ("g5.2xlarge", 200), "gpu4": ("g5.12xlarge", 300)}
    for node_type in [*expected, "gpu1-spot"]:
        spot = node_type.endswith("-spot")
        node_type = node_type.removesuffix("-spot")
        launch_config = config.get_cloud_node_config(node_type)
        if spot:  # gpu.yaml's commented-out option, uncommented
            launch_config["InstanceMarketOptions"] = {"MarketType": "spot"}
        node_tags = {
            TAG_RAY_NODE_NAME: f"ray-{remote['cluster_name']}-worker",
            TAG_RAY_NODE_KIND: NODE_KIND_WORKER,
            TAG_RAY_NODE_STATUS: STATUS_UNINITIALIZED,
            TAG_RAY_LAUNCH_CONFIG: hash_launch_conf(launch_config, remote["auth"]),
            TAG_RAY_LAUNCH_REQUEST: f"test-{node_type}{'-spot' if spot else ''}",
            TAG_RAY_USER_NODE_TYPE: node_type,
        }
        provider.create_node_with_resources_and_labels(
            launch_config, node_tags, 1, config.get_node_resources(node_type),
            config.get_node_labels(node_type))
    workers = provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_WORKER})
    assert len(workers) == 3
    by_type, spot_workers = {}, []
    for inst in aws.instances(**{"instance-id": workers}):
        if inst.get("InstanceLifecycle") == "spot":
            spot_workers.append(inst)
        else:
            by_type[_tags(inst)["ray-user-node-type"]] = inst
    assert set(by_type) == set(expected)
    assert [_tags(w)["ray-user-node-type"] for w in spot_workers] == ["gpu1"]
    assert spot_workers[0]["InstanceType"] == "g5.2xlarge"
    for node_type, (itype, size) in expected.items():
        w = by_type[node_type]
        assert w["InstanceType"] == itype, node_type
        assert _profile_name(w) == "ctt-ray-worker", node_type
        assert _volumes(aws, w) == {"/dev/sda1": {"Size": size, "VolumeType": "gp3"}}
        assert [g["GroupId"] for g in w["SecurityGroups"]] == [aws.sg]
        assert w["ImageId"] == aws.ami and w["KeyName"] == key_name
        assert w["Placement"]["AvailabilityZone"] in ("us-east-1a", "us-east-1b", "us-east-1c")
        assert _tags(w)["Name"] == "ray-ctt-worker" and _tags(w)["ray-node-type"] == "worker"
        assert "InstanceLifecycle" not in w  # on demand, as gpu.yaml ships
    _clear_ray_boto_caches()

    # ---- ray down: SSH fails (ray stop, docker stop), the instances are terminated --------
    ssh_before = len(aws.ssh_calls())
    ips = sorted(i["PublicIpAddress"] for i in aws.instances())
    assert len(ips) == 4
    down_log = aws.tmp / "ray-down.log"
    down = _run_to_end(["down", "-y", str(cfg_file)], down_log, DOWN_DEADLINE_S)
    out = _plain(down_log.read_text())
    assert down.returncode == 0, out[-6000:]
    assert "No nodes remaining" in out, out[-6000:]
    # `ray stop` is not attempted on a head that never left waiting-for-ssh; `docker stop`
    # is, over SSH, on every node, and its failure does not stop the teardown.
    assert "Head node of cluster (ctt) not found" in out, out[-6000:]
    instances = aws.instances()
    stops = [c for c in aws.ssh_calls()[ssh_before:] if "docker stop ray_container" in c]
    assert sorted(c.split(" bash --login")[0].rsplit("ubuntu@", 1)[1] for c in stops) == \
        ips
    states = {i["InstanceId"]: i["State"]["Name"] for i in instances}
    assert len(states) == 4 and set(states.values()) == {"terminated"}, states  # not stopped


@pytest.mark.parametrize("case", ["missing-instance-profile", "missing-security-group"])
def test_ray_up_refuses_a_broken_copy(aws, case):
    """A profile or group that does not exist stops `ray up` with an error naming it, before
    any SSH and with no instance left running."""
    if case == "missing-instance-profile":
        edit = lambda t: t.replace("Name: ctt-ray-head", "Name: ctt-ray-head-typo")  # noqa: E731
        expect = ["Failed to launch instances", "ctt-ray-head-typo"]
    else:
        edit = lambda t: t.replace(aws.sg, "sg-0123456789abcdef0")  # noqa: E731
        expect = ["Failed to detect a security group", "SecurityGroupIds"]
    cfg_file = _copy_of_gpu_yaml(aws, f"gpu-{case}.yaml", edit)
    ssh_before = len(aws.ssh_calls())
    live = {"instance-state-name": ["pending", "running"]}
    before = {i["InstanceId"] for i in aws.instances(**live)}
    log = aws.tmp / f"ray-up-{case}.log"
    up = _run_to_end(["up", "-y", "--no-config-cache", str(cfg_file)], log, UP_DEADLINE_S)
    out = _plain(log.read_text())
    assert up.returncode is not None and up.returncode > 0, out[-6000:]
    for e in expect:
        assert e in out, out[-6000:]
    assert len(aws.ssh_calls()) == ssh_before
    assert {i["InstanceId"] for i in aws.instances(**live)} == before


def test_copy_changes_only_the_placeholders(aws):
    """The launched file is gpu.yaml itself: same settings once the group id is put back."""
    copy_cfg = yaml.safe_load(_copy_of_gpu_yaml(aws, "gpu-cmp.yaml").read_text())
    original = yaml.safe_load(GPU_YAML.read_text())
    restored = json.loads(json.dumps(copy_cfg).replace(aws.sg, "sg-SET_YOURS"))
    assert restored == original
