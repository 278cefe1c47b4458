"""Load and validate the YAML configuration against the schema, reporting every error at once.

Errors name the file, the line and the key path, and say what would be valid:
``config.yaml:14: targets.home.size: "40 GB" is not a size; use e.g. 40G``.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import schema
from .errors import ConfigError, NoSuchTarget
from .schema import Option

DEFAULT_PATH = "/etc/cryptsnap/config.yaml"
TARGET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
SIZE = re.compile(r"^([0-9]+)([KMGT]?)$")
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class Retention:
    last: int
    daily: int
    weekly: int
    monthly: int
    make_room: bool = False


@dataclass(frozen=True)
class Hooks:
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    on_error: tuple[str, ...] = ()
    timeout: int = 600


@dataclass(frozen=True)
class Target:
    name: str
    host: str
    port: int
    user: str
    identity_file: str
    alive_interval: int
    alive_count: int
    require_fsync: bool
    remote_dir: str
    image: str
    size: int
    sparse: bool
    filesystem: str
    metadata_cache: bool
    sources: tuple[str, ...]
    excludes: tuple[str, ...]
    one_file_system: bool
    key_file: str | None
    key_credential: str | None
    pbkdf: str
    pbkdf_iterations: int | None
    retention: Retention
    state_dir: Path  # this target's own directory under the global state_dir
    runtime_dir: Path  # this target's own directory under the global runtime_dir
    hooks: Hooks = Hooks()
    upload_limit: int = 0  # KiB/s, 0: none
    free_space_warning: int = 10  # percent
    check_budget: int = 1  # percent of the image a check may download
    skip_unchanged: bool = False
    skip_on_battery: bool = True
    skip_on_metered: bool = True
    download_limit: int = 0
    reconnect_tries: int = 3
    reconnect_delay: int = 60  # seconds, doubled after each try
    notify_desktop: bool = False
    history: str = "snapshots"  # how `cryptsnap init` makes the image keep earlier states


@dataclass(frozen=True)
class Config:
    path: str
    state_dir: Path
    runtime_dir: Path
    targets: dict[str, Target]
    metrics_file: str = ""

    def target(self, name: str) -> Target:
        if name not in self.targets:
            raise NoSuchTarget(name, sorted(self.targets))
        return self.targets[name]


def config_path(explicit: str | None = None) -> str:
    """--config, else $CRYPTSNAP_CONFIG, else /etc/cryptsnap/config.yaml."""
    return explicit or os.environ.get("CRYPTSNAP_CONFIG") or DEFAULT_PATH


def parse_size(text: str) -> int | None:
    match = SIZE.match(text.strip())
    return int(match.group(1)) * SIZE_UNITS[match.group(2)] if match else None


class _Validator:
    def __init__(self, filename: str, loader: yaml.SafeLoader):
        self.filename = filename
        self.loader = loader
        self.problems: list[str] = []

    def error(self, node: yaml.Node | None, key: str, message: str) -> None:
        line = f"{node.start_mark.line + 1}" if node is not None else "1"
        where = f"{key}: " if key else ""
        self.problems.append(f"{self.filename}:{line}: {where}{message}")

    def section(self, node: yaml.Node | None, options: dict[str, Option], path: str) -> dict[str, Any]:
        """Validate a mapping against options; return the values, defaults filled in."""
        values: dict[str, Any] = {}
        seen: dict[str, yaml.Node] = {}
        if node is not None and not isinstance(node, yaml.MappingNode):
            self.error(node, path, "must be a mapping of keys to values")
            node = None
        for key_node, value_node in node.value if node is not None else []:
            key = str(key_node.value)
            where = f"{path}.{key}" if path else key
            if key in seen:
                self.error(key_node, where, f"given twice (first on line {seen[key].start_mark.line + 1})")
                continue
            seen[key] = key_node
            if key not in options:
                close = difflib.get_close_matches(key, options, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                self.error(key_node, where, f"unknown option; {hint}valid here: {', '.join(sorted(options))}")
                continue
            values[key] = self.value(value_node, options[key], where)
        for key, option in options.items():
            if key in seen:
                continue
            where = f"{path}.{key}" if path else key
            if option.required:
                self.error(node, where, f"is required ({option.description})")
                values[key] = {} if option.type == "named" else None
            elif option.type == "section":
                values[key] = self.section(None, option.children, where)
            else:
                values[key] = option.default
        return values

    def value(self, node: yaml.Node, option: Option, where: str) -> Any:
        if option.type == "section":
            return self.section(node, option.children, where)
        if option.type == "named":
            return self.named(node, option, where)
        if option.type in ("paths", "strings"):
            if not isinstance(node, yaml.SequenceNode):
                self.error(node, where, "must be a list, e.g. [/etc, /home]")
                return []
            items = []
            for item in node.value:
                value = self.scalar(item)
                if not isinstance(value, str) or not value:
                    self.error(item, where, f"{_show(value)} is not a string")
                elif option.type == "paths" and not value.startswith("/"):
                    self.error(item, where, f"{_show(value)} is not an absolute path; write it as /{value}")
                else:
                    items.append(value)
            return items
        if not isinstance(node, yaml.ScalarNode):
            self.error(node, where, f"must be a single value ({option.type}), not a list or mapping")
            return None
        value = self.scalar(node)
        if value is None and not option.required and option.default is None:
            return None
        return self.typed(node, option, where, value)

    def named(self, node: yaml.Node, option: Option, where: str) -> dict[str, tuple[yaml.Node, yaml.Node, dict]]:
        """A mapping of names to sections: each valid name -> (its node, its section's node, its values)."""
        if not isinstance(node, yaml.MappingNode) or not node.value:
            self.error(node, where, "needs at least one entry, e.g. `home:` with its options below")
            return {}
        named = {}
        for key_node, value_node in node.value:
            name = str(key_node.value)
            if not TARGET_NAME.match(name):
                self.error(key_node, f"{where}.{name}",
                           "is not a valid name; use lower-case letters, digits, - and _ (at most 32)")
            elif name in named:
                self.error(key_node, f"{where}.{name}", "given twice")
            else:
                named[name] = (key_node, value_node, self.section(value_node, option.children, f"{where}.{name}"))
        return named

    def typed(self, node: yaml.Node, option: Option, where: str, value: Any) -> Any:
        kind = option.type
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                self.error(node, where, f"{_show(value)} is not a whole number")
                return None
            if option.minimum is not None and value < option.minimum:
                self.error(node, where, f"{value} is too small; the minimum is {option.minimum}")
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                self.error(node, where, f"{_show(value)} is not true or false")
            return value
        if kind == "size":
            size = parse_size(str(value)) if isinstance(value, int | str) and not isinstance(value, bool) else None
            if not size:
                self.error(node, where, f"{_show(value)} is not a size; use e.g. 40G (units K, M, G, T)")
            return size
        if kind == "choice":
            if value not in option.choices:
                self.error(node, where, f"{_show(value)} is not one of: {', '.join(option.choices)}")
            return value
        if not isinstance(value, str) or not value:
            self.error(node, where, f"{_show(value)} is not a string")
            return None
        if kind == "path" and not value.startswith("/"):
            self.error(node, where, f"{_show(value)} is not an absolute path")
        return value

    def scalar(self, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return node
        return self.loader.construct_object(node)


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, yaml.Node):
        return "a list or mapping"
    return "empty" if value is None else repr(value)


def parse(text: str, filename: str) -> Config:
    """Validate the text of a config file; raise ConfigError listing every problem."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise ConfigError([f"{filename}:{line}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    finally:
        loader.dispose()
    check = _Validator(filename, loader)
    top = check.section(root, schema.TOP, "")
    targets: dict[str, Target] = {}
    for name, (node, section, values) in top["targets"].items():
        where = f"targets.{name}"
        if values.get("key_file") is None and values.get("key_credential") is None:
            check.error(node, where, "needs key_file or key_credential (where the LUKS key is)")
        elif values.get("key_file") is not None and values.get("key_credential") is not None:
            check.error(node, where, "set only one of key_file and key_credential")
        if isinstance(values.get("image"), str) and "/" in values["image"]:
            check.error(node, f"{where}.image", "is a file name, not a path; put the directory in remote_dir")
        if values.get("history") == "layers":
            _check_layers(check, section, where, values)
        if check.problems:
            continue
        values = dict(values)
        targets[name] = Target(
            name=name,
            sources=tuple(values.pop("sources")),
            excludes=tuple(values.pop("excludes")),
            retention=Retention(**values.pop("retention")),
            hooks=Hooks(**{key: tuple(v) if isinstance(v, list) else v for key, v in values.pop("hooks").items()}),
            state_dir=Path(top["state_dir"]) / name,
            runtime_dir=Path(top["runtime_dir"]) / name,
            **values,
        )
    if check.problems:
        raise ConfigError(check.problems)
    return Config(path=filename, state_dir=Path(top["state_dir"]), runtime_dir=Path(top["runtime_dir"]),
                  targets=targets, metrics_file=top["metrics_file"])


MAX_STATES = 499  # overlayfs stacks 500 lower layers at most (cryptsnap.overlay); a run's own is one more


def _check_layers(check: _Validator, node: yaml.Node, where: str, values: dict[str, Any]) -> None:
    if values.get("filesystem") != "btrfs":
        check.error(_value_node(node, "history"), f"{where}.history",
                    f"layers need filesystem: btrfs (not {values.get('filesystem')})")  # fmt: skip
    rules = values.get("retention")
    if isinstance(rules, dict):
        kept = 1 + sum(rules.get(key) or 0 for key in ("last", "daily", "weekly", "monthly"))
        if kept > MAX_STATES:
            check.error(_value_node(node, "retention"), f"{where}.retention",
                        f"keeps up to {kept} states; with history: layers at most {MAX_STATES} (overlayfs "
                        f"stacks 500 layers): lower last, daily, weekly or monthly")  # fmt: skip


def _value_node(mapping: yaml.Node, key: str) -> yaml.Node:
    """The node of KEY's value in MAPPING (for its line), else the mapping's."""
    for key_node, value_node in getattr(mapping, "value", []):
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return value_node
    return mapping


def load(path: str | None = None) -> Config:
    filename = config_path(path)
    try:
        text = Path(filename).read_text()
    except OSError as exc:
        raise ConfigError([f"{filename}: cannot read the configuration: {exc.strerror}; "
                           f"`cryptsnap config example` prints a commented one to start from"]) from None
    return parse(text, filename)


def example() -> str:
    """A commented example configuration, generated from the schema."""
    lines = ["# cryptsnap configuration (/etc/cryptsnap/config.yaml). Generated by `cryptsnap config example`.", ""]
    _example_section(schema.TOP, lines, 0)
    return "\n".join(lines) + "\n"


def _example_section(options: dict[str, Option], lines: list[str], depth: int) -> None:
    pad = "  " * depth
    for key, option in options.items():
        lines.append(f"{pad}# {option.description}")
        if option.type == "choice":
            lines.append(f"{pad}# One of: {', '.join(option.choices)}.")
        if option.type == "named":
            lines.append(f"{pad}{key}:")
            lines.append(f"{pad}  home:")
            _example_section(option.children, lines, depth + 2)
            continue
        if option.type == "section":
            lines.append(f"{pad}{key}:")
            _example_section(option.children, lines, depth + 1)
            continue
        value = option.example if option.example is not None else option.default
        commented = "# " if not option.required and option.example is None and option.default is None else ""
        if option.required:
            lines[-1] += " (required)"
        rendered = yaml.safe_dump({key: value}, default_flow_style=True, width=1000).strip()[1:-1]
        lines.append(f"{pad}{commented}{rendered}")
