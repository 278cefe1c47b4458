"""Host-tier fixtures: a real sshd on 127.0.0.1 as the untrusted host."""

from tests.support.fixtures import setup, tarpit, untrusted_host  # noqa: F401  (fixtures)
