"""Installing: `pip install .` into a venv, and the distribution layout of packaging/install."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_pip_install_into_a_venv_gives_both_commands(tmp_path):
    venv = tmp_path / "venv"
    # Debian's python3 with its packages (python3-pydbus, python3-gi...), as a user of the distribution has.
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-build-isolation", "--no-deps", str(REPO)],
                   check=True)  # fmt: skip
    help_text = subprocess.run([str(venv / "bin" / "cryptsnap"), "--help"], capture_output=True, text=True,
                               check=True).stdout  # fmt: skip
    assert "exit codes:" in help_text and "restore" in help_text
    module = subprocess.run([str(venv / "bin" / "python"), "-m", "cryptsnap", "--help"], capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    assert module == help_text  # python -m cryptsnap is the cryptsnap script
    daemon = subprocess.run([str(venv / "bin" / "cryptsnapd"), "--help"], capture_output=True, text=True, check=True)
    assert "org.cryptsnap1" in daemon.stdout
    xml = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "from cryptsnap.bus import interface_xml; print(len(interface_xml()))"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert int(xml.stdout) > 1000, "the D-Bus contract must ship in the package"


def test_distribution_layout(tmp_path):
    subprocess.run([str(REPO / "packaging" / "install"), str(tmp_path)], check=True)
    for path in ("usr/bin/cryptsnap", "usr/bin/cryptsnapd", "usr/lib/python3/dist-packages/cryptsnap/cli.py",
                 "usr/lib/python3/dist-packages/cryptsnap/org.cryptsnap1.xml",
                 "lib/systemd/system/cryptsnapd.service", "lib/systemd/system/cryptsnap-backup@.service",
                 "lib/systemd/system/cryptsnap-backup@.timer", "lib/systemd/system/cryptsnap-restore@.service",
                 "usr/share/dbus-1/system.d/org.cryptsnap1.conf",
                 "usr/share/dbus-1/system-services/org.cryptsnap1.service",
                 "usr/lib/sysusers.d/cryptsnap.conf", "usr/lib/tmpfiles.d/cryptsnap.conf",
                 "usr/lib/udev/rules.d/56-cryptsnap.rules", "usr/lib/modules-load.d/cryptsnap.conf",
                 "usr/share/man/man1/cryptsnap.1", "usr/share/man/man5/cryptsnap.yaml.5",
                 "usr/share/man/man8/cryptsnapd.8", "usr/share/bash-completion/completions/cryptsnap"):  # fmt: skip
        assert (tmp_path / path).is_file(), path
    assert not (tmp_path / "lib/systemd/system/org.cryptsnap1.service").exists()
    run = subprocess.run([str(tmp_path / "usr/bin/cryptsnap"), "--version"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path / "usr/lib/python3/dist-packages")})  # fmt: skip
    assert run.stdout.startswith("cryptsnap ")


def test_the_debian_package_builds_from_a_clean_copy_and_lintian_finds_nothing(tmp_path):
    """scripts/build-deb (`make deb`): dpkg-buildpackage from a copy of the tree, then lintian
    failing on any error or warning. Its contents are what packaging/install lays out, with
    the generated man pages (compressed), completion and example configuration."""
    built = subprocess.run([str(REPO / "scripts" / "build-deb"), str(tmp_path)], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    deb = Path(built.stdout.strip().splitlines()[-1])
    assert deb.name.startswith("cryptsnap_") and deb.name.endswith("_all.deb") and deb.is_file()
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    files = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    for path in ("/usr/bin/cryptsnap", "/usr/bin/cryptsnapd", "/usr/lib/python3/dist-packages/cryptsnap/cli.py",
                 "/usr/lib/python3/dist-packages/cryptsnap/org.cryptsnap1.xml",
                 "/lib/systemd/system/cryptsnapd.service", "/lib/systemd/system/cryptsnap-backup@.timer",
                 "/lib/systemd/system/cryptsnap-restore@.service", "/lib/systemd/system/cryptsnap-failed@.service",
                 "/lib/systemd/system/cryptsnap-check@.service", "/lib/systemd/system/cryptsnap-check@.timer",
                 "/usr/share/dbus-1/system.d/org.cryptsnap1.conf",
                 "/usr/share/dbus-1/system-services/org.cryptsnap1.service", "/usr/lib/sysusers.d/cryptsnap.conf",
                 "/usr/lib/tmpfiles.d/cryptsnap.conf", "/usr/lib/udev/rules.d/56-cryptsnap.rules",
                 "/usr/lib/modules-load.d/cryptsnap.conf", "/usr/share/man/man1/cryptsnap.1.gz",
                 "/usr/share/man/man5/cryptsnap.yaml.5.gz", "/usr/share/man/man8/cryptsnapd.8.gz",
                 "/usr/share/bash-completion/completions/cryptsnap",
                 "/usr/share/doc/cryptsnap/examples/config.yaml"):  # fmt: skip
        assert path in files, f"{path} is not in the package"
    control = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True).stdout
    for tool in ("cryptsetup-bin", "sshfs", "fuse3", "rsync", "btrfs-progs", "e2fsprogs", "openssh-client",
                 "python3-pydbus", "python3-gi", "python3-sdnotify", "python3-yaml", "python3-psutil"):  # fmt: skip
        assert tool in control, f"the package does not depend on {tool}"
    scripts = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(scripts)], check=True)
    postinst = (scripts / "postinst").read_text()
    assert "systemd-sysusers" in postinst and "systemd-tmpfiles" in postinst
    assert "deb-systemd-invoke start" not in postinst and "deb-systemd-invoke restart" not in postinst  # never on upgrade
    # Never enabled by the package (dh_installsystemd --no-enable): `enable` runs only for a
    # unit an admin had enabled before (debian-installed), never on a first installation.
    assert "if deb-systemd-helper debian-installed 'cryptsnapd.service'" in postinst
    postrm = (scripts / "postrm").read_text()
    assert "groupdel cryptsnap" in postrm and 'CRYPTSNAP_PURGE_STATE:-}" = yes' in postrm
