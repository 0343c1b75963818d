"""The README's several-machines recipe, read out of README.md at run time.

tests/lab/test_readme_recipe.py runs exactly these commands, so the recipe a user copies is the
one that is tested: if someone edits the lines in README.md, the test runs the edited lines. The
parse is strict: a missing section or block, a command the test does not know how to run, or a
flag it does not expect is a failure with a message that says which line and what to do, never a
silent skip of part of the recipe.

What is read (README.md, section "## A run on several machines"):
- the first ```bash block: `shoal token new FILE`, `shoal coordinator --config F --token-file T`
  and `shoal peer --coordinator coord.example:PORT --token-file T`, each on its own line, with
  `# ...` comments stripped;
- the first `shoal status ...` in backticks in the same section (how a user watches the run).

The only substitution is PLACEHOLDER (`coord.example`) by the coordinator host's address.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## A run on several machines"
PLACEHOLDER = "coord.example"
# the flags each command may carry (name -> takes a value); anything else fails the parse
EXPECTED = {
    "token": {},
    "coordinator": {"--config": True, "--token-file": True},
    "peer": {"--coordinator": True, "--token-file": True},
    "status": {"--coordinator-http": True},
}


class RecipeError(AssertionError):
    """README.md's recipe is missing or holds something this test does not run."""


@dataclass(frozen=True)
class Recipe:
    token: list[str]  # `shoal token new join.token`
    coordinator: list[str]
    peer: list[str]
    status: list[str]

    def on(self, argv: list[str], address: str) -> list[str]:
        """`argv` with PLACEHOLDER replaced by `address` (the coordinator host's)."""
        return [a.replace(PLACEHOLDER, address) for a in argv]

    def flag(self, argv: list[str], name: str) -> str:
        return argv[argv.index(name) + 1]

    @property
    def token_file(self) -> str:
        return self.token[3]

    @property
    def config_file(self) -> str:
        return self.flag(self.coordinator, "--config")

    @property
    def grpc_port(self) -> int:
        return _port(self.flag(self.peer, "--coordinator"), "shoal peer --coordinator")

    @property
    def http_port(self) -> int:
        return _port(self.flag(self.status, "--coordinator-http"),
                     "shoal status --coordinator-http")


def _port(value: str, what: str) -> int:
    host, _, port = value.rpartition(":")
    if host != PLACEHOLDER or not port.isdigit():
        raise RecipeError(f"README.md: `{what} {value}` is not {PLACEHOLDER}:PORT; the test "
                          f"substitutes only {PLACEHOLDER} by the coordinator host's address")
    return int(port)


def section(text: str) -> str:
    start = text.find(SECTION + "\n")
    if start < 0:
        raise RecipeError(f"README.md has no section {SECTION!r}: the test of the README's "
                          "several-machines recipe cannot find the recipe (renamed? update "
                          "tests/lab/readme_recipe.py SECTION)")
    rest = text[start + len(SECTION) + 1:]
    end = re.search(r"^## ", rest, re.MULTILINE)
    return rest[:end.start()] if end else rest


def _check_flags(kind: str, argv: list[str], line: str) -> None:
    allowed = EXPECTED[kind]
    i = 2 if kind != "token" else 4
    if kind == "token" and (len(argv) != 4 or argv[2] != "new"):
        raise RecipeError(f"README.md {SECTION}: `{line}` is not `shoal token new FILE`")
    seen = set()
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name not in allowed:
            raise RecipeError(
                f"README.md {SECTION}: `{line}` has {a!r}, which this test does not expect to "
                f"run (it runs {', '.join(allowed) or 'no flags'} for `shoal {kind}`): if the "
                "recipe really needs it, teach tests/lab/readme_recipe.py EXPECTED about it")
        if "=" in a:
            argv[i:i + 1] = a.split("=", 1)  # --flag=value -> --flag value
        if i + 1 >= len(argv):
            raise RecipeError(f"README.md {SECTION}: `{line}`: {name} has no value")
        seen.add(name)
        i += 2
    missing = set(allowed) - seen
    if missing:
        raise RecipeError(f"README.md {SECTION}: `{line}` lacks {', '.join(sorted(missing))}, "
                          "which this test needs to know where things are")


def parse(text: str) -> Recipe:
    """The Recipe in README.md's text (raises RecipeError, with what is wrong)."""
    body = section(text)
    block = re.search(r"^```bash\n(.*?)^```", body, re.MULTILINE | re.DOTALL)
    if block is None:
        raise RecipeError(f"README.md {SECTION}: no ```bash block with the recipe")
    found: dict[str, list[str]] = {}
    for line in block.group(1).splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        kind = argv[1] if len(argv) > 1 and argv[0] == "shoal" else ""
        if kind not in ("token", "coordinator", "peer"):
            raise RecipeError(f"README.md {SECTION}: the recipe's line `{line.strip()}` is not "
                              "a `shoal token|coordinator|peer` command this test knows to run")
        if kind in found:
            raise RecipeError(f"README.md {SECTION}: two `shoal {kind}` lines in the recipe")
        _check_flags(kind, argv, line.split("#")[0].strip())
        found[kind] = argv
    missing = [k for k in ("token", "coordinator", "peer") if k not in found]
    if missing:
        raise RecipeError(f"README.md {SECTION}: the recipe has no `shoal {missing[0]}` line")
    status = re.search(r"`(shoal status [^`]*)`", body)
    if status is None:
        raise RecipeError(f"README.md {SECTION}: no `shoal status ...` to watch the run with")
    status_argv = shlex.split(status.group(1))
    _check_flags("status", status_argv, status.group(1))
    recipe = Recipe(found["token"], found["coordinator"], found["peer"], status_argv)
    peer_token = recipe.flag(recipe.peer, "--token-file")
    coord_token = recipe.flag(recipe.coordinator, "--token-file")
    if not recipe.token_file == coord_token == peer_token:
        raise RecipeError(f"README.md {SECTION}: the token file differs between the lines "
                          f"({recipe.token_file}, {coord_token}, {peer_token})")
    for name in (recipe.token_file, recipe.config_file):
        if "/" in name or name.startswith("."):
            raise RecipeError(f"README.md {SECTION}: {name!r} is not a plain file name in the "
                              "directory the command runs in")
    recipe.grpc_port, recipe.http_port  # noqa: B018 (both must be coord.example:PORT)
    return recipe


def load() -> Recipe:
    return parse(README.read_text())
