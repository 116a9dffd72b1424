"""The error tree of the deployable processes: one root, ``NodesError``.

The command line catches this root (with ``FedPruneError`` and ``SecAggError``,
the roots of the packages below) and prints one line. Each class says whose
mistake it is; a traceback is left for bugs.

    NodesError
    ├── NodeConfigError     a server configuration value is missing, malformed or unsafe
    ├── NodeUsageError      a command-line combination that cannot work
    ├── IdentityError       an identity key, certificate or client id is unusable
    ├── OutputPathError     an output path cannot be written
    ├── AuditError          an audit directory cannot be read
    ├── DemoError           a demo setting that cannot work
    ├── ClientFailed        the federation failed from a client's point of view
    ├── FederationAborted   the server cannot complete a round; nothing is written
    └── ProtocolViolation   a client's message breaks the wire protocol (rejected, counted)

Secure aggregation failures stay ``secagg.errors.SecAggError``: a message that
secagg refuses is a SecAgg error; one the coordinator refuses (a plain-mode
chunk off the grid, a message of the wrong kind) is a ``ProtocolViolation``.
"""


class NodesError(Exception):
    """Base class: a user-facing problem of a server, client or tool process (not a bug)."""


class NodeConfigError(NodesError):
    """A configuration value is missing, malformed or unsafe."""


class NodeUsageError(NodesError):
    """A command-line combination that cannot work."""


class IdentityError(NodesError):
    """An identity key or certificate file is missing or malformed, or a client id is unsafe."""


class OutputPathError(NodesError):
    """An output path cannot be written."""


class AuditError(NodesError):
    """The audit directory cannot be read: missing, not text, or malformed metadata."""


class DemoError(NodesError):
    """A demo setting that cannot work (the command line prints it as one line)."""


class ClientFailed(NodesError):
    """The federation failed from this client's point of view (one line for the user)."""


class FederationAborted(NodesError):
    """The round cannot complete (too few survivors, protocol failure); nothing is written."""


class ProtocolViolation(NodesError):
    """A client's message breaks the wire protocol: wrong kind, off-grid, duplicate or incomplete."""
