"""The README's several-machines recipe, run as written on separate lab hosts (root only).

The commands come out of README.md at run time (tests/lab/readme_recipe.py): `shoal token new`,
`shoal coordinator` and `shoal peer` exactly as the README's bash block has them, with
`coord.example` replaced by the coordinator host's address and nothing added (no --host,
--advertise, --plaintext, --port, --state-dir, --identity). Each lab host is a separate machine:
its own network namespace on the lab's bridge, its own working directory and its own HOME, so
every default (state dir, identity file, ports) is the one a user gets. The only environment the
test sets is HOME, SHOAL_TORCH_THREADS=1 (this machine's few cores are shared) and PYTHONPATH
(the `shoal` script then runs this checkout's code, wherever pip installed it from).

As the README says, join.token is copied (mode 0600) to each peer host after the coordinator's
first start, when it also carries the coordinator's fingerprint. The run must train to its last
step with every peer (3 hosts: stage 0 and 2 block stages), the loss must fall, every peer must
be registered at its own lab address (never 127.0.0.1) with reach `direct`, and the README's
`shoal status --coordinator-http coord.example:8080`, run on a peer host, must show all of that.

The lab's links are left unshaped and without the delay relay (its iptables redirect is removed):
plain namespaces on a bridge, as machines on one network. That run is marked slow (CI's slow
pass); the parse's own tests below are quick and run in the default suite.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from protocols.admission import parse_token
from protocols.identity import Identity
from protocols.runspec import RunSpec
from shoal.lab.network import LabNetwork, in_netns, netns_available, run
from shoal.status import CoordinatorUnreachable, fetch_status
from tests.lab import readme_recipe
from tests.lab.readme_recipe import Recipe, RecipeError, parse
from tests.polling import poll_until
from tests.shoal.entry import shoal_exe

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[2]
STEPS = 16
PEER_HOSTS = ("peer1", "peer2", "peer3")  # stage 0 + 2 block stages
SPEC = {"run.name": "readme-recipe", "run.steps": STEPS, "model.d_model": 32,
        "model.n_layers": 2, "model.n_heads": 4, "model.seq_len": 32, "pipeline.stages": 2,
        "pipeline.microbatch": 4, "pipeline.target_batch": 8, "optim.lr": 1e-2,
        "membership.heartbeat_s": 0.5, "membership.lease_s": 10.0}


class Machines:
    """The lab hosts as machines: a directory and HOME each, commands run inside the host's
    namespace in that directory; `stop` ends exactly the processes started here, by pid."""

    def __init__(self, net: LabNetwork, root: Path) -> None:
        self.net = net
        self.dirs = {name: root / name for name in net.names}
        self.procs: list[tuple[str, subprocess.Popen]] = []
        for d in self.dirs.values():
            (d / "home").mkdir(parents=True)

    def env(self, host: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
        env.update(HOME=str(self.dirs[host] / "home"), PYTHONUNBUFFERED="1",
                   SHOAL_TORCH_THREADS="1", PYTHONPATH=str(REPO))  # this tree's code
        return env

    def argv(self, host: str, argv: list[str]) -> list[str]:
        assert argv[0] == "shoal", argv
        return [*self.net.exec_prefix(host), shoal_exe(), *argv[1:]]

    def run(self, host: str, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(host, argv), cwd=self.dirs[host], env=self.env(host),
                              capture_output=True, text=True, timeout=timeout)

    def start(self, host: str, argv: list[str], log: str) -> subprocess.Popen:
        with open(self.dirs[host] / log, "ab") as f:  # `ip netns exec` execs: pid is shoal's
            p = subprocess.Popen(self.argv(host, argv), cwd=self.dirs[host], env=self.env(host),
                                 stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((host, p))
        return p

    def logs(self) -> str:
        return "\n".join(f"--- {h}/{f.name}\n{f.read_text(errors='replace')[-2500:]}"
                         for h, d in self.dirs.items() for f in sorted(d.glob("*.log")))

    def stop(self) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p in reversed(self.procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def plain_bridge(net: LabNetwork) -> None:
    """Drop the delay relay's redirect (LabNetwork adds it when iptables is there): without a
    relay running it would send every link to a closed port."""
    if net.transparent:
        for h in net.hosts.values():
            run(*net.exec_prefix(h.name), "iptables", "-t", "nat", "-F", "OUTPUT")
        net.transparent = False


def namespaces() -> list[str]:
    return sorted(subprocess.run(["ip", "netns", "list"], capture_output=True,
                                 text=True).stdout.split())


def status_from(net: LabNetwork, host: str, url: str) -> dict | None:
    """/api/status fetched from inside `host`'s namespace, or None while nothing answers."""
    def get() -> dict | None:
        try:
            return fetch_status(url, timeout=5.0)
        except CoordinatorUnreachable:
            return None
    return in_netns(net.hosts[host].netns, get)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_several_machines_recipe_trains(tmp_path):
    why = netns_available()
    if why:
        pytest.skip(why)
    recipe = readme_recipe.load()
    net = LabNetwork(["coord", *PEER_HOSTS])
    machines: Machines | None = None
    try:
        net.create()
        plain_bridge(net)
        machines = Machines(net, tmp_path)
        coord = net.hosts["coord"].address
        url = f"http://{coord}:{recipe.http_port}/api/status"
        (machines.dirs["coord"] / recipe.config_file).write_text(RunSpec().replace(**SPEC)
                                                                 .to_toml())

        made = machines.run("coord", recipe.on(recipe.token, coord))
        assert made.returncode == 0, f"{' '.join(recipe.token)}: {made.stdout}{made.stderr}"
        coordinator = machines.start("coord", recipe.on(recipe.coordinator, coord),
                                     "coordinator.log")
        first = poll_until(lambda: coordinator.poll() is not None
                           or status_from(net, "peer1", url), 90)
        assert isinstance(first, dict), ("the coordinator did not answer on "
                                          f"{coord}:{recipe.http_port}\n{machines.logs()}")
        token = machines.dirs["coord"] / recipe.token_file
        assert parse_token(token.read_text())[1], ("after its first start the coordinator's "
                                                   "token file holds no fingerprint")
        for host in PEER_HOSTS:  # copied after the first start, mode 0600, as the README says
            copy = machines.dirs[host] / recipe.token_file
            shutil.copyfile(token, copy)
            copy.chmod(0o600)
            machines.start(host, recipe.on(recipe.peer, coord), "peer.log")

        losses: dict[int, float] = {}  # step -> loss, as the status showed it along the way

        def done() -> dict | bool | None:
            if any(p.poll() is not None for _, p in machines.procs):
                return True  # something exited: fail below with its log
            s = status_from(net, "peer1", url)
            live = [p for p in (s or {}).get("peers", []) if p["live"]]
            seen = [(p["step"], p["loss"]) for p in live if p["stage"] == 0]
            seen += [(h["step"], h["loss"]) for h in (s or {}).get("history", [])]
            losses.update((st, lo) for st, lo in seen if st and lo is not None)
            ok = (len(live) == len(PEER_HOSTS)
                  and all(p["state"] == "training" and (p["step"] or 0) >= STEPS for p in live)
                  and all(p["reach"] == "direct" for p in live))
            return s if ok else None

        s = poll_until(done, 300)
        exited = [f"{h} (exit {p.returncode})" for h, p in machines.procs if p.poll() is not None]
        assert not exited, f"exited during the run: {exited}\n{machines.logs()}"
        assert isinstance(s, dict), (f"the peers did not all train to step {STEPS} with reach "
                                     f"direct:\n{status_from(net, 'peer1', url)}\n"
                                     f"{machines.logs()}")

        ids = {Identity.load(machines.dirs[h] / "shoal-peer.key").peer_id: h for h in PEER_HOSTS}
        live = [p for p in s["peers"] if p["live"]]
        assert {p["peer_id"] for p in live} == set(ids), (live, ids)
        for p in live:
            host = net.hosts[ids[p["peer_id"]]]
            assert p["address"].rpartition(":")[0] == host.address, (
                f"{host.name} is registered at {p['address']}, not at its lab address "
                f"{host.address}")
            assert p["reach"] == "direct", p
        assert sorted(p["stage"] for p in live) == list(range(len(PEER_HOSTS)))

        # the stage-0 peer's loss at the earliest step the status showed vs at the last one
        assert losses, f"the status never showed a loss: {s['history']}"
        first, last = min(losses), max(losses)
        assert first < last == STEPS, f"no loss seen before step {STEPS}: {losses}"
        assert losses[last] < losses[first], f"loss did not fall: {losses}"

        shown = machines.run("peer2", recipe.on(recipe.status, coord))
        print(shown.stdout, losses)
        assert shown.returncode == 0, f"{' '.join(recipe.status)}: {shown.stdout}{shown.stderr}"
        for p in live:  # `shoal status` lists each peer (id cut to 15 chars) with its REACH
            row = [line for line in shown.stdout.splitlines() if p["peer_id"][:15] in line]
            assert len(row) == 1 and " training " in row[0] and " direct " in row[0], (
                f"`shoal status` shows no training, direct row for {p['peer_id']}:\n"
                f"{shown.stdout}")
    finally:
        if machines is not None:
            machines.stop()
        net.destroy()
    left = [n for n in namespaces() if n.startswith(net.prefix + "-")]
    assert not left, f"the lab left namespaces behind: {left}"


