"""One source of truth: the schema's dataclasses hold every default of the plain sections; a
YAML file sets only what differs. A value that merely repeats a default fails here unless its
comment says `pinned` (the paper's experiments pin their protocol on purpose)."""

import dataclasses
import re
from pathlib import Path

import yaml

from icm_lab.config.schema import SECTIONS, Config

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_]\w*):(?P<value>[^#]*?)\s*"
                  r"(?:#(?P<comment>.*))?$")
TOP = {f.name: f.default for f in dataclasses.fields(Config)
       if f.default is not dataclasses.MISSING}
TOP |= {f.name: f.default_factory() for f in dataclasses.fields(Config)
        if f.default_factory is not dataclasses.MISSING and f.name not in SECTIONS}


def defaults(section: str) -> dict:
    found = {}
    for f in dataclasses.fields(SECTIONS[section]):
        if f.default is not dataclasses.MISSING:
            found[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            found[f.name] = f.default_factory()
    return found


def settings(path: Path, package: list[str]):
    """(dotted key, value, comment, line number) of every scalar set in a YAML file, read line
    by line (comments are what mark a pinned value)."""
    stack: list[tuple[int, str]] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = LINE.match(line)
        if not match or line.lstrip().startswith("-"):
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        if match["value"].strip():
            try:
                value = yaml.safe_load(match["value"])
            except yaml.YAMLError:  # a flow list continued on the next lines: no default
                continue
            yield [*package, *(key for _, key in stack)], value, match["comment"] or "", number


def package_of(path: Path) -> list[str]:
    relative = path.relative_to(ROOT / "conf")
    if len(relative.parts) == 1 or "@package _global_" in path.read_text():
        return []
    return [relative.parts[0]]  # a group file: its keys sit under the group's name


def repeated_defaults(path: Path, package: list[str]) -> list[str]:
    found = []
    for keys, value, comment, number in settings(path, package):
        if keys[0] == "defaults" or "pinned" in comment:
            continue
        if len(keys) == 1 and keys[0] in TOP:
            default = TOP[keys[0]]
        elif len(keys) == 2 and keys[0] in SECTIONS and keys[1] in defaults(keys[0]):
            default = defaults(keys[0])[keys[1]]
        else:
            continue
        if value == default:
            where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
            found.append(f"{where}:{number}: {'.'.join(keys)}={value!r}")
    return found


def test_no_yaml_value_repeats_a_schema_default():
    files = sorted((ROOT / "conf").rglob("*.yaml")) + sorted((ROOT / "sweeps").glob("*.yaml"))
    found = [hit for path in files
             for hit in repeated_defaults(path, package_of(path) if "conf" in path.parts
                                          else [])]
    assert found == [], "\n".join(found)


def test_the_check_finds_a_repeated_default(tmp_path):
    conf = tmp_path / "steer.yaml"
    conf.write_text("alpha: 16.0  # the default\nunits: sigma  # pinned: on purpose\nstart: 0.5\n")
    assert repeated_defaults(conf, ["steer"]) == ["steer.yaml:1: steer.alpha=16.0"]
