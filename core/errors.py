"""Exceptions that carry the file, line or clip they are about."""


class ConiliumError(Exception):
    """Base class of every error conilium raises on purpose."""


class CorpusError(ConiliumError):
    """A corpus file is missing or malformed; the message names file and line or clip."""


class AudioError(ConiliumError):
    """An audio file is missing, unreadable, empty or holds NaN/inf samples."""

    def __init__(self, path, reason, clip=None):
        self.path = str(path)
        self.reason = reason
        self.clip = clip
        who = f"clip {clip} ({self.path})" if clip else self.path
        super().__init__(f"{who}: {reason}")

    def __reduce__(self):  # rebuilt from its parts (it travels pickled from a worker process)
        return type(self), (self.path, self.reason, self.clip)


class CacheError(ConiliumError):
    """A feature cache is missing, incomplete, corrupt or built with other settings."""


class ConfigError(ConiliumError):
    """Incompatible options (e.g. a loss with targets it cannot use)."""


class OutputError(ConiliumError):
    """An output file or directory cannot be written: full disk, read-only file system, no
    permission, a file where a directory should be. The message names the path."""

    def __init__(self, path, reason, hint=None):
        self.path = str(path)
        self.reason = reason
        self.hint = hint
        super().__init__(f"cannot write {self.path}: {reason}" + (f"; {hint}" if hint else ""))

    def __reduce__(self):  # rebuilt from its parts (it travels pickled from a worker process)
        return type(self), (self.path, self.reason, self.hint)


class LockError(ConiliumError):
    """A directory is being written by another process (its lock file names the holder)."""


class TrainingError(ConiliumError):
    """Training cannot go on (the loss became NaN or infinite, an unusable checkpoint, an
    inconsistent resume)."""