# ---------------------------------------------------------------------------------------------
# The parse itself: a recipe the test cannot run as written fails with a clear message.


def test_the_readme_recipe_parses_to_the_three_commands():
    r = readme_recipe.load()
    assert isinstance(r, Recipe)
    assert [a[:2] for a in (r.token, r.coordinator, r.peer, r.status)] == [
        ["shoal", "token"], ["shoal", "coordinator"], ["shoal", "peer"], ["shoal", "status"]]
    assert r.flag(r.on(r.peer, "198.18.0.1"), "--coordinator") == f"198.18.0.1:{r.grpc_port}"


@pytest.mark.parametrize(("old", "new", "says"), [
    ("join.token   # on each", "join.token --host 0.0.0.0  # on each", "'--host'"),
    ("--token-file join.token   # serves", "--token-file join.token --plaintext  # serves",
     "'--plaintext'"),
    ("## A run on several machines", "## Elsewhere", "has no section"),
    ("```bash\nshoal token new", "```\nshoal token new", "no ```bash block"),
    ("coord.example:7000", "10.0.0.1:7000", "is not coord.example:PORT"),
])
def test_an_unexpected_recipe_fails_with_a_clear_message(old, new, says):
    text = readme_recipe.README.read_text()
    assert old in text, f"README.md no longer has {old!r}: update this test's cases"
    with pytest.raises(RecipeError, match=says.replace("(", r"\(")):
        parse(text.replace(old, new, 1))

