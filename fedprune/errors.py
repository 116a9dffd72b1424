"""Typed errors of the pruning package; the command line turns each into one line."""


class FedPruneError(Exception):
    """Base class: a user-facing problem with a pruning run (not a bug)."""


class PruningConfigError(FedPruneError):
    """A pruning setting is out of range or inconsistent (sparsity, N:M, group...)."""


class ModelError(FedPruneError):
    """The model spec cannot be resolved, loaded, or has no prunable decoder blocks."""


class DataError(FedPruneError):
    """A calibration or evaluation source is missing, empty or too short."""


class VoteCountError(FedPruneError):
    """Aggregated vote counts that honest local Wanda masks cannot produce (a cheating client)."""


class PrivacyConfigError(FedPruneError):
    """A differential-privacy setting is out of range or cannot be honoured (epsilon, delta, clip,
    noise on a plain aggregation where every client's noise share would be visible)."""


class StatisticsError(FedPruneError):
    """Summed activation statistics that honest clients cannot produce (negative, above the bound
    implied by the token counts and the clip, or a wrong length): the round is aborted."""
