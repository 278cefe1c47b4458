#!/bin/bash
# The cryptsnap demo, run inside the throwaway test guest by `make demo`
# (python3 -m tests.harness demo). Everything happens in the guest: the "untrusted host"
# is a second sshd on the guest's loopback with its own unprivileged account.
set -euo pipefail
export SYSTEMD_COLORS=0 SYSTEMD_PAGER= PAGER=cat

say() { printf '\n== %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

say "Installing cryptsnap, its systemd units, bus policy and activation file"
run /src/packaging/install

say "A sample tree to back up: /srv/demo/data"
mkdir -p /srv/demo/data/docs
echo "version 1 of my notes" > /srv/demo/data/notes.txt
echo "DEMO-SECRET-MARKER never readable on the server" > /srv/demo/data/docs/secret.txt
head -c 5M /dev/urandom > /srv/demo/data/docs/photo.raw
run ls -lR /srv/demo/data

say "The untrusted host: account 'backuphost', sshd on 127.0.0.1:2222, SFTP only"
id backuphost >/dev/null 2>&1 || useradd --create-home --shell /bin/sh backuphost
usermod -p '*' backuphost
mkdir -p /etc/cryptsnap /srv/demo/sshd
[ -f /srv/demo/sshd/host_key ] || ssh-keygen -q -t ed25519 -N '' -f /srv/demo/sshd/host_key
[ -f /etc/cryptsnap/id_demo ] || ssh-keygen -q -t ed25519 -N '' -C cryptsnap-demo -f /etc/cryptsnap/id_demo
install -d -o backuphost -m 700 ~backuphost/.ssh
install -o backuphost -m 600 /etc/cryptsnap/id_demo.pub ~backuphost/.ssh/authorized_keys
cat > /srv/demo/sshd/sshd_config <<CONF
ListenAddress 127.0.0.1
Port 2222
HostKey /srv/demo/sshd/host_key
PidFile /run/demo-sshd.pid
AllowUsers backuphost
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
Subsystem sftp internal-sftp
CONF
mkdir -p /run/sshd
/usr/sbin/sshd -f /srv/demo/sshd/sshd_config
head -c 64 /dev/urandom > /etc/cryptsnap/demo.key
chmod 600 /etc/cryptsnap/demo.key

say "The configuration (see \`cryptsnap config example\` for every option)"
cat > /etc/cryptsnap/config.yaml <<CONF
targets:
  demo:
    host: 127.0.0.1
    port: 2222
    user: backuphost
    identity_file: /etc/cryptsnap/id_demo
    remote_dir: cryptsnap
    image: demo.img
    size: 300M
    filesystem: btrfs
    sources: [/srv/demo/data]
    key_file: /etc/cryptsnap/demo.key
    pbkdf: pbkdf2
    pbkdf_iterations: 1000   # the guest's CPU is emulated; use the default (argon2id) for real
CONF
run cat /etc/cryptsnap/config.yaml
run cryptsnap config check

say "cryptsnap init: pin the host key, allocate and format the encrypted image on the server"
run cryptsnap init demo | tee /srv/demo/init.out
grep '^  restrict,' /srv/demo/init.out | sed 's/^  //' > ~backuphost/.ssh/authorized_keys
echo "(the key may now only speak SFTP on the server:)"
run cat ~backuphost/.ssh/authorized_keys

say "Enable the daily timer"
run systemctl enable --now cryptsnap-backup@demo.timer
run systemctl list-timers --no-pager cryptsnap-backup@demo.timer

say "Trigger a backup over D-Bus (cryptsnapd is D-Bus activated)"
run busctl call org.cryptsnap1 /org/cryptsnap1/target/demo org.cryptsnap1.Target StartBackup 'a{sv}' 0
while [ "$(busctl get-property org.cryptsnap1 /org/cryptsnap1/target/demo org.cryptsnap1.Target State)" != 's "idle"' ]; do
  sleep 1
done
run busctl get-property org.cryptsnap1 /org/cryptsnap1/target/demo org.cryptsnap1.Target LastResult
run busctl get-property org.cryptsnap1 /org/cryptsnap1/target/demo org.cryptsnap1.Target Snapshots
run cryptsnap status

say "Change a file and back up again (the CLI asks the daemon and follows the job)"
echo "version 2 of my notes" > /srv/demo/data/notes.txt
sleep 1
run cryptsnap backup demo
run cryptsnap status demo

say "Open the read-only restore view and compare the versions"
run systemctl start cryptsnap-restore@demo.service
view=/run/cryptsnap/restore/demo/snapshots
run ls $view
first=$(ls $view | head -n1); last=$(ls $view | tail -n1)
run cat "$view/$first/srv/demo/data/notes.txt"
run cat "$view/$last/srv/demo/data/notes.txt"
run systemctl stop cryptsnap-restore@demo.service

say "Restore one file from the first snapshot with the CLI"
run cryptsnap restore "demo@$first:/srv/demo/data/notes.txt" --to /tmp/notes-restored.txt
run cat /tmp/notes-restored.txt

say "What the server holds: one opaque file"
run ls -l ~backuphost/cryptsnap/
if grep -qa DEMO-SECRET-MARKER ~backuphost/cryptsnap/demo.img; then
  echo "PLAINTEXT FOUND ON THE SERVER"; exit 1
fi
echo "grep for the secret marker in the server's image: not found (all ciphertext)"
say "Demo finished"
