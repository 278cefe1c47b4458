"""cryptsnap: encrypted, incremental snapshot backups to a host you do not trust."""

__version__ = "0.1.0"
