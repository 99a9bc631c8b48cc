"""The hosts file of a remote testbed: checked like the converter's config file, every error at once
as FILE:LINE: key: message (topologies/hostsfile.py)."""
import pathlib
import re

import pytest

from topologies.hostsfile import HostsFileError, load

ROOT = pathlib.Path(__file__).resolve().parents[2]


def good(key: str) -> str:
    return f"""[defaults]
user = "root"
key = "{key}"
workdir = "/var/tmp/mimbox"

[client]
ssh = "192.0.2.11"
cpus = "0"

[converter]
ssh = "ops@192.0.2.12:2222"
cpus = "1-3"
sudo = true

[server]
ssh = "192.0.2.13"

[[client_path]]
client = {{ interface = "eth1", address = "10.0.1.1/24" }}
converter = {{ interface = "eth1", address = "10.0.1.2/24" }}

[[client_path]]
client = {{ interface = "eth2", address = "10.0.2.1/24" }}
converter = {{ interface = "eth2", address = "10.0.2.2/24" }}

[[server_path]]
server = {{ interface = "eth1", address = "10.0.101.1/24" }}
converter = {{ interface = "eth3", address = "10.0.101.2/24" }}
"""


@pytest.fixture
def key(tmp_path):
    k = tmp_path / "id"
    k.write_text("not really a key\n")
    return str(k)


def test_a_good_file_gives_hosts_and_paths(tmp_path, key):
    f = tmp_path / "lab.toml"
    f.write_text(good(key))
    lab = load(str(f))
    conv = lab.hosts["converter"]
    assert (conv.user, conv.address, conv.port, conv.sudo, conv.cpus) == ("ops", "192.0.2.12", 2222, True, "1-3")
    assert lab.hosts["client"].target == "root@192.0.2.11:22" and lab.hosts["server"].cpus == "0"
    assert [(p.intf_outer, p.intf_mbox, p.outer_ip, p.mbox_ip, p.subnet) for p in lab.client_paths] == [
        ("eth1", "eth1", "10.0.1.1", "10.0.1.2", "10.0.1.0/24"), ("eth2", "eth2", "10.0.2.1", "10.0.2.2", "10.0.2.0/24")]
    assert lab.server_paths[0].outer(4) == "10.0.101.1" and lab.server_paths[0].mbox(4) == "10.0.101.2"


def test_every_error_at_once_with_its_line(tmp_path, key):
    text = good(key).replace('cpus = "1-3"', 'cpus = "one"').replace('ssh = "192.0.2.13"', 'port = "22"') \
        .replace('address = "10.0.2.2/24"', 'address = "10.0.3.2/24"').replace('user = "root"', 'user = "root"\nspeed = 1')
    f = tmp_path / "lab.toml"
    f.write_text(text)
    with pytest.raises(HostsFileError) as e:
        load(str(f))
    lines = e.value.lines()
    lineno = {k: n for n, line in enumerate(text.splitlines(), 1) for k in ("speed", "cpus", "port")
              if line.startswith(k) and (k != "cpus" or "one" in line)}
    assert f"{f}:{lineno['speed']}: defaults.speed: unknown key" in "\n".join(lines)
    assert any(line.startswith(f"{f}:{lineno['cpus']}: converter.cpus: 'one' is not a CPU list") for line in lines)
    assert any(line.startswith(f"{f}:{lineno['port']}: server.port: must be int") for line in lines)
    assert any("server.ssh: missing" in line for line in lines)
    assert any(re.search(r"client_path\.1: 10\.0\.2\.1/24 and 10\.0\.3\.2/24 are not on one subnet", line) for line in lines)
    assert len(lines) == 5


@pytest.mark.parametrize("change, message", [
    (lambda t: t.replace("[server]", "[serverx]"), "[server] is missing"),
    (lambda t: t.split("[[client_path]]")[0] + "[[server_path]]" + t.split("[[server_path]]")[1], "at least one [[client_path]]"),
    (lambda t: t.replace('address = "10.0.1.1/24"', 'address = "10.0.1.1"'), "an IPv4 address with its prefix"),
    (lambda t: t.replace('address = "10.0.1.1/24"', 'address = "fd00::1/64"'), "an IPv4 address with its prefix"),
    (lambda t: t.replace('{ interface = "eth1", address = "10.0.1.1/24" }', '{ interface = "eth1" }'), "needs both"),
    (lambda t: t.replace('ssh = "192.0.2.11"', 'ssh = "root@"'), "not host, host:port"),
    (lambda t: t.replace('workdir = "/var/tmp/mimbox"', 'workdir = "mimbox"'), "must be an absolute path"),
    (lambda t: t + "\n[router]\nssh = \"192.0.2.14\"\n", "router host is not supported"),
    (lambda t: t.replace("[client]", "[client"), "not TOML"),
])
def test_bad_files_are_refused_with_a_reason(tmp_path, key, change, message):
    f = tmp_path / "lab.toml"
    f.write_text(change(good(key)))
    with pytest.raises(HostsFileError) as e:
        load(str(f))
    assert message in str(e.value) and str(e.value).startswith(f"{f}:")


def test_a_missing_key_file_is_named(tmp_path):
    f = tmp_path / "lab.toml"
    f.write_text(good(str(tmp_path / "nokey")))
    with pytest.raises(HostsFileError, match=r"lab.toml:3: defaults.key: no such key file"):
        load(str(f))


def test_the_docs_example_is_a_valid_hosts_file(tmp_path, key):
    """docs/remote.md's hosts file, as written (its key path replaced by one that exists here)."""
    text = (ROOT / "docs" / "remote.md").read_text()
    block = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    f = tmp_path / "lab.toml"
    f.write_text(re.sub(r'key = "[^"]*"', f'key = "{key}"', block))
    lab = load(str(f))
    assert set(lab.hosts) == {"client", "converter", "server"} and len(lab.client_paths) == 2
