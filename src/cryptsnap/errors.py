"""Named errors. Each carries its message and the exit code the CLI returns for it.

The D-Bus layer maps the same classes to named bus errors (see dbus_errors in daemon).
"""

from __future__ import annotations


class CryptsnapError(Exception):
    """Base class: an expected failure with a message for the user."""

    exit_code = 1
    dbus_name = "org.cryptsnap1.Error.Failed"


class UsageError(CryptsnapError):
    """The command line asks for something that cannot be done as asked."""

    exit_code = 2


class ConfigError(CryptsnapError):
    """The configuration is invalid; the message lists every problem with file:line: key."""

    exit_code = 3

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class NoSuchTarget(ConfigError):
    dbus_name = "org.cryptsnap1.Error.NoSuchTarget"

    def __init__(self, name: str, known: list[str]):
        choices = ", ".join(known) or "none configured"
        super().__init__([f"no target named {name!r} (configured: {choices})"])


class Busy(CryptsnapError):
    """Another run, mount or restore view holds the target's lock."""

    exit_code = 4
    dbus_name = "org.cryptsnap1.Error.Busy"


class RemoteUnreachable(CryptsnapError):
    """The ssh host did not answer, refused the login, or the remote directory is missing."""

    exit_code = 5


class ConnectionLost(RemoteUnreachable):
    """The ssh connection to the server broke during the run (server gone, network cut)."""


class KeyWrong(CryptsnapError):
    """The LUKS key does not open the image, or cannot be read."""

    exit_code = 6


class IntegrityError(CryptsnapError):
    """The remote side does not hold what we left there: changed host key, header, rollback."""

    exit_code = 7


class ToolFailed(CryptsnapError):
    """An external tool failed; the message names the step, the command and its error text."""

    exit_code = 8

    def __init__(self, message: str, argv: tuple[str, ...] = (), returncode: int | None = None, stderr: str = ""):
        super().__init__(message)
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


class ImageFull(CryptsnapError):
    """The file system inside the image has no room for the snapshot; the message has the numbers."""

    exit_code = 12


class ServerFull(CryptsnapError):
    """The server's file system has no room for the image `init` would make; the message has the numbers."""

    exit_code = 12


class UnsafeServer(CryptsnapError):
    """The server's SFTP lacks what cryptsnap needs to keep snapshots safe (fsync@openssh.com)."""

    exit_code = 13


class HookFailed(CryptsnapError):
    """A target's `before` hook failed or timed out: the run was skipped."""

    exit_code = 14


class SourceMissing(CryptsnapError):
    """A path in the target's sources does not exist: the run was skipped (scan.check_sources)."""

    exit_code = 15


class MissingTool(ToolFailed):
    """A program cryptsnap needs is not installed; the message names the Debian package."""

    def __init__(self, program: str, package: str):
        super().__init__(f"{program} is not installed; install it with: apt-get install {package}")
        self.program = program
        self.package = package


class AccessDenied(CryptsnapError):
    """The caller may not start or cancel jobs: only root and the group `cryptsnap` may."""

    exit_code = 10
    dbus_name = "org.cryptsnap1.Error.AccessDenied"


class Canceled(CryptsnapError):
    """The run was canceled (signal or D-Bus Cancel); everything opened was unwound."""

    exit_code = 9


def canceled(exc: BaseException) -> bool:
    """Whether a failure is a cancel (Ctrl-C, SIGTERM, D-Bus Cancel), itself or as a step's cause."""
    return isinstance(exc, KeyboardInterrupt | Canceled) or isinstance(getattr(exc, "cause", None), Canceled)


class Interrupted(CryptsnapError):
    """The run did not finish: cryptsnapd or the job's process was killed, or the machine stopped.

    Whatever the run had opened is unwound by whoever finds it (cryptsnapd at once, or the
    next run); the image keeps every complete snapshot.
    """

    exit_code = 11
    dbus_name = "org.cryptsnap1.Error.Interrupted"


class StepFailed(CryptsnapError):
    """Wraps any error with the pipeline step it happened in, keeping the original's exit code."""

    def __init__(self, step: str, cause: CryptsnapError):
        super().__init__(f"{step}: {cause}")
        self.step = step
        self.cause = cause
        self.exit_code = cause.exit_code
        self.dbus_name = cause.dbus_name


EXIT_CODES = {
    0: "success",
    1: "unexpected error (a bug: please report it with the log)",
    UsageError.exit_code: "usage error (bad command line)",
    ConfigError.exit_code: "configuration error (or unknown target)",
    Busy.exit_code: "target busy: another backup, mount or restore holds its lock",
    RemoteUnreachable.exit_code: "remote unreachable: ssh/sshfs could not connect or log in, or the connection was "
    "lost during the run",
    KeyWrong.exit_code: "key wrong: the LUKS key is missing or does not open the image",
    IntegrityError.exit_code: "integrity problem: host key, LUKS header, generation or data checksums do not match",
    ToolFailed.exit_code: "tool failure: an external program failed or is missing",
    Canceled.exit_code: "canceled",
    AccessDenied.exit_code: "permission denied (starting and canceling need root or the group cryptsnap)",
    ImageFull.exit_code: "no room: the snapshot did not fit in the image (prune, exclude or grow the image), or, "
    "at init, the server has no room for the image",
    UnsafeServer.exit_code: "unsafe server: its SFTP cannot fsync (see require_fsync in the configuration)",
    Interrupted.exit_code: "interrupted: cryptsnapd or the run's process was killed, or the machine stopped "
    "(what the run opened is unwound; see `cryptsnap status`)",
    HookFailed.exit_code: "before hook failed: the target's hooks.before command failed or timed out, so the run "
    "was skipped",
    SourceMissing.exit_code: "source missing: a path in the target's sources does not exist (a disk not mounted?), "
    "so the run was skipped",
}
