"""Config validation: every error names file, line and key and says what would be valid."""

from __future__ import annotations

import textwrap

import pytest

from cryptsnap import config, schema
from cryptsnap.errors import ConfigError, NoSuchTarget

GOOD = textwrap.dedent(
    """\
    targets:
      home:
        host: backup.example.org
        user: backup
        identity_file: /etc/cryptsnap/id_ed25519
        size: 40G
        sources: [/etc, /home]
        key_file: /etc/cryptsnap/home.key
    """
)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as failure:
        config.parse(textwrap.dedent(text), "config.yaml")
    return failure.value.problems


def test_a_minimal_config_gets_the_documented_defaults():
    cfg = config.parse(GOOD, "config.yaml")
    home = cfg.target("home")
    assert home.port == 22 and home.filesystem == "btrfs" and home.one_file_system is True
    assert home.size == 40 * 2**30 and home.sources == ("/etc", "/home")
    assert home.retention == config.Retention(last=10, daily=7, weekly=4, monthly=6)
    assert str(home.state_dir) == "/var/lib/cryptsnap/home" and str(home.runtime_dir) == "/run/cryptsnap/home"


def test_bad_size_names_file_line_and_key_and_says_what_is_valid():
    text = GOOD.replace("size: 40G", 'size: "40 GB"')
    assert problems(text) == ['config.yaml:6: targets.home.size: "40 GB" is not a size; use e.g. 40G (units K, M, G, T)']


def test_every_error_is_reported_at_once():
    found = problems(
        """\
        targets:
          home:
            host: h
            user: u
            identity_file: id_ed25519
            size: 40 GB
            sources: [etc]
            filesytem: btrfs
            port: twenty-two
            one_file_system: maybe
            key_file: /k
            key_credential: c
            retention: {last: -1, yearly: 3}
          "Bad Name": {}
        """
    )
    assert found == [
        'config.yaml:5: targets.home.identity_file: "id_ed25519" is not an absolute path',
        'config.yaml:6: targets.home.size: "40 GB" is not a size; use e.g. 40G (units K, M, G, T)',
        'config.yaml:7: targets.home.sources: "etc" is not an absolute path; write it as /etc',
        "config.yaml:8: targets.home.filesytem: unknown option; did you mean filesystem? valid here: "
        + ", ".join(sorted(schema.TARGET)),
        'config.yaml:9: targets.home.port: "twenty-two" is not a whole number',
        'config.yaml:10: targets.home.one_file_system: "maybe" is not true or false',
        "config.yaml:13: targets.home.retention.last: -1 is too small; the minimum is 0",
        "config.yaml:13: targets.home.retention.yearly: unknown option; valid here: daily, last, make_room, monthly, weekly",
        "config.yaml:14: targets.Bad Name: is not a valid name; use lower-case letters, digits, - and _ (at most 32)",
        "config.yaml:2: targets.home: set only one of key_file and key_credential",
    ]


def test_missing_required_options_and_key():
    found = problems("targets:\n  home:\n    host: h\n")
    assert "config.yaml:3: targets.home.user: is required" in found[0]
    assert any("targets.home.size: is required" in p for p in found)
    assert found[-1] == "config.yaml:2: targets.home: needs key_file or key_credential (where the LUKS key is)"


def test_unknown_top_level_key_and_duplicate_key():
    found = problems(GOOD + "statedir: /x\n")
    assert found == ["config.yaml:9: statedir: unknown option; did you mean state_dir? valid here: "
                     "metrics_file, runtime_dir, state_dir, targets"]
    found = problems(GOOD.replace("    user: backup\n", "    user: backup\n    user: other\n"))
    assert found == ["config.yaml:5: targets.home.user: given twice (first on line 4)"]


def test_wrong_shapes_and_yaml_errors():
    assert problems("targets: [a, b]\n") == [
        "config.yaml:1: targets: needs at least one entry, e.g. `home:` with its options below"
    ]
    assert problems(GOOD.replace("sources: [/etc, /home]", "sources: /etc")) == [
        "config.yaml:7: targets.home.sources: must be a list, e.g. [/etc, /home]"
    ]
    assert problems(GOOD.replace("filesystem", "x") + "    filesystem: zfs\n") == [
        'config.yaml:9: targets.home.filesystem: "zfs" is not one of: btrfs, ext2, ext4'
    ]
    assert problems("targets: {home: [\n")[0].startswith("config.yaml:2: not valid YAML:")
    assert problems(GOOD.replace("size: 40G", "size: 40G\n    image: sub/dir.img")) == [
        "config.yaml:2: targets.home.image: is a file name, not a path; put the directory in remote_dir"
    ]


def test_unreadable_file_says_how_to_start(tmp_path):
    with pytest.raises(ConfigError) as failure:
        config.load(str(tmp_path / "missing.yaml"))
    assert "cannot read the configuration" in str(failure.value) and "config example" in str(failure.value)


def test_config_path_precedence(monkeypatch):
    monkeypatch.delenv("CRYPTSNAP_CONFIG", raising=False)
    assert config.config_path(None) == "/etc/cryptsnap/config.yaml"
    monkeypatch.setenv("CRYPTSNAP_CONFIG", "/env.yaml")
    assert config.config_path(None) == "/env.yaml"
    assert config.config_path("/flag.yaml") == "/flag.yaml"


def test_unknown_target_lists_the_configured_ones():
    with pytest.raises(NoSuchTarget, match=r"no target named 'hom' \(configured: home\)"):
        config.parse(GOOD, "c.yaml").target("hom")


def test_the_generated_example_is_valid_and_documents_every_option():
    text = config.example()
    cfg = config.parse(text, "example.yaml")
    assert list(cfg.targets) == ["home"]
    for options in (schema.TOP, schema.TARGET, schema.RETENTION):
        for key, option in options.items():
            assert f"{key}:" in text
            assert option.description in text


def test_docs_list_every_option():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    for options in (schema.TOP, schema.TARGET, schema.RETENTION):
        for key in options:
            assert f"`{key}`" in doc, f"docs/configuration.md does not describe {key}"


@pytest.mark.parametrize("text,size", [("512", 512), ("4K", 4096), ("40G", 40 * 2**30), ("1T", 2**40)])
def test_sizes(text, size):
    assert config.parse_size(text) == size


@pytest.mark.parametrize("text", ["40 GB", "40g", "-1G", "1.5G", ""])
def test_not_sizes(text):
    assert config.parse_size(text) is None


def test_layered_history_needs_btrfs_and_a_retention_under_overlayfs_limit():
    assert config.parse(GOOD, "config.yaml").target("home").history == "snapshots"
    layered = config.parse(GOOD + "    history: layers\n", "config.yaml").target("home")
    assert layered.history == "layers"
    assert problems(GOOD + "    history: layers\n    filesystem: ext4\n") == [
        "config.yaml:9: targets.home.history: layers need filesystem: btrfs (not ext4)"]
    assert problems(GOOD + "    history: layers\n    retention:\n      last: 480\n      daily: 30\n") == [
        "config.yaml:11: targets.home.retention: keeps up to 521 states; with history: layers at most 499 "
        "(overlayfs stacks 500 layers): lower last, daily, weekly or monthly"]
    assert problems(GOOD + "    history: overlay\n") == [
        'config.yaml:9: targets.home.history: "overlay" is not one of: snapshots, layers']
